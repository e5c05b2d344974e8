"""The engine's mask logits equal those of SAM-2's official SAM2VideoPredictor driven through its public API.

Same seeded random weights, same configuration (`SAM2_OVERRIDES`: corrections are conditioning frames), same
preprocessed frames, same prompts; fp32 on CPU. The reference gets its frames
through `init_state` on a folder of JPEG files (its only input path), after which its `images` are replaced by the
exact frames the engine feeds, so the comparison isolates propagation, memory and caching.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from sam2.build_sam import build_sam2_video_predictor

from synthetic_volumes import blob_volume
from medsam2_backend.engine import Preprocessing
from medsam2_backend.engine.model import SAM2_CONFIG, SAM2_OVERRIDES
from medsam2_backend.engine.sam2_engine import Sam2Engine

pytestmark = pytest.mark.sam2

TOL = 1e-3
PRE = Preprocessing(preset="soft_tissue")


@pytest.fixture(scope="module")
def volume():
    return blob_volume((6, 48, 64))


@pytest.fixture(scope="module")
def reference(sam2_model):
    ref = build_sam2_video_predictor(SAM2_CONFIG, None, device="cpu", hydra_overrides_extra=list(SAM2_OVERRIDES))
    assert type(ref).__name__ == "SAM2VideoPredictor"
    # configured as the engine is, or a correction test would compare two different algorithms
    assert ref.add_all_frames_to_correct_as_cond and sam2_model.predictor.add_all_frames_to_correct_as_cond
    ref.load_state_dict(sam2_model.predictor.state_dict())
    ref.fill_hole_area = 0  # needs SAM-2's CUDA extension, absent here (the engine does the same)
    return ref


@pytest.fixture()
def engine(sam2_model):
    return Sam2Engine(sam2_model)


def ref_state(ref, session, tmp_path):
    for k in range(session.num_slices):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{k:05d}.jpg")
    state = ref.init_state(str(tmp_path))
    state["images"] = torch.stack([session.frames[k] for k in range(session.num_slices)])
    state["video_height"], state["video_width"] = session.slice_shape
    state["cached_features"] = {}
    return state


def ref_logits(items, obj_index=0):
    return {k: masks[obj_index, 0].numpy() for k, _, masks in items}


def assert_same(ours: dict, theirs: dict):
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        diff = np.abs(ours[k] - theirs[k]).max()
        assert diff <= TOL, f"slice {k}: max |logit difference| {diff}"
    stack = np.stack([theirs[k] for k in sorted(theirs)])
    # Random weights give small logits; they must still vary far beyond the tolerance, across pixels and slices.
    assert stack.std(axis=(1, 2)).min() > 10 * TOL, "logits are flat on a slice: the comparison would prove nothing"
    assert np.abs(np.diff(stack, axis=0)).max() > 10 * TOL, "logits do not vary across slices"


def run_logits(run, obj_id=1):
    return {r.slice_index: r.logits for r in run if r.obj_id == obj_id}


BOX = np.array([16, 10, 48, 34], np.float32)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_one_direction_matches_reference(engine, reference, volume, tmp_path, direction):
    s = engine.open_session(volume, axis=0, preprocessing=PRE)
    prompt = s.add_prompt(1, 2, box=BOX)
    ours = run_logits(s.propagate(direction=direction))

    st = ref_state(reference, s, tmp_path)
    _, _, first = reference.add_new_points_or_box(st, 2, 1, box=BOX)
    assert np.abs(prompt.logits - first[0, 0].numpy()).max() <= TOL
    theirs = ref_logits(reference.propagate_in_video(st, reverse=direction == "backward"))
    assert_same(ours, theirs)


def test_two_way_matches_medsam2_flow(engine, reference, volume, tmp_path):
    """MedSAM2: prompt, propagate forward, reset, prompt again, propagate backward."""
    s = engine.open_session(volume, axis=0, preprocessing=PRE)
    s.add_prompt(1, 3, box=BOX)
    run = s.propagate(direction="both")
    ours = run_logits(run)
    assert run.planned == s.num_slices == run.summary.slices_done

    st = ref_state(reference, s, tmp_path)
    reference.add_new_points_or_box(st, 3, 1, box=BOX)
    theirs = ref_logits(reference.propagate_in_video(st))
    reference.reset_state(st)
    reference.add_new_points_or_box(st, 3, 1, box=BOX)
    theirs.update(ref_logits(reference.propagate_in_video(st, reverse=True)))
    assert_same(ours, theirs)


def test_correction_then_repropagation_matches_and_never_reencodes(engine, reference, volume, tmp_path):
    s = engine.open_session(volume, axis=0, preprocessing=PRE)
    s.add_prompt(1, 1, box=BOX)
    list(s.propagate(direction="forward"))
    misses = s.cache.misses
    pts, labels = np.array([[30, 20], [50, 40]], np.float32), np.array([1, 0], np.int32)
    fix = s.add_prompt(1, 3, points=pts, labels=labels)
    run = s.propagate(direction="forward")
    assert [p.first for p in run.passes] == [3], "only the affected range is re-propagated"
    ours = run_logits(run)
    assert s.cache.misses == misses, "a correction and its re-propagation must not re-encode any slice"

    st = ref_state(reference, s, tmp_path)
    reference.add_new_points_or_box(st, 1, 1, box=BOX)
    list(reference.propagate_in_video(st))
    _, _, ref_fix = reference.add_new_points_or_box(st, 3, 1, points=pts, labels=labels, clear_old_points=False)
    assert np.abs(fix.logits - ref_fix[0, 0].numpy()).max() <= TOL
    theirs = ref_logits(reference.propagate_in_video(st, start_frame_idx=3))
    assert_same(ours, theirs)


def test_two_objects_match_reference(engine, reference, volume, tmp_path):
    s = engine.open_session(volume, axis=0, preprocessing=PRE)
    s.add_prompt(1, 2, box=BOX)
    s.add_prompt(2, 2, points=np.array([[10, 8]], np.float32), labels=np.array([1]))
    results = list(s.propagate(direction="forward"))
    st = ref_state(reference, s, tmp_path)
    reference.add_new_points_or_box(st, 2, 1, box=BOX)
    reference.add_new_points_or_box(st, 2, 2, points=np.array([[10, 8]], np.float32), labels=np.array([1]))
    items = list(reference.propagate_in_video(st))
    for obj_id, obj_index in ((1, 0), (2, 1)):
        ours = {r.slice_index: r.logits for r in results if r.obj_id == obj_id}
        assert_same(ours, ref_logits(items, obj_index))


def test_backward_corrections_match_reference(engine, reference, volume, tmp_path):
    """Two corrections on the backward side, the nearer one second, then one re-propagation."""
    s = engine.open_session(volume, axis=0, preprocessing=PRE)
    s.add_prompt(1, 4, box=BOX)
    list(s.propagate(direction="backward"))
    pts, labels = np.array([[30, 20], [50, 40]], np.float32), np.array([1, 0], np.int32)
    fixes = [s.add_prompt(1, 1, points=pts, labels=labels), s.add_prompt(1, 3, points=pts[:1], labels=labels[:1])]
    run = s.propagate(direction="backward")
    assert [(p.first, p.last) for p in run.passes] == [(3, 0)]
    ours = run_logits(run)

    st = ref_state(reference, s, tmp_path)
    reference.add_new_points_or_box(st, 4, 1, box=BOX)
    list(reference.propagate_in_video(st, reverse=True))
    ref_fixes = [reference.add_new_points_or_box(st, 1, 1, points=pts, labels=labels, clear_old_points=False),
                 reference.add_new_points_or_box(st, 3, 1, points=pts[:1], labels=labels[:1], clear_old_points=False)]
    for fix, (_, _, ref_fix) in zip(fixes, ref_fixes):
        assert np.abs(fix.logits - ref_fix[0, 0].numpy()).max() <= TOL
    theirs = ref_logits(reference.propagate_in_video(st, start_frame_idx=3, reverse=True))
    assert_same(ours, theirs)
    for fix in fixes:  # and the user's check, which the reference alone cannot make
        np.testing.assert_allclose(ours[fix.slice_index], fix.logits, atol=1e-6)
