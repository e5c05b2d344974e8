"""Ground truth for `--from-labels`, on the image's grid: a label map in any image format, or a Slicer segmentation.

A Slicer segmentation (.seg.nrrd) whose segments overlap is stored in layers (a 4D NRRD: one 3D labelmap per layer;
each segment names its layer and its value in it). Each segment becomes a truth of its own, with its name and
colour, whatever layer it is in; its value (what `--label-values` selects and the outputs' label) is its number in
the file, 1 for the first segment, since label values repeat across layers. A label map or segmentation on another
grid is resampled onto the image's grid with nearest neighbour.
"""

from __future__ import annotations

import pathlib

import numpy as np
import SimpleITK as sitk

from .errors import CaseInputError
from .images import NRRD_SUFFIXES, Image, check_3d_scalar, first_line, read_itk, read_nrrd_header
from .prompts import LabelTruth, label_truths


def read_label_truths(path: str | pathlib.Path, image: Image) -> list[LabelTruth]:
    """The structures of a label file on the image's grid (a segment may have no voxel there)."""
    path = pathlib.Path(path)
    if path.is_file() and path.stat().st_size and path.name.lower().endswith(NRRD_SUFFIXES):
        if "Segment0_ID" in read_nrrd_header(path):
            return _segmentation_truths(path, image)
    itk, _, _ = read_itk(path)
    return label_truths(label_on_image_grid(itk, image, str(path)))


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def label_on_image_grid(labels: sitk.Image, image: Image, source: str) -> np.ndarray:
    """A label map's values on the image's grid (K,J,I), resampled with nearest neighbour when its grid differs.

    A label map that does not overlap the image, or whose labels all fall outside it, cannot be used.
    """
    check_3d_scalar(labels, source, "label map")
    if labels.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        values = sitk.GetArrayViewFromImage(labels)
        if not np.array_equal(values, np.round(values)):
            raise CaseInputError(f"The label map {source} has fractional values; threshold it to whole labels first.")
        labels = sitk.Cast(labels, sitk.sitkInt32)
    resampled = _on_image_grid(labels, image)
    if sitk.GetArrayViewFromImage(labels).any() and not resampled.any():
        raise _outside(source, image)
    return resampled


def _on_image_grid(labels: sitk.Image, image: Image) -> np.ndarray:
    if same_grid(labels, image.itk):
        return sitk.GetArrayFromImage(labels)
    return sitk.GetArrayFromImage(sitk.Resample(labels, image.itk, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                labels.GetPixelID()))


def _outside(source, image: Image) -> CaseInputError:
    return CaseInputError(f"The label map {source} lies outside the image {image.source}: no label voxel falls on "
                          "the image's grid, so it cannot be resampled onto it.")


def _segmentation_truths(path: pathlib.Path, image: Image) -> list[LabelTruth]:
    """Every segment of a .seg.nrrd (one layer or several) as a truth on the image's grid."""
    import slicerio

    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as e:  # noqa: BLE001 - pynrrd and slicerio raise plain ValueError/KeyError/OSError alike
        raise CaseInputError(f"{path} is not a readable Slicer segmentation ({first_line(e)}).") from None
    voxels = seg.get("voxels")
    if voxels is None or voxels.ndim not in (3, 4):
        raise CaseInputError(f"{path} is a segmentation of {getattr(voxels, 'ndim', 0)} dimensions; a 3D one "
                             "(or layers of 3D ones) is needed.")
    layers = voxels[np.newaxis] if voxels.ndim == 3 else voxels
    direction, spacing, origin = _lps_grid(seg["ijkToLPS"], path)
    truths, any_voxel = [], False
    for number, segment in enumerate(seg["segments"], 1):
        layer = int(segment.get("layer", 0))
        if not 0 <= layer < len(layers):
            raise CaseInputError(f"{path}: segment {segment.get('name', number)!r} is in layer {layer}, but the "
                                 f"file has {len(layers)}.")
        mask_ijk = layers[layer] == int(segment.get("labelValue", 1))
        any_voxel |= bool(mask_ijk.any())
        itk = sitk.GetImageFromArray(np.ascontiguousarray(mask_ijk.T, dtype=np.uint8))  # I,J,K -> K,J,I
        itk.SetDirection(direction)
        itk.SetSpacing(spacing)
        itk.SetOrigin(origin)
        color = segment.get("color")
        truth = LabelTruth(number, str(segment.get("name") or f"segment {number}"),
                           _on_image_grid(itk, image).astype(bool),
                           [float(c) for c in color] if color is not None else None)
        truths.append(truth)
    if not truths:
        raise CaseInputError(f"{path} is a segmentation without segments.")
    if any_voxel and not any(t.mask.any() for t in truths):
        raise _outside(path, image)
    return truths


def _lps_grid(ijk_to_lps, path) -> tuple[list[float], list[float], list[float]]:
    """ITK's direction (flat, row-major), spacing and origin of a segmentation's IJK->LPS matrix."""
    matrix = np.asarray(ijk_to_lps, float)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    if not np.isfinite(matrix).all() or (spacing == 0).any() or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise CaseInputError(f"{path} has no valid space directions, so where its voxels lie is unknown.")
    return (matrix[:3, :3] / spacing).ravel().tolist(), spacing.tolist(), matrix[:3, 3].tolist()
