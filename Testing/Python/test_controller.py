"""The session controller: session reuse, preprocessing, one object per segment, errors, cancel, exact voxels."""

import logging
import threading
import types

import numpy as np
import pytest
import slicer

from medsam2_backend.engine import DiskEngine
from medsam2_backend.engine.test_engine import disk, shrink_mask
from medsam2_client import wire
from medsam2_client.errors import BackendUnavailable
from MedSAM2SlicerLib import geometry, mrml_io, scenarios
from MedSAM2SlicerLib.controller import MedSAM2ActionError, SessionController
from MedSAM2SlicerLib.logic import InProcessBackend, MedSAM2SlicerLogic

SHAPE = (12, 32, 32)


class RecordingBackend(InProcessBackend):
    """The in-process DiskEngine, counting opens and optionally failing after some propagated slices."""

    def __init__(self, fail_after=None):
        super().__init__(DiskEngine(radius=6, shrink=1))
        self.opened, self.fingerprints, self.fail_after = [], [], fail_after

    def open_session(self, volume_kji, spacing_kji, axis, preprocessing, fingerprint=None):
        self.opened.append((volume_kji.shape, spacing_kji, axis, preprocessing))
        self.fingerprints.append(fingerprint)
        session = super().open_session(volume_kji, spacing_kji, axis, preprocessing, fingerprint)
        if self.fail_after is not None:
            original, limit = session.propagate, self.fail_after

            def failing_propagate(*args, **kwargs):
                run = original(*args, **kwargs)

                def stream():
                    for i, result in enumerate(run):
                        if i == limit:
                            raise BackendUnavailable("the server went away")
                        yield result
                return type("Run", (), {"planned": run.planned, "summary": run.summary, "cancel": run.cancel,
                                        "done": property(lambda self: run.done),
                                        "__iter__": lambda self: stream()})()
            session.propagate = failing_propagate
        return session


def _setup(mrml, backend):
    volume = scenarios.add_volume(shape_kji=SHAPE, ijk_to_ras=np.diag([1.0, 1.0, 2.0, 1.0]))
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return volume, segmentation, mrml_io.EditorLogicTarget(segmentation, volume), SessionController(backend)


def _segment(segmentation, segment_id, volume):
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)


def test_point_then_propagation_gives_the_engines_exact_masks(mrml):
    backend = RecordingBackend()
    volume, segmentation, target, controller = _setup(mrml, backend)
    a = segmentation.GetSegmentation().AddEmptySegment("A")
    outcome = controller.add_prompt(volume, target, a, points_ras=[[16.0, 15.0, 2 * 5]], labels=[1])
    assert (outcome.slice_index, outcome.axis, outcome.axis_warning) == (5, 0, None)
    on_prompt = disk((32, 32), 16, 15, 6)
    assert outcome.voxels == on_prompt.sum()
    assert np.array_equal(_segment(segmentation, a, volume)[5], on_prompt)
    result = controller.propagate(volume, target, a, direction="both")
    expected = np.stack([shrink_mask(on_prompt, abs(k - 5)) for k in range(SHAPE[0])])
    assert np.array_equal(_segment(segmentation, a, volume), expected)
    assert result.slices_written == SHAPE[0] and not result.cancelled
    ranked = [u.slice_index for u in result.least_certain]
    assert ranked[0] == 11 and set(ranked[1:3]) == {0, 10}  # the farthest slices are the least certain
    np.testing.assert_allclose(result.least_certain[0].center_ras, [15.5, 15.5, 22.0])
    assert backend.opened == [(SHAPE, (2.0, 1.0, 1.0), 0, None)]


def test_unchanged_volume_is_not_reopened_and_a_changed_one_is(mrml):
    backend = RecordingBackend()
    volume, segmentation, target, controller = _setup(mrml, backend)
    a, b = (segmentation.GetSegmentation().AddEmptySegment(n) for n in "AB")
    original = slicer.util.arrayFromVolume(volume).copy()
    controller.add_prompt(volume, target, a, points_ras=[[16.0, 15.0, 4]], labels=[1])
    controller.add_prompt(volume, target, b, points_ras=[[8.0, 8.0, 4]], labels=[1])
    assert len(backend.opened) == 1
    session = controller._sessions[(volume.GetID(), 0)].session
    assert session.object_ids == [1, 2]  # each segment is its own object on the same session
    slicer.util.arrayFromVolume(volume)[0, 0, 0] += 1
    slicer.util.arrayFromVolumeModified(volume)
    controller.add_prompt(volume, target, a, points_ras=[[16.0, 15.0, 4]], labels=[1])
    assert len(backend.opened) == 2
    # the backend is told the wire-format fingerprint of exactly the voxels it gets, so a server skips no upload
    # it needs and repeats none it does not
    assert backend.fingerprints == [wire.fingerprint(v) for v in (original, slicer.util.arrayFromVolume(volume))]
    with pytest.raises(MedSAM2ActionError, match="before propagating"):
        controller.propagate(volume, target, b)  # b's object lived on the dropped session


def test_changed_preprocessing_is_set_on_the_open_session(mrml):
    backend = RecordingBackend()
    volume, segmentation, target, controller = _setup(mrml, backend)
    a = segmentation.GetSegmentation().AddEmptySegment("A")
    controller.add_prompt(volume, target, a, points_ras=[[16.0, 15.0, 4]], labels=[1])
    controller.set_preprocessing({"preset": "lung"})
    controller.add_prompt(volume, target, a, points_ras=[[10.0, 15.0, 4]], labels=[1])
    session = controller._sessions[(volume.GetID(), 0)].session
    assert len(backend.opened) == 1
    assert session.preprocessing.preset == "lung"
    assert len(session.prompts(1)[2].points) == 2  # prompts kept through the change


def test_a_backend_error_mid_propagation_keeps_what_arrived_as_one_undo_step(mrml):
    backend = RecordingBackend(fail_after=4)
    volume, segmentation, target, controller = _setup(mrml, backend)
    a = segmentation.GetSegmentation().AddEmptySegment("A")
    controller.add_prompt(volume, target, a, points_ras=[[16.0, 15.0, 0]], labels=[1])
    after_prompt = _segment(segmentation, a, volume).copy()
    with pytest.raises(MedSAM2ActionError, match=r"^Propagation failed: the server went away\. The 4 slice") as info:
        controller.propagate(volume, target, a, direction="forward")
    assert info.value.slices_written == 4
    got = _segment(segmentation, a, volume)
    assert [k for k in range(SHAPE[0]) if got[k].any()] == [0, 1, 2, 3]
    target.undo()
    assert np.array_equal(_segment(segmentation, a, volume), after_prompt)


def test_cancel_from_the_progress_callback_stops_between_slices(mrml):
    volume, segmentation, target, controller = _setup(mrml, RecordingBackend())
    a = segmentation.GetSegmentation().AddEmptySegment("A")
    controller.add_prompt(volume, target, a, points_ras=[[16.0, 15.0, 0]], labels=[1])
    seen = []

    def progress(done, planned):
        seen.append((done, planned))
        if done == 3:
            controller.cancel()
    outcome = controller.propagate(volume, target, a, direction="forward", progress=progress)
    assert seen == [(1, 12), (2, 12), (3, 12)]
    assert outcome.cancelled and outcome.slices_written == 3


def test_progress_counts_tracked_slices_only(mrml):
    volume, segmentation, target, controller = _setup(mrml, RecordingBackend())
    a = segmentation.GetSegmentation().AddEmptySegment("A")
    controller.add_prompt(volume, target, a, points_ras=[[16.0, 15.0, 0]], labels=[1])
    seen = []
    controller.propagate(volume, target, a, direction="forward", postprocess=["largest_component", "fill_holes"],
                         progress=lambda done, planned: seen.append((done, planned)))
    assert seen[:12] == [(k, 12) for k in range(1, 13)]
    assert all(step == (12, 12) for step in seen[12:]), "post-processed slices rewrite; they are not progress"


def test_points_and_a_box_must_share_their_slice(mrml):
    volume, segmentation, target, controller = _setup(mrml, RecordingBackend())
    a = segmentation.GetSegmentation().AddEmptySegment("A")
    with pytest.raises(MedSAM2ActionError, match="same slice"):
        controller.add_prompt(volume, target, a, box_corners_ras=[[4.0, 4.0, 4.0], [20.0, 20.0, 4.0]],
                              points_ras=[[16.0, 15.0, 8.0]], labels=[1])
    assert _segment(segmentation, a, volume).sum() == 0


def test_box_with_negative_point_and_view_on_another_axis(mrml):
    volume, segmentation, target, controller = _setup(mrml, RecordingBackend())
    a = segmentation.GetSegmentation().AddEmptySegment("A")
    controller.add_prompt(volume, target, a, points_ras=[[16.0, 15.0, 4]], labels=[1])
    # Coronal view: slices along J (array axis 1); the segment starts over on that axis.
    outcome = controller.add_prompt(volume, target, a, box_corners_ras=[[4.0, 20.0, 2.0], [9.0, 20.0, 10.0]],
                                    slice_to_ras=np.array([[-1.0, 0, 0, 0], [0, 0, 1, 20], [0, 1, 0, 0], [0, 0, 0, 1]]))
    assert (outcome.axis, outcome.slice_index) == (1, 20)
    got = _segment(segmentation, a, volume)
    assert got[:, 20, :].sum() == 5 * 6 and got[1:6, 20, 4:10].all()  # K 1..5 (z 2..10 mm), I 4..9
    assert len(controller.prompts(volume, a)) == 1 and controller.prompts(volume, a)[0].axis == 1


# ---- undo/redo the model agrees with, the user's edits as corrections, several segments (real MRML history) ----
CENTER = (16.0, 15.0)


def _paint(target, segment_id, volume, k, mask, mode="add"):
    """A user's edit on slice k with another effect (Paint/Erase): the editor's own write, its own undo step.
    `mask` is one axial slice, or the whole K,J,I volume when k is None."""
    block = np.zeros((1,) + SHAPE[1:], np.uint8) if k is not None else np.asarray(mask, np.uint8)
    if k is not None:
        block[0] = mask
    extent = geometry.slice_extent_ijk(0, k, k, SHAPE) if k is not None else geometry.slice_extent_ijk(
        0, 0, SHAPE[0] - 1, SHAPE)
    labelmap = mrml_io.labelmap_from_array_kji(block, extent, geometry.ijk_to_node_local(
        volume, target.segmentation_node))
    modes = {"add": target.logic.ModificationModeAdd, "remove": target.logic.ModificationModeRemove}
    target.logic.SaveStateForUndo()
    target.logic.ModifySegmentByLabelmap(target.segmentation_node, segment_id, labelmap, modes[mode], False, False)


def _expected_from(prompts: dict) -> np.ndarray:
    """The DiskEngine's two-way result for {slice: mask} prompts (each slice from the nearest prompt behind it)."""
    anchor = min(prompts, key=lambda k: list(prompts).index(k))
    out = np.zeros(SHAPE, bool)
    for k in range(SHAPE[0]):
        behind = [p for p in prompts if (k - p) * (1 if k >= anchor else -1) >= 0]
        source = min(behind, key=lambda p: abs(k - p))
        out[k] = shrink_mask(prompts[source], abs(k - source))
    return out


def _point(k, x=CENTER[0], y=CENTER[1]):
    return [[x, y, 2.0 * k]]


def _prompted_and_propagated(mrml):
    """Segment "A" prompted with a point on slice 5 and propagated (the disk engine): one undo step each."""
    volume, segmentation, target, controller = _setup(mrml, RecordingBackend())
    a = segmentation.GetSegmentation().AddEmptySegment("A")
    controller.add_prompt(volume, target, a, points_ras=_point(5), labels=[1])
    controller.propagate(volume, target, a)
    return volume, segmentation, target, controller, a


def test_an_undone_correction_is_not_in_the_next_propagation_and_a_redone_one_is(mrml):
    volume, segmentation, target, controller, a = _prompted_and_propagated(mrml)
    first = _segment(segmentation, a, volume).copy()
    assert np.array_equal(first, _expected_from({5: disk((32, 32), *CENTER, 6)}))
    controller.add_prompt(volume, target, a, points_ras=_point(8, 8.0, 8.0), labels=[1])  # a correction
    controller.propagate(volume, target, a)
    corrected = _segment(segmentation, a, volume).copy()
    assert np.array_equal(corrected, _expected_from({5: disk((32, 32), *CENTER, 6), 8: disk((32, 32), 8, 8, 6)}))
    target.undo()  # the second propagation
    target.undo()  # the correction
    assert np.array_equal(_segment(segmentation, a, volume), first)
    target.redo()  # the correction again
    controller.propagate(volume, target, a)
    assert np.array_equal(_segment(segmentation, a, volume), corrected), "the redone correction is missing"
    target.undo()  # that propagation
    target.undo()  # the correction
    controller.propagate(volume, target, a)
    assert np.array_equal(_segment(segmentation, a, volume), first), "the undone correction came back"


def test_an_action_that_changes_nothing_is_one_undo_step(mrml):
    volume, segmentation, target, controller = _setup(mrml, RecordingBackend())
    a = segmentation.GetSegmentation().AddEmptySegment("A")
    controller.add_prompt(volume, target, a, points_ras=_point(5), labels=[1])
    after_prompt = _segment(segmentation, a, volume).copy()
    controller.propagate(volume, target, a)
    propagated = _segment(segmentation, a, volume).copy()
    controller.add_prompt(volume, target, a, points_ras=_point(5, 1.0, 1.0), labels=[0])  # far from the disk
    assert np.array_equal(_segment(segmentation, a, volume), propagated)  # no voxel changed
    target.undo()  # only the negative click
    assert np.array_equal(_segment(segmentation, a, volume), propagated)
    assert len(controller.prompts(volume, a, target)) == 1
    target.undo()  # the propagation
    assert np.array_equal(_segment(segmentation, a, volume), after_prompt)


def test_edited_slices_become_corrections_and_stay_as_drawn(mrml):
    volume, segmentation, target, controller, a = _prompted_and_propagated(mrml)
    blob = np.zeros((32, 32), bool)
    blob[20:28, 18:30] = True
    _paint(target, a, volume, 8, blob)  # Paint on slice 8
    _paint(target, a, volume, 2, np.ones((32, 32), bool), mode="remove")  # Erase all of slice 2
    edited_8 = _segment(segmentation, a, volume)[8].astype(bool)
    outcome = controller.propagate(volume, target, a)
    assert outcome.edits_taken == {a: [2, 8]}
    assert "slices 2, 8 were taken as corrections" in outcome.status()
    got = _segment(segmentation, a, volume).astype(bool)
    expected = _expected_from({5: disk((32, 32), *CENTER, 6), 8: edited_8, 2: np.zeros((32, 32), bool)})
    assert np.array_equal(got, expected)
    assert np.array_equal(got[8], edited_8) and not got[:3].any()
    again = controller.propagate(volume, target, a)  # nothing edited since: nothing taken
    assert again.edits_taken == {a: []}
    assert np.array_equal(_segment(segmentation, a, volume).astype(bool), expected)


def test_overwrite_masking_and_undo_are_not_taken_for_edits(mrml):
    volume, segmentation, target, controller = _setup(mrml, RecordingBackend())
    seg = segmentation.GetSegmentation()
    a, b, region = seg.AddEmptySegment("A"), seg.AddEmptySegment("B"), seg.AddEmptySegment("Region")
    region_voxels = np.zeros(SHAPE, np.uint8)
    region_voxels[:, :, :18] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(region_voxels, segmentation, region, volume)
    editor = target.editor_node
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)  # outside Region only
    editor.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments)
    controller.add_prompt(volume, target, a, points_ras=_point(5, 20.0, 15.0), labels=[1])
    controller.propagate(volume, target, a)  # masked: nothing left of column 18
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
    controller.add_prompt(volume, target, b, points_ras=_point(5, 26.0, 15.0), labels=[1])
    controller.propagate(volume, target, b)  # overwrites part of A
    assert controller.propagate(volume, target, a).edits_taken == {a: []}
    target.undo()
    target.undo()  # A's re-propagation and B's propagation are undone: A is as its first propagation left it
    assert controller.propagate(volume, target, a).edits_taken == {a: []}


def test_the_segment_on_a_view_slice_is_a_first_prompt_on_any_axis_through_transforms(mrml):
    volume, segmentation, target, controller = _setup(mrml, RecordingBackend())
    transform = mrml.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    moved = np.array([[0.0, -1, 0, 5], [1, 0, 0, -3], [0, 0, 1, 8], [0, 0, 0, 1]])  # 90 degrees about S, shifted
    transform.SetMatrixTransformToParent(geometry.vtk_matrix(moved))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)  # a segmentation made over it
    a = segmentation.GetSegmentation().AddEmptySegment("A")
    painted = np.zeros(SHAPE, np.uint8)
    painted[3:9, 20, 10:22] = 1  # a coronal slice J = 20, painted by hand (K 3..8, I 10..21)
    _paint(target, a, volume, None, painted)
    read = lambda: mrml_io.segment_mask_kji(segmentation, a, volume)  # noqa: E731
    assert np.array_equal(read(), painted)
    ijk_to_world = geometry.ijk_to_world_ras(volume)
    view = np.eye(4)  # a view across J, panned off the volume's centre
    view[:3, 0], view[:3, 1], view[:3, 2] = ijk_to_world[:3, 0], ijk_to_world[:3, 2] / 2, ijk_to_world[:3, 1]
    view[:3, 3] = geometry.ijk_to_ras([[3, 20, 1]], ijk_to_world)[0]
    outcome = controller.prompt_from_segment(volume, target, a, slice_to_ras=view)
    assert (outcome.axis, outcome.slice_index, outcome.voxels) == (1, 20, 6 * 12)
    assert np.array_equal(read(), painted)  # the user's voxels are not rewritten
    controller.propagate(volume, target, a, direction="forward")
    got = read()
    for j in range(20, 32):
        assert np.array_equal(got[:, j, :], shrink_mask(painted[:, 20, :].astype(bool), j - 20)), j


def test_the_segment_on_a_slice_as_a_correction_and_an_empty_one_refused_as_a_first_prompt(mrml):
    volume, segmentation, target, controller = _setup(mrml, RecordingBackend())
    a, b = (segmentation.GetSegmentation().AddEmptySegment(n) for n in "AB")
    axial_at = lambda k: np.array([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 2.0 * k], [0, 0, 0, 1]])  # noqa: E731
    with pytest.raises(MedSAM2ActionError, match="no voxels on slice 4"):
        controller.prompt_from_segment(volume, target, b, slice_to_ras=axial_at(4))
    controller.add_prompt(volume, target, a, points_ras=_point(5), labels=[1])
    controller.propagate(volume, target, a)
    blob = np.zeros((32, 32), bool)
    blob[2:9, 2:12] = True
    _paint(target, a, volume, 9, blob)
    painted_9 = _segment(segmentation, a, volume)[9].astype(bool)
    controller.prompt_from_segment(volume, target, a, slice_to_ras=axial_at(9))
    outcome = controller.propagate(volume, target, a)
    assert outcome.edits_taken == {a: []}  # already the prompt: not taken twice
    got = _segment(segmentation, a, volume).astype(bool)
    assert np.array_equal(got, _expected_from({5: disk((32, 32), *CENTER, 6), 9: painted_9}))


def test_several_segments_propagate_in_one_engine_call_and_one_undo_step(mrml):
    backend = RecordingBackend()
    volume, segmentation, target, controller = _setup(mrml, backend)
    a, b = (segmentation.GetSegmentation().AddEmptySegment(n) for n in "AB")
    controller.add_prompt(volume, target, a, points_ras=_point(5, 8.0, 8.0), labels=[1])
    controller.add_prompt(volume, target, b, points_ras=_point(3, 24.0, 24.0), labels=[1])
    session = controller._sessions[(volume.GetID(), 0)].session
    calls, original = [], session.propagate
    session.propagate = lambda ids, **kw: (calls.append(list(ids)), original(ids, **kw))[1]
    before = [_segment(segmentation, s, volume).copy() for s in (a, b)]
    assert controller.propagated_segments(volume, target) == [a, b]
    outcome = controller.propagate_segments(volume, target, [a, b])
    assert calls == [[1, 2]]
    assert np.array_equal(_segment(segmentation, a, volume), _expected_from({5: disk((32, 32), 8, 8, 6)}))
    assert np.array_equal(_segment(segmentation, b, volume), _expected_from({3: disk((32, 32), 24, 24, 6)}))
    assert outcome.segments == {a: list(range(12)), b: list(range(12))} and outcome.slices_written == 12
    target.undo()
    assert all(np.array_equal(_segment(segmentation, s, volume), x) for s, x in zip((a, b), before))


def test_reset_forgets_the_prompts_keeps_the_voxels_and_undo_brings_them_back(mrml):
    volume, segmentation, target, controller, a = _prompted_and_propagated(mrml)
    propagated = _segment(segmentation, a, volume).copy()
    controller.reset_segment(volume, target, a)
    assert np.array_equal(_segment(segmentation, a, volume), propagated)
    with pytest.raises(MedSAM2ActionError, match="before propagating"):
        controller.propagate(volume, target, a)
    target.undo()  # the reset
    controller.propagate(volume, target, a)
    assert np.array_equal(_segment(segmentation, a, volume), propagated)


def test_only_typed_errors_become_sentences(mrml):
    volume, segmentation, target, controller = _setup(mrml, RecordingBackend())
    a = segmentation.GetSegmentation().AddEmptySegment("A")
    controller.add_prompt(volume, target, a, points_ras=_point(5), labels=[1])
    session = controller._sessions[(volume.GetID(), 0)].session
    for raised, expected in ((KeyError("obj"), KeyError), (MemoryError(), MedSAM2ActionError)):
        session.propagate = lambda *args, raised=raised, **kwargs: (_ for _ in ()).throw(raised)
        with pytest.raises(expected) as info:
            controller.propagate(volume, target, a)
        if expected is MedSAM2ActionError:
            assert "ran out of memory" in str(info.value)
    with pytest.raises(MedSAM2ActionError, match="outside the volume"):  # the engine's input error
        controller.add_prompt(volume, target, a, points_ras=_point(40), labels=[1])


# ---- the console API: the Segment Editor's history in the app, warnings, several segments ----
class SegmentEditorWidgetStandIn:
    """The `qMRMLSegmentEditorWidget` slots the console uses, and only those (a misspelt one fails): like the
    C++ widget, they drive one `vtkSlicerSegmentEditorLogic` and its history."""

    __slots__ = ("_logic", "_node")

    def __init__(self, segmentation, volume):
        self._logic = mrml_io.new_editor_logic(segmentation, volume)
        self._node = segmentation

    def saveStateForUndo(self):
        self._logic.SaveStateForUndo()

    def undo(self):
        self._logic.Undo()

    def redo(self):
        self._logic.Redo()

    def segmentationNode(self):
        return self._node

    def mrmlSegmentEditorNode(self):
        return self._logic.GetSegmentEditorNode()


def _open_in_segment_editor(monkeypatch, editor):
    """As the app's `slicer.modules.segmenteditor.widgetRepresentation().self().editor`."""
    module_widget = types.SimpleNamespace(editor=editor)
    representation = types.SimpleNamespace(self=lambda: module_widget)
    monkeypatch.setattr(slicer.modules, "segmenteditor",
                        types.SimpleNamespace(widgetRepresentation=lambda: representation), raising=False)


def _console(mrml):
    volume = scenarios.add_volume(shape_kji=SHAPE, ijk_to_ras=np.diag([1.0, 1.0, 2.0, 1.0]))
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    logic = MedSAM2SlicerLogic()
    logic.connect(engine=DiskEngine(radius=6, shrink=1))
    return volume, segmentation, logic


def test_console_and_segment_editor_share_one_history_and_the_model_follows(mrml, monkeypatch):
    volume, segmentation, logic = _console(mrml)
    editor = SegmentEditorWidgetStandIn(segmentation, volume)
    _open_in_segment_editor(monkeypatch, editor)
    region = segmentation.GetSegmentation().AddEmptySegment("Region")
    region_voxels = np.zeros(SHAPE, np.uint8)
    region_voxels[:, :, :20] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(region_voxels, segmentation, region, volume)
    editor.mrmlSegmentEditorNode().SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editor.mrmlSegmentEditorNode().SetMaskSegmentID(region)
    editor.mrmlSegmentEditorNode().SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    a = logic.segment(volume, segmentation, points_ras=_point(5), propagate=False)
    after_prompt = _segment(segmentation, a, volume).copy()
    assert not after_prompt[:, :, 20:].any() and after_prompt[5].any()  # the editor's masking applies
    logic.propagate(volume, segmentation, a)
    first = _segment(segmentation, a, volume).copy()
    logic.segment(volume, segmentation, a, points_ras=_point(8, 8.0, 8.0), propagate=True)  # a correction
    corrected = _segment(segmentation, a, volume).copy()
    assert not np.array_equal(first, corrected)
    editor.undo()  # Ctrl+Z in the Segment Editor: the correction's propagation
    editor.undo()  # and the correction
    assert np.array_equal(_segment(segmentation, a, volume), first)
    logic.redo(segmentation)  # the console redoes what the editor undid
    logic.undo(segmentation)
    logic.propagate(volume, segmentation, a)
    assert np.array_equal(_segment(segmentation, a, volume), first), "the undone correction came back"
    editor.undo()
    editor.undo()  # the console's first propagation, from the editor
    assert np.array_equal(_segment(segmentation, a, volume), after_prompt)


def test_console_actions_are_one_undo_step_each_when_nothing_is_read_between_them(mrml):
    """As a console script runs: no export between the actions. A new segment's colour was set lazily at its
    first export, after the undo; Slicer's history took that for an edit, dropped the redo and added an empty
    undo step."""
    volume, segmentation, logic = _console(mrml)
    a = logic.segment(volume, segmentation, points_ras=_point(5), propagate=False)
    logic.propagate(volume, segmentation, a)
    logic.segment(volume, segmentation, a, points_ras=_point(8, 8.0, 8.0), labels=[0], propagate=False)
    logic.propagate(volume, segmentation, a)
    colour = segmentation.GetSegmentation().GetSegment(a).GetColor()
    assert segmentation.GetDisplayNode() is not None and colour != (0.5, 0.5, 0.5)  # shown, in its own colour
    logic.undo(segmentation)
    logic.undo(segmentation)
    propagated = _segment(segmentation, a, volume).copy()
    assert np.array_equal(propagated, _expected_from({5: disk((32, 32), *CENTER, 6)}))
    logic.undo(segmentation)
    assert _segment(segmentation, a, volume).any(axis=(1, 2)).nonzero()[0].tolist() == [5]
    logic.redo(segmentation)  # after a read: the redo states are still there
    assert np.array_equal(_segment(segmentation, a, volume), propagated)


def test_segment_returns_its_id_with_the_oblique_and_random_weights_warnings(mrml, caplog):
    class RandomWeightsDisks(DiskEngine):
        def describe(self):
            return dict(super().describe(), random_weights=True)

    volume, segmentation, logic = _console(mrml)
    logic.connect(engine=RandomWeightsDisks(radius=6, shrink=1))
    tilt = np.radians(25)
    view = np.array([[1.0, 0, 0, 0], [0, np.cos(tilt), -np.sin(tilt), 0], [0, np.sin(tilt), np.cos(tilt), 10.0],
                     [0, 0, 0, 1]])  # 25 degrees off axial
    with caplog.at_level(logging.WARNING):
        segment_id = logic.segment(volume, segmentation, points_ras=[[16.0, 15.0, 10.0]], view=view,
                                   propagate=False)
    assert isinstance(segment_id, str) and segmentation.GetSegmentation().GetSegment(segment_id) is not None
    assert len(segment_id.warnings) == 2
    assert "25" in segment_id.warnings[0] and segment_id.warnings[1].startswith("RANDOM WEIGHTS")
    assert [r.getMessage() for r in caplog.records if "MedSAM2" in r.getMessage()] == [
        f"MedSAM2: {w}" for w in segment_id.warnings]
    assert segment_id.prompt.slice_index == 5 and segment_id.propagation is None


def test_propagate_all_takes_every_prompted_segment_and_one_undo(mrml):
    volume, segmentation, logic = _console(mrml)
    a = logic.segment(volume, segmentation, points_ras=_point(5, 8.0, 8.0), propagate=False)
    b = logic.segment(volume, segmentation, points_ras=_point(3, 24.0, 24.0), propagate=False)
    segmentation.GetSegmentation().AddEmptySegment("painted by hand")  # no MedSAM2 prompt: not propagated
    outcome = logic.propagate_all(volume, segmentation)
    assert set(outcome.segments) == {a, b}
    assert np.array_equal(_segment(segmentation, b, volume), _expected_from({3: disk((32, 32), 24, 24, 6)}))
    logic.undo(segmentation)
    assert _segment(segmentation, b, volume)[[0, 11]].sum() == 0
    logic.reset(segmentation, b)
    assert set(logic.propagate_all(volume, segmentation).segments) == {a}


def test_a_3d_roi_prompts_its_centre_slice_and_keeps_propagation_within_its_slices_plus_the_margin(mrml):
    volume = scenarios.add_volume(shape_kji=SHAPE, ijk_to_ras=np.array(  # I flipped, 2 mm slices
        [[-1.0, 0, 0, 31.0], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]]))
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = MedSAM2SlicerLogic()
    logic.connect(engine=DiskEngine(radius=6, shrink=1))
    roi = mrml.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(16.0, 15.0, 10.0)
    roi.SetSize(12.0, 12.0, 6.0)  # slices 3.5 .. 6.5: 4 .. 7 once rounded
    a = logic.segment(volume, segmentation, roi_node=roi, box_margin_mm=2.0)  # one slice of margin each way
    assert a.prompt.slice_index == 5 and a.prompt.slice_range == (3, 8)
    box = np.zeros(SHAPE[1:], bool)
    box[9:22, 9:22] = True  # I = 31 - x for x 10..22; J = y for y 9..21
    expected = np.zeros(SHAPE, bool)
    for k in range(3, 9):
        expected[k] = shrink_mask(box, abs(k - 5))
    assert np.array_equal(_segment(segmentation, a, volume) > 0, expected)
    logic.segment(volume, segmentation, a, points_ras=[[31.0 - 15.0, 15.0, 2.0 * 10]], propagate=True)
    widened = _segment(segmentation, a, volume) > 0  # a correction beyond the box widens the range to it
    assert widened[9].any() and widened[10].any() and not widened[11].any() and not widened[:3].any()
    logic.propagate(volume, segmentation, a, start=0, stop=11)  # a range of its own overrides the box's
    assert (_segment(segmentation, a, volume) > 0)[:3].any()
    flat = mrml.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    flat.SetCenter(16.0, 15.0, 10.0)
    flat.SetSize(12.0, 12.0, 1.0)  # thinner than a slice: a 2D box, propagation unlimited
    b = logic.segment(volume, segmentation, roi_node=flat)
    assert b.prompt.slice_range is None and (_segment(segmentation, b, volume) > 0)[[0, 11]].any()
    segments = segmentation.GetSegmentation().GetNumberOfSegments()
    points = mrml.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    with pytest.raises(MedSAM2ActionError, match="must be a markups ROI"):
        logic.segment(volume, segmentation, roi_node=points)
    outside = mrml.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    outside.SetCenter(16.0, 15.0, 80.0)
    outside.SetSize(12.0, 12.0, 6.0)
    with pytest.raises(MedSAM2ActionError, match="outside the image"):
        logic.segment(volume, segmentation, roi_node=outside)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == segments  # no empty segment left behind


def test_a_3d_roi_under_a_transform_on_an_oblique_volume_lands_on_the_voxels_it_spans(mrml):
    """The ROI is drawn in the volume's own voxel grid (its parent transform is the volume's IJK->world, itself
    under a transform), so the voxels it spans are known by hand on this oblique, flipped, anisotropic volume."""
    volume = scenarios.add_volume()  # (20, 40, 50), oblique
    moved = mrml.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    moved.SetMatrixTransformToParent(geometry.vtk_matrix(np.array(
        [[0.0, -1, 0, 5], [1, 0, 0, -3], [0, 0, 1, 7], [0, 0, 0, 1]])))
    volume.SetAndObserveTransformNodeID(moved.GetID())
    ijk_to_world = geometry.ijk_to_world_ras(volume)
    axis = geometry.choose_propagation_axis(ijk_to_world, geometry.view_slice_to_ras("axial")).axis
    grid = mrml.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    grid.SetMatrixTransformToParent(geometry.vtk_matrix(ijk_to_world))  # ROI coordinates = the volume's I, J, K
    roi = mrml.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetAndObserveTransformNodeID(grid.GetID())
    low_kji, high_kji = np.roll([4, 10, 12], axis), np.roll([8, 18, 30], axis)  # slices 4..8 along the axis
    roi.SetCenter(*((low_kji + high_kji) / 2)[::-1])
    roi.SetSize(*(high_kji - low_kji)[::-1])
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = MedSAM2SlicerLogic()
    logic.connect(engine=DiskEngine(radius=3, shrink=0))  # shrink 0: every propagated slice is the box again
    a = logic.segment(volume, segmentation, roi_node=roi, box_margin_mm=0.0)
    assert a.prompt.axis == axis and a.prompt.slice_index == 6 and a.prompt.slice_range == (4, 8)
    expected = np.zeros((20, 40, 50), bool)
    block = [slice(4, 9), slice(10, 19), slice(12, 31)]
    expected[tuple(np.roll(block, axis))] = True
    assert np.array_equal(_segment(segmentation, a, volume) > 0, expected)


def test_a_volume_is_copied_once_for_all_its_axes_and_again_only_when_its_voxels_change(mrml):
    backend = RecordingBackend()
    kept = []
    original = backend.open_session

    def keeping(volume_kji, *args, **kwargs):
        kept.append(volume_kji)
        return original(volume_kji, *args, **kwargs)

    backend.open_session = keeping
    volume, segmentation, target, controller = _setup(mrml, backend)
    a = segmentation.GetSegmentation().AddEmptySegment("A")
    controller.add_prompt(volume, target, a, points_ras=_point(5), labels=[1])
    controller.add_prompt(volume, target, a, points_ras=[[16.0, 15.0, 10.0]], labels=[1],
                          slice_to_ras=geometry.view_slice_to_ras("sagittal"))  # another axis: another session
    assert [o[2] for o in backend.opened] == [0, 2] and kept[0] is kept[1] and not kept[0].flags.writeable
    voxels = slicer.util.arrayFromVolume(volume)
    voxels[0, 0, 0] += 1
    slicer.util.arrayFromVolumeModified(volume)
    controller.add_prompt(volume, target, a, points_ras=_point(5), labels=[1])
    assert kept[2] is not kept[0] and kept[2][0, 0, 0] == voxels[0, 0, 0]  # the changed voxels, copied anew


def test_cancel_ends_an_openers_wait_for_a_busy_server(mrml):
    from medsam2_client import errors

    waiting, given = threading.Event(), []

    class BusyBackend(RecordingBackend):
        def open_session(self, volume_kji, spacing_kji, axis, preprocessing, fingerprint=None, cancel=None):
            given.append(cancel)
            waiting.set()
            assert cancel.wait(10)  # what the client's busy retry does with it
            raise errors.Cancelled("The server is busy (8 users are active). Waiting for room was cancelled.")

    volume, segmentation, target, controller = _setup(mrml, BusyBackend())
    opener = controller.session_opener(volume)
    failures = []

    def run():
        try:
            opener()
        except MedSAM2ActionError as error:
            failures.append(str(error))

    worker = threading.Thread(target=run)
    worker.start()
    assert waiting.wait(10)
    controller.cancel()  # the effect's Cancel, on the main thread
    worker.join(10)
    assert failures == ["Sending the volume failed: The server is busy (8 users are active). Waiting for room was "
                        "cancelled."]
    assert controller.session_opener(volume) is not None and not given[0].is_set()  # the next action waits again


@pytest.mark.sam2
def test_with_sam2_the_next_action_after_an_undo_is_exactly_as_if_the_undone_action_never_happened(mrml):
    """A correction on an already propagated slice is computed from that slice's tracked mask: the state an Undo
    returns to is rebuilt with its propagations, so what follows is what it would have been (random weights)."""
    from medsam2_backend.engine.model import load_model
    from medsam2_backend.engine.sam2_engine import Sam2Engine

    engine = Sam2Engine(load_model(random_weights=True, seed=0))
    rows, cols = np.ogrid[:40, :48]
    blob = ((rows - 20) ** 2 + (cols - 22) ** 2 < 120).astype(np.int16) * 300

    def scene():
        volume = slicer.util.addVolumeFromArray(np.stack([blob] * 6), np.diag([1.0, 1.0, 2.0, 1.0]))
        segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        target, controller = mrml_io.EditorLogicTarget(segmentation, volume), SessionController(
            InProcessBackend(engine), {"preset": "soft_tissue"})
        segment = segmentation.GetSegmentation().AddEmptySegment("A")
        controller.add_prompt(volume, target, segment, box_corners_ras=[[12.0, 10.0, 4.0], [32.0, 30.0, 4.0]])
        controller.propagate(volume, target, segment)
        controller.add_prompt(volume, target, segment, points_ras=[[22.0, 20.0, 8.0], [14.0, 12.0, 8.0]],
                              labels=[1, 0])  # a correction on slice 4, which the propagation tracked
        controller.propagate(volume, target, segment)
        return volume, segmentation, target, controller, segment

    volume, segmentation, target, controller, a = scene()
    controller.add_prompt(volume, target, a, points_ras=[[22.0, 20.0, 2.0]], labels=[0])  # slice 1: undone below
    controller.propagate(volume, target, a)
    target.undo()
    target.undo()
    controller.propagate(volume, target, a)
    after_undo = _segment(segmentation, a, volume)
    volume_b, segmentation_b, target_b, controller_b, b = scene()  # the same, without the undone actions
    controller_b.propagate(volume_b, target_b, b)
    assert after_undo.any() and np.array_equal(after_undo, _segment(segmentation_b, b, volume_b))


def test_listing_prompts_after_an_undo_rebuilds_nothing_and_the_gui_can_replay_off_the_main_thread(mrml):
    volume, segmentation, target, controller, a = _prompted_and_propagated(mrml)
    controller.add_prompt(volume, target, a, points_ras=_point(8, 8.0, 8.0), labels=[1])
    session = next(iter(controller._sessions.values())).session
    calls = []
    for name in ("add_prompt", "propagate"):
        original = getattr(session, name)
        setattr(session, name, lambda *args, _original=original, _name=name, **kwargs: (
            calls.append(_name), _original(*args, **kwargs))[1])
    target.undo()  # the correction
    assert [p.slice_index for p in controller.prompts(volume, a, target)] == [5] and calls == []
    replay = controller.replayer(volume, target)  # what the effect runs on its worker thread
    assert calls == [] and replay is not None
    replay()
    assert calls == ["add_prompt", "propagate"]  # the prompt, then the propagation the state had
    assert controller.replayer(volume, target) is None
    controller.propagate(volume, target, a)
    assert calls == ["add_prompt", "propagate", "propagate"]  # nothing replayed again


def test_cancel_stops_a_replay_and_the_next_action_replays_again(mrml):
    volume, segmentation, target, controller, a = _prompted_and_propagated(mrml)
    propagated = _segment(segmentation, a, volume).copy()
    controller.add_prompt(volume, target, a, points_ras=_point(8, 8.0, 8.0), labels=[1])
    target.undo()  # the correction
    session = next(iter(controller._sessions.values())).session
    original = session.propagate

    def cancelled_at_the_first_slice(*args, **kwargs):
        run = original(*args, **kwargs)

        def results():
            for result in run:
                controller.cancel()  # the user's Cancel while MedSAM2 goes back
                yield result
        return type("Run", (), {"cancel": run.cancel, "summary": property(lambda self: run.summary),
                                "__iter__": lambda self: results()})()

    session.propagate = cancelled_at_the_first_slice
    with pytest.raises(MedSAM2ActionError, match="was cancelled; the next action starts it again"):
        controller.replayer(volume, target)()
    session.propagate = original
    controller.propagate(volume, target, a)  # rebuilt from the start, then propagated
    assert np.array_equal(_segment(segmentation, a, volume), propagated)
    assert [p.slice_index for p in controller.prompts(volume, a, target)] == [5]
