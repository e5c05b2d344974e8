"""The session controller: session reuse, preprocessing, one object per segment, errors, cancel, exact voxels."""

import numpy as np
import pytest
import slicer

from medsam2_backend.engine import DiskEngine
from medsam2_backend.engine.test_engine import disk, shrink_mask
from medsam2_client import wire
from medsam2_client.errors import BackendUnavailable
from MedSAM2SlicerLib import mrml_io, scenarios
from MedSAM2SlicerLib.controller import MedSAM2ActionError, SessionController
from MedSAM2SlicerLib.logic import InProcessBackend

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
