"""The end-to-end scenarios the in-app self-test also runs, here against the deterministic DiskEngine."""

import numpy as np
import pytest

from medsam2_backend.engine import DiskEngine
from MedSAM2SlicerLib import scenarios


@pytest.mark.parametrize("view", ["axial", "sagittal", "coronal"])
def test_box_drawn_in_ras_lands_on_exactly_its_voxels(mrml, view):
    scenarios.box_round_trip(DiskEngine(radius=3, shrink=1), view)


def test_box_round_trip_under_a_rotating_parent_transform(mrml):
    c, s = np.cos(np.radians(25)), np.sin(np.radians(25))
    parent = np.array([[c, 0, s, 5.0], [0, 1, 0, -3.0], [-s, 0, c, 8.0], [0, 0, 0, 1]])
    scenarios.box_round_trip(DiskEngine(radius=3, shrink=1), "coronal", parent)


def test_streaming_100_slices_costs_about_one_write(mrml):
    scenarios.streaming_costs_one_write(DiskEngine(radius=6, shrink=0))


def test_propagation_is_one_undo_step(mrml):
    scenarios.undo_restores_in_one_step(DiskEngine(radius=6, shrink=1))


def test_console_logic_segments_from_a_markups_roi(mrml):
    from MedSAM2SlicerLib.logic import MedSAM2SlicerLogic
    import slicer

    volume = scenarios.add_volume(shape_kji=(10, 16, 16), ijk_to_ras=np.diag([1.0, 1.0, 1.0, 1.0]))
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode")
    roi = mrml.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(5.5, 7.0, 5.0)
    roi.SetSize(5.0, 6.0, 0.5)  # I 3..8, J 4..10 on axial slice K = 5
    logic = MedSAM2SlicerLogic()
    logic.connect(engine=DiskEngine(radius=3, shrink=1))
    segment_id = logic.segment(volume, segmentation, roi_node=roi, propagate=False)
    expected = np.zeros((10, 16, 16), np.uint8)
    expected[5, 4:11, 3:9] = 1
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume), expected)
