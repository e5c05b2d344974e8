"""Writes honour the Segment Editor's masking/overwrite, stay inside their slab, batch, and undo in one step."""

import numpy as np
import slicer

from MedSAM2SlicerLib import geometry, mrml_io, scenarios

SHAPE = (30, 16, 16)


def _setup(mrml):
    volume = scenarios.add_volume(shape_kji=SHAPE, ijk_to_ras=np.diag([1.0, 1.0, 1.0, 1.0]))
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    target = mrml_io.EditorLogicTarget(segmentation, volume)
    return volume, segmentation, target


def _segment(segmentation, segment_id, volume):
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)


def _writer(target, segment_id, volume, axis=0, **kwargs):
    return mrml_io.SliceBatchWriter(target, segment_id, geometry.ijk_to_world_ras(volume), SHAPE, axis, **kwargs)


class CountingTarget:
    """Wraps a target to count undo saves and the voxels each write covers."""

    def __init__(self, inner):
        self.inner, self.segmentation_node = inner, inner.segmentation_node
        self.saves, self.extents = 0, []

    def save_state_for_undo(self):
        self.saves += 1
        self.inner.save_state_for_undo()

    def modify(self, segment_id, labelmap, mode, extent):
        self.extents.append((mode, tuple(extent)))
        self.inner.modify(segment_id, labelmap, mode, extent)


def test_slab_write_replaces_only_its_slices(mrml):
    volume, segmentation, target = _setup(mrml)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("A")
    before = np.zeros(SHAPE, np.uint8)
    before[:, 2:6, 2:6] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(before, segmentation, segment_id, volume)
    writer = _writer(target, segment_id, volume)
    mask = np.zeros((16, 16), bool)
    mask[8:12, 9:14] = True
    for k in (10, 11, 12):
        writer.add(k, mask)
    writer.flush()
    expected = before.copy()
    expected[10:13] = 0
    expected[10:13, 8:12, 9:14] = 1
    assert np.array_equal(_segment(segmentation, segment_id, volume), expected)


def test_streamed_slices_are_batched_into_few_slab_writes(mrml):
    volume, segmentation, target = _setup(mrml)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("A")
    counting = CountingTarget(target)
    writer = _writer(counting, segment_id, volume, max_slices=8, max_delay_s=1e9)
    mask = np.ones((16, 16), bool)
    for k in list(range(0, 30)):
        writer.add(k, mask)
    writer.flush()
    assert writer.write_count == 4  # 8 + 8 + 8 + 6
    assert writer.voxels_written == np.prod(SHAPE)  # exactly one full-volume write
    assert counting.saves == 1
    slabs = sorted({extent[4:] for _, extent in counting.extents})
    assert slabs == [(0, 7), (8, 15), (16, 23), (24, 29)]
    assert _segment(segmentation, segment_id, volume).sum() == np.prod(SHAPE)


def test_non_adjacent_slices_are_not_merged_into_one_slab(mrml):
    volume, segmentation, target = _setup(mrml)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("A")
    writer = _writer(target, segment_id, volume, axis=2, max_delay_s=1e9)
    writer.add(3, np.ones((30, 16), bool))
    writer.add(9, np.ones((30, 16), bool))  # along I: not adjacent to 3, so slab 3 is written first
    writer.flush()
    assert writer.write_count == 2 and writer.voxels_written == 2 * 30 * 16
    got = _segment(segmentation, segment_id, volume)
    assert np.flatnonzero(got.sum(axis=(0, 1))).tolist() == [3, 9]


def test_masking_and_overwrite_follow_the_editor_node(mrml):
    volume, segmentation, target = _setup(mrml)
    seg = segmentation.GetSegmentation()
    a, other, region = seg.AddEmptySegment("A"), seg.AddEmptySegment("Other"), seg.AddEmptySegment("Region")
    other_voxels = np.zeros(SHAPE, np.uint8)
    other_voxels[5, 0:8, :] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(other_voxels, segmentation, other, volume)
    region_voxels = np.zeros(SHAPE, np.uint8)
    region_voxels[5, :, 0:10] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(region_voxels, segmentation, region, volume)
    editor = target.editor_node
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editor.SetMaskSegmentID(region)
    editor.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    writer = _writer(target, a, volume)
    writer.add(5, np.ones((16, 16), bool))
    writer.flush()
    assert np.array_equal(_segment(segmentation, a, volume), region_voxels)  # only the editable area
    assert np.array_equal(_segment(segmentation, other, volume), other_voxels)  # overlap allowed: untouched
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
    editor.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments)
    writer = _writer(target, a, volume)
    writer.add(5, np.ones((16, 16), bool))
    writer.flush()
    assert _segment(segmentation, a, volume)[5].all()
    assert _segment(segmentation, other, volume).sum() == 0  # overwritten


def test_one_action_is_one_undo_step(mrml):
    volume, segmentation, target = _setup(mrml)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("A")
    first = _writer(target, segment_id, volume)
    first.add(0, np.eye(16, dtype=bool))
    first.flush()
    after_first = _segment(segmentation, segment_id, volume).copy()
    second = _writer(target, segment_id, volume, max_slices=3)
    for k in range(1, 20):  # many slab writes in one action
        second.add(k, np.ones((16, 16), bool))
    second.flush()
    assert second.write_count == 7
    target.undo()
    assert np.array_equal(_segment(segmentation, segment_id, volume), after_first)
    target.undo()
    assert _segment(segmentation, segment_id, volume).sum() == 0
