"""What happens around the user's work in the app: Close Scene and node removal (real slicer-core scenes)."""

import numpy as np
import slicer

from medsam2_backend.engine import DiskEngine
from MedSAM2SlicerLib.logic import InProcessBackend, MedSAM2SlicerLogic

SHAPE_KJI = (10, 24, 24)


class CountingBackend(InProcessBackend):
    def __init__(self):
        super().__init__(DiskEngine(radius=3, shrink=1))
        self.opened = 0

    def open_session(self, *args, **kwargs):
        self.opened += 1
        return super().open_session(*args, **kwargs)


def load_case(scene):
    """The same data, loaded the same way (as reopening a file would)."""
    volume = slicer.util.addVolumeFromArray(np.arange(np.prod(SHAPE_KJI), dtype=np.int16).reshape(SHAPE_KJI))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segment_id = segmentation.GetSegmentation().AddEmptySegment("liver", "liver")
    return volume, segmentation, segment_id


def prompt(logic, volume, segmentation, segment_id, x):
    logic.segment(volume, segmentation, segment_id, points_ras=[[x, 12.0, 4.0]], view="axial", propagate=False)


def test_close_scene_forgets_sessions_and_prompts_though_node_ids_are_reused(mrml):
    logic = MedSAM2SlicerLogic()
    backend = CountingBackend()
    logic.connect(engine=backend.engine)
    logic.controller.backend = backend
    logic.watch_scene(mrml)
    volume, segmentation, segment_id = load_case(mrml)
    ids = (volume.GetID(), segmentation.GetID())
    prompt(logic, volume, segmentation, segment_id, 6.0)
    mrml.Clear(0)  # File > Close Scene
    volume, segmentation, segment_id = load_case(mrml)
    assert (volume.GetID(), segmentation.GetID()) == ids  # MRML reuses the ids
    prompt(logic, volume, segmentation, segment_id, 18.0)
    assert len(logic.controller.prompts(volume, segment_id)) == 1  # the old point is not merged in
    assert backend.opened == 2
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)[4]
    assert mask[12, 18] and not mask[12, 6]  # only the new disk (an old object would add the old one too)


def test_removing_a_volume_forgets_its_sessions(mrml):
    logic = MedSAM2SlicerLogic()
    backend = CountingBackend()
    logic.connect(engine=backend.engine)
    logic.controller.backend = backend
    logic.watch_scene(mrml)
    volume, segmentation, segment_id = load_case(mrml)
    prompt(logic, volume, segmentation, segment_id, 6.0)
    mrml.RemoveNode(segmentation)
    mrml.RemoveNode(volume)
    assert not logic.controller.prompts(volume, segment_id) and not logic.controller._sessions
    assert not logic._targets
