"""Results written on the input's exact grid: a .seg.nrrd (names, colours), a NIfTI label map with the input's
affine, and for a DICOM input a DICOM SEG that references the source series (highdicom)."""

from __future__ import annotations

import pathlib

import numpy as np
import SimpleITK as sitk

from . import nifti
from .images import Image

# Slicer's generic anatomy colours cycle for objects without a colour of their own.
DEFAULT_COLORS = ([0.5, 0.68, 0.5], [0.94, 0.84, 0.57], [0.69, 0.48, 0.4], [0.44, 0.72, 0.83],
                  [0.86, 0.38, 0.34], [0.56, 0.47, 0.82], [0.9, 0.6, 0.2], [0.3, 0.55, 0.75])


def color_of(obj, index: int) -> list[float]:
    return list(obj.color) if obj.color is not None else DEFAULT_COLORS[index % len(DEFAULT_COLORS)]


def write_seg_nrrd(path: pathlib.Path, image: Image, objects: list, masks: list[np.ndarray]) -> None:
    """One segment per object; overlapping objects go to separate layers (slicerio places them)."""
    import slicerio

    seg = slicerio.create_segmentation(image.shape_kji[::-1], image.ijk_to_lps)
    for n, (obj, mask) in enumerate(zip(objects, masks)):
        slicerio.add_segment(seg, np.transpose(mask).astype(np.uint8),  # K,J,I -> I,J,K
                             {"id": f"Segment_{obj.label}", "name": obj.name,
                              "color": color_of(obj, n)})
    slicerio.write_segmentation(str(path), seg)


def overlap_voxels(masks: list[np.ndarray]) -> int:
    """How many voxels more than one object claims (the label map can give each to only one)."""
    return int((np.sum(masks, axis=0, dtype=np.int32) > 1).sum()) if len(masks) > 1 else 0


def label_map(objects: list, masks: list[np.ndarray]) -> np.ndarray:
    """K,J,I label values; where objects overlap the later one wins (the .seg.nrrd keeps them all)."""
    values = [o.label for o in objects]
    out = np.zeros(masks[0].shape, np.result_type(*(np.min_scalar_type(v) for v in (min(values), max(values)))))
    for obj, mask in zip(objects, masks):
        out[mask] = obj.label
    return out


def write_label_image(path: pathlib.Path, image: Image, labels_kji: np.ndarray) -> None:
    """A label map with exactly the input's direction, spacing and origin (NIfTI stores them in its affine)."""
    itk = sitk.GetImageFromArray(labels_kji)
    itk.CopyInformation(image.itk)
    sitk.WriteImage(itk, str(path), useCompression=True)
    if image.nifti_header is not None:  # the input's own qform and sform, so every tool overlays the two alike
        nifti.copy_transforms(image.nifti_header, path)


def write_dicom_seg(path: pathlib.Path, image: Image, objects: list, masks: list[np.ndarray],
                    model_name: str) -> None:
    """A binary DICOM SEG over the source series (frames in the series' slice order, which is the array's K)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f) for f in image.dicom_files]
    descriptions = []
    for n, obj in enumerate(objects, 1):
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=n, segment_label=obj.name[:64],
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="MedSAM2", version="1", family=codes.DCM.ArtificialIntelligence)))
    pixels = np.stack(masks, axis=-1).astype(np.uint8)  # (frames K, rows J, columns I, segments)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="MedSAM2Slicer",
        manufacturer_model_name=model_name[:64], software_versions="0.1.0", device_serial_number="0",
        omit_empty_frames=False)
    seg.save_as(str(path))
