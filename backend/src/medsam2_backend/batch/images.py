"""Medical images in, through SimpleITK: NIfTI, NRRD, MHA/MHD and DICOM series folders, with their full geometry.

Arrays are K,J,I (SimpleITK's `GetArrayFromImage` order, the one `medsam2_client.geometry` names); `ijk_to_ras`
is built from the file's direction, spacing and origin (LPS) by the geometry module. Everything that can be wrong
with a file is found here, before a model is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import sys
import tempfile

import numpy as np
import SimpleITK as sitk

from medsam2_client import geometry

from . import nifti
from .errors import CaseInputError

NRRD_SUFFIXES = (".nrrd", ".nhdr")


@dataclasses.dataclass
class Image:
    """A 3D scalar image: voxels in K,J,I order and the ITK image that carries its grid."""

    array: np.ndarray
    itk: sitk.Image
    source: str
    dicom_files: list[str] | None = None  # the series' files in slice (K) order, for a DICOM input
    nifti_header: tuple[bytes, str] | None = None  # a NIfTI-1 input's header and byte order (its transforms)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ijk_to_ras(self) -> np.ndarray:
        return geometry.ijk_to_ras_from_image(self.itk.GetDirection(), self.itk.GetSpacing(), self.itk.GetOrigin())

    @property
    def ijk_to_lps(self) -> np.ndarray:
        return geometry.ijk_to_lps_from_image(self.itk.GetDirection(), self.itk.GetSpacing(), self.itk.GetOrigin())

    @property
    def spacing_kji(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.itk.GetSpacing()[::-1])

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)


def dicom_series(folder: pathlib.Path) -> dict[str, list[str]]:
    """Series instance UID -> its files sorted by slice position (GDCM), for every series in `folder`."""
    reader = sitk.ImageSeriesReader()
    return {uid: list(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in
            reader.GetGDCMSeriesIDs(str(folder))}


def _read_dicom_folder(folder: pathlib.Path, series_uid: str | None) -> tuple[sitk.Image, list[str], list[str]]:
    """The chosen series of a DICOM folder. Rule: the series named by `series_uid`, else the one with the most
    files (a note lists the others)."""
    series = dicom_series(folder)
    if not series:
        raise CaseInputError(f"{folder} is a folder without a DICOM series in it.")
    listing = "; ".join(f"{uid} ({len(files)} files)" for uid, files in series.items())
    notes = []
    if series_uid is not None:
        if series_uid not in series:
            raise CaseInputError(f"{folder} has no series {series_uid}; it has: {listing}.")
        uid = series_uid
    else:
        uid = max(series, key=lambda u: len(series[u]))
        if len(series) > 1:
            notes.append(f"{folder} holds {len(series)} series ({listing}); using the largest, {uid} "
                         "(choose another with --series).")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series[uid])
    with c_stderr_held() as held:
        try:
            return reader.Execute(), series[uid], notes
        except RuntimeError as e:
            error = e
    raise CaseInputError(f"DICOM series {uid} in {folder} could not be read ({first_line(error, held)}).")


def read_nrrd_header(path: pathlib.Path) -> dict:
    """A NRRD's header, checked: without space fields it has no place in the patient (ITK would silently assume
    an identity grid)."""
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except (nrrd.NRRDError, OSError, UnicodeDecodeError, ValueError) as e:
        raise CaseInputError(f"{path} is not a readable NRRD file ({first_line(e)}).") from None
    if "space directions" not in header or not ("space" in header or "space origin" in header):
        raise CaseInputError(f"{path} has no space fields (space, space directions, space origin), so where its "
                             "voxels lie in the patient is unknown; add them (Slicer writes them) and retry.")
    return header


def read_itk(path: str | pathlib.Path, series_uid: str | None = None) -> tuple[sitk.Image, list[str] | None,
                                                                                 list[str]]:
    """Read any supported file or DICOM folder as an ITK image, or raise CaseInputError with the reason."""
    path = pathlib.Path(path)
    if not path.exists():
        raise CaseInputError(f"{path} does not exist.")
    if path.is_dir():
        return _read_dicom_folder(path, series_uid)
    if path.stat().st_size == 0:
        raise CaseInputError(f"{path} is an empty file.")
    if path.name.lower().endswith(NRRD_SUFFIXES):
        read_nrrd_header(path)
    if nifti.is_nifti(path):
        nifti.check_complete(path)
    with c_stderr_held() as held:
        try:
            itk = sitk.ReadImage(str(path))
            if itk.GetDimension() == 4 and itk.GetSize()[3] == 1:  # a 3D volume stored as one time point
                itk = itk[:, :, :, 0]
            return itk, None, []
        except RuntimeError as e:
            error = e
    raise CaseInputError(f"{path} could not be read as a medical image ({first_line(error, held)}).")


def read_image(path: str | pathlib.Path, series_uid: str | None = None) -> Image:
    """A 3D scalar image ready for segmentation."""
    itk, files, notes = read_itk(path, series_uid)
    if pathlib.Path(path).is_file() and itk.HasMetaDataKey("0020|000e") and min(itk.GetSize()) < 2:
        raise CaseInputError(f"{path} is one DICOM slice; give the folder that holds its whole series.")
    check_3d_scalar(itk, path, "image")
    array = sitk.GetArrayFromImage(itk)
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise CaseInputError(f"{path} has voxels of type {array.dtype}; use an integer or float image.")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        finite = np.isfinite(array)
        if not finite.any():
            raise CaseInputError(f"{path} has no voxel with a finite value (all NaN or infinite).")
        lowest = array[finite].min()
        notes.append(f"{path}: {int((~finite).sum())} voxels are NaN or infinite; they are read as the image's "
                     f"lowest value, {lowest:g}.")
        array[~finite] = lowest
    image = Image(array, itk, str(path), dicom_files=files, notes=notes)
    if nifti.is_nifti(pathlib.Path(path)):
        image.nifti_header = nifti.read_header(pathlib.Path(path))
        chosen = image.nifti_header and nifti.transform_choice(*image.nifti_header, image.ijk_to_lps)
        if chosen:
            notes.append(f"{path} has a qform and an sform that place its voxels differently; the outputs follow "
                         f"the {chosen}, as ITK and Slicer read it, and the NIfTI label map keeps both.")
    return image


def check_3d_scalar(itk: sitk.Image, path, what: str) -> None:
    size = itk.GetSize()
    if itk.GetDimension() != 3:
        raise CaseInputError(f"The {what} {path} is {itk.GetDimension()}D {tuple(size)}; a 3D volume is needed.")
    if itk.GetNumberOfComponentsPerPixel() != 1:
        raise CaseInputError(f"The {what} {path} has {itk.GetNumberOfComponentsPerPixel()} values per voxel "
                             "(colour or vector); a single-channel volume is needed.")
    if min(size) < 2:
        raise CaseInputError(f"The {what} {path} has a single slice {tuple(size)}; a 3D volume is needed.")


class _Held:
    text = ""


@contextlib.contextmanager
def c_stderr_held():
    """Hold what C++ readers print straight to the process's stderr (MetaIO, GDCM, ITK warnings): a user sees one
    sentence, and that text becomes its reason when the read fails. Python's own sys.stderr is untouched."""
    held = _Held()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield held
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            held.text = tmp.read().decode("utf-8", "replace")


def first_line(error: Exception, held: _Held | None = None) -> str:
    """The line that says why: ITK's last message line, or what a C++ reader printed when ITK's says only
    "No such file or directory" (MetaIO's way of reporting missing voxels)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    printed = [line.strip() for line in (held.text if held else "").splitlines()
               if line.strip() and not line.strip().startswith("WARNING:")]
    text = lines[-1] if lines else type(error).__name__
    if printed and (not lines or "No such file or directory" in text):
        text = " ".join(printed[:2])
    return text[:200].rstrip(".")
