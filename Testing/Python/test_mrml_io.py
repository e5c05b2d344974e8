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


# ---- writes on the segmentation's reference lattice (issue: the editor ignores masks on another lattice) ----
# The reference lattice is the source volume's, oversampled 2x in plane (0.5 mm voxels, the same slices), as
# "Specify geometry" with an oversampling of 2 or a segmentation created over a finer volume gives.
FINE_SHAPE = (SHAPE[0], 2 * SHAPE[1], 2 * SHAPE[2])
FINE_IJK_TO_RAS = np.array([[0.5, 0, 0, -0.25], [0, 0.5, 0, -0.25], [0, 0, 1.0, 0], [0, 0, 0, 1]])


def _fine_setup(mrml):
    """A source volume whose I index is its intensity x 10, and a segmentation on the finer lattice."""
    volume = scenarios.add_volume(shape_kji=SHAPE, ijk_to_ras=np.eye(4))
    slicer.util.arrayFromVolume(volume)[:] = np.arange(SHAPE[2]) * 10
    slicer.util.arrayFromVolumeModified(volume)
    fine = scenarios.add_volume(shape_kji=FINE_SHAPE, ijk_to_ras=FINE_IJK_TO_RAS, name="fine")
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(fine)
    return volume, fine, segmentation, mrml_io.EditorLogicTarget(segmentation, volume)


def _write_full_slice(target, segment_id, volume, k=5, mask=None):
    writer = _writer(target, segment_id, volume, reference=target.reference_geometry())
    writer.add(k, np.ones((16, 16), bool) if mask is None else mask)
    writer.flush()
    return writer


def test_masking_applies_on_a_reference_lattice_other_than_the_volume(mrml):
    volume, fine, segmentation, target = _fine_setup(mrml)
    seg = segmentation.GetSegmentation()
    a, region = seg.AddEmptySegment("A"), seg.AddEmptySegment("Region")
    region_voxels = np.zeros(FINE_SHAPE, np.uint8)
    region_voxels[5, :, 0:9] = 1  # 4.5 source voxels wide: only the fine lattice can hold it
    slicer.util.updateSegmentBinaryLabelmapFromArray(region_voxels, segmentation, region, fine)
    target.editor_node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    target.editor_node.SetMaskSegmentID(region)
    target.editor_node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    _write_full_slice(target, a, volume)
    assert np.array_equal(_segment(segmentation, a, fine), region_voxels)


def test_editable_intensity_range_applies_on_a_reference_lattice_other_than_the_volume(mrml):
    volume, fine, segmentation, target = _fine_setup(mrml)
    a = segmentation.GetSegmentation().AddEmptySegment("A")
    target.editor_node.SetSourceVolumeIntensityMask(True)
    target.editor_node.SetSourceVolumeIntensityMaskRange(0.0, 45.0)  # source columns I 0..4
    _write_full_slice(target, a, volume)
    got = _segment(segmentation, a, fine)
    assert got[5, :, :8].all()  # fine columns 0..7 lie inside source columns 0..3
    assert not got[5, :, 11:].any() and not got[[4, 6]].any()  # and nothing beyond column 5 or the slice


def test_a_thin_structure_in_another_segment_survives_a_write(mrml):
    volume, fine, segmentation, target = _fine_setup(mrml)
    seg = segmentation.GetSegmentation()
    a, vessel = seg.AddEmptySegment("A"), seg.AddEmptySegment("Vessel")
    vessel_voxels = np.zeros(FINE_SHAPE, np.uint8)
    vessel_voxels[:, :, 21] = 1  # a 0.5 mm line, half a source voxel
    slicer.util.updateSegmentBinaryLabelmapFromArray(vessel_voxels, segmentation, vessel, fine)
    # The editor's default: overwrite other segments (the write does not overlap the vessel).
    target.editor_node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments)
    mask = np.zeros((16, 16), bool)
    mask[:, 0:5] = True
    _write_full_slice(target, a, volume, mask=mask)
    assert np.array_equal(_segment(segmentation, vessel, fine), vessel_voxels)
    expected = np.zeros(FINE_SHAPE, np.uint8)
    expected[5, :, 0:10] = 1
    assert np.array_equal(_segment(segmentation, a, fine), expected)


def test_a_rotated_reference_lattice_gets_the_block_and_nothing_outside_it(mrml):
    volume = scenarios.add_volume(shape_kji=SHAPE, ijk_to_ras=np.eye(4))
    # The reference lattice turned 30 degrees in plane about the volume's centre, 0.7 mm voxels, the same slices.
    c, s_ = np.cos(np.radians(30)), np.sin(np.radians(30))
    rotation = np.array([[c * 0.7, -s_ * 0.7, 0, 0], [s_ * 0.7, c * 0.7, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    rotation[:3, 3] = np.array([7.5, 7.5, 0]) - rotation[:3, :3] @ np.array([16.5, 16.5, 0])
    rotated = scenarios.add_volume(shape_kji=(SHAPE[0], 34, 34), ijk_to_ras=rotation, name="rotated")
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(rotated)
    target = mrml_io.EditorLogicTarget(segmentation, volume)
    a = segmentation.GetSegmentation().AddEmptySegment("A")
    square = np.zeros(SHAPE, np.uint8)
    square[:, 4:12, 4:12] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(square, segmentation, a, volume)
    before = mrml_io.segment_mask_kji(segmentation, a, volume)
    assert before[:, 5:11, 5:11].all()  # the square made it through the rotated lattice
    writer = _writer(target, a, volume, reference=target.reference_geometry())
    mask = np.zeros((16, 16), bool)
    mask[2:6, 9:14] = True
    for k in (10, 11):
        writer.add(k, mask)
    writer.flush()
    got = mrml_io.segment_mask_kji(segmentation, a, volume)
    others = np.setdiff1d(np.arange(SHAPE[0]), [10, 11])
    assert np.array_equal(got[others], before[others])  # nothing outside the block's slices moved
    assert got[10:12, 3:5, 10:13].all() and not got[10:12, 7:10, 6:9].any()  # the block replaced the square


def test_segment_mask_is_read_on_the_volume_lattice_through_parent_transforms(mrml):
    volume = scenarios.add_volume(shape_kji=SHAPE, ijk_to_ras=np.eye(4))
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode")
    transform = mrml.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(geometry.vtk_matrix(np.array(
        [[1.0, 0, 0, 3.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])))  # the segmentation moved 3 mm right
    segmentation.SetAndObserveTransformNodeID(transform.GetID())
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    target = mrml_io.EditorLogicTarget(segmentation, volume)
    a = segmentation.GetSegmentation().AddEmptySegment("A")
    mask = np.zeros((16, 16), bool)
    mask[4:8, 2:6] = True
    writer = mrml_io.SliceBatchWriter(target, a, geometry.ijk_to_node_local(volume, segmentation), SHAPE, 0,
                                      reference=target.reference_geometry())
    writer.add(7, mask)
    writer.flush()
    got = mrml_io.segment_mask_kji(segmentation, a, volume)
    assert np.array_equal(got[7], mask) and got.sum() == mask.sum()
