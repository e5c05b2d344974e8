"""End-to-end checks shared by the pytest suite and the module's in-app self-test (`MedSAM2SlicerTest`).

Each function builds its own nodes in `slicer.mrmlScene`, runs one workflow and asserts exact voxels. The backend
is passed in: the deterministic `DiskEngine`, or `MedSAM2SlicerLogic.connect` keywords (`{"url", "token"}`) of a
server running it, so masks are known before they are computed.
"""

from __future__ import annotations

import numpy as np
import slicer

from . import geometry
from .logic import MedSAM2SlicerLogic

# An oblique, flipped, anisotropic volume: rotated 30 degrees about S, I flipped, spacing 0.8 x 1.1 x 2.5 mm.
_ANGLE = np.radians(30.0)
OBLIQUE_IJK_TO_RAS = np.array([
    [-np.cos(_ANGLE) * 0.8, -np.sin(_ANGLE) * 1.1, 0.0, 12.0],
    [-np.sin(_ANGLE) * 0.8, np.cos(_ANGLE) * 1.1, 0.0, -7.0],
    [0.0, 0.0, 2.5, 30.0],
    [0.0, 0.0, 0.0, 1.0]])


def connected_logic(backend) -> MedSAM2SlicerLogic:
    """A logic connected to an engine object, or to a server given as `connect` keywords."""
    logic = MedSAM2SlicerLogic()
    if isinstance(backend, dict):
        logic.connect(**backend)
    else:
        logic.connect(engine=backend)
    return logic


def add_volume(shape_kji=(20, 40, 50), ijk_to_ras=OBLIQUE_IJK_TO_RAS, name="MedSAM2TestVolume"):
    """A scalar volume with a ramp (so no two slices are equal) and the given geometry."""
    voxels = np.arange(np.prod(shape_kji), dtype=np.int16).reshape(shape_kji) % 1000
    return slicer.util.addVolumeFromArray(voxels, ijk_to_ras, name)


def box_round_trip(backend, view: str = "axial", parent_transform_ras=None) -> None:
    """A box drawn in RAS on a view comes back as exactly the voxels it spans, on the slice it was drawn on."""
    volume = add_volume()
    if parent_transform_ras is not None:
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        transform.SetMatrixTransformToParent(geometry.vtk_matrix(parent_transform_ras))
        volume.SetAndObserveTransformNodeID(transform.GetID())
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ijk_to_ras = geometry.ijk_to_world_ras(volume)
    axis = geometry.choose_propagation_axis(ijk_to_ras, geometry.view_slice_to_ras(view)).axis
    # Corners at voxel centres (K,J,I): the box spans rows/columns between them on one slice. All four corners of
    # that rectangle of the volume's grid are given (two would mean a rectangle in the view, which is oblique here).
    corner_a, corner_b = [6, 10, 12], [6, 18, 30]
    corners_kji = np.array([[6, r, c] for r in (10, 18) for c in (12, 30)])
    corner_a = np.roll(corner_a, axis)  # put the slice index on the propagation axis
    corner_b = np.roll(corner_b, axis)
    corners_kji = np.roll(corners_kji, axis, axis=1)
    corners_ras = geometry.ijk_to_ras(corners_kji[:, ::-1].astype(float), ijk_to_ras)
    logic = connected_logic(backend)
    segment_id = logic.segment(volume, segmentation, box_ras=corners_ras, view=view, propagate=False)
    logic.close()
    got = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
    expected = np.zeros(got.shape, np.uint8)
    region = tuple(slice(min(a, b), max(a, b) + 1) for a, b in zip(corner_a, corner_b))
    expected[region] = 1
    assert got.shape == (20, 40, 50), got.shape
    assert np.array_equal(got, expected), (view, np.argwhere(got != expected)[:5])


def streaming_costs_one_write(engine) -> None:
    """Propagating through 100 slices writes them in a few slab writes totalling one volume's voxels."""
    volume = add_volume(shape_kji=(100, 24, 24), ijk_to_ras=np.diag([1.0, 1.0, 1.0, 1.0]))
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = connected_logic(engine)
    segment_id = logic.segment(volume, segmentation, points_ras=[[12.0, 12.0, 0.0]], labels=[1], propagate=False)
    outcome = logic.propagate(volume, segmentation, segment_id, direction="forward")
    assert outcome.slices_written == 100, outcome  # the prompted slice is tracked again, then 1..99
    assert outcome.write_count <= 4, outcome.write_count  # batches of 32 slices: 32 + 32 + 32 + 4
    assert outcome.voxels_written == 100 * 24 * 24, outcome.voxels_written  # exactly one full-volume write
    got = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
    assert got.shape == (100, 24, 24) and all(got[k].sum() == got[0].sum() > 0 for k in range(100))
    assert not outcome.cancelled


def undo_restores_in_one_step(engine) -> None:
    """A whole propagation is one undo step: Undo gives back the segment as it was after the prompt."""
    volume = add_volume(shape_kji=(30, 24, 24), ijk_to_ras=np.diag([1.0, 1.0, 1.0, 1.0]))
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = connected_logic(engine)
    segment_id = logic.segment(volume, segmentation, points_ras=[[12.0, 12.0, 15.0]], labels=[1], propagate=False)
    after_prompt = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume).copy()
    logic.propagate(volume, segmentation, segment_id)
    after_propagation = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
    assert after_propagation.sum() > after_prompt.sum() > 0
    logic.undo(segmentation)
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume), after_prompt)


ALL = (box_round_trip, streaming_costs_one_write, undo_restores_in_one_step)
