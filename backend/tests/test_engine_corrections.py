"""Corrections stick: what a user checks after clicking on a tracked slice and propagating again (SAM-2 engine).

A correction on slice c is a conditioning frame of its side's tracking state, so re-propagation keeps the mask the
prompt call returned on c, steers every slice beyond c, and leaves the slices between the anchor and c alone.
Random weights: the masks mean nothing, but they depend on the memory, which is what these tests look at.
"""

import numpy as np
import pytest

from medsam2_backend.engine import Preprocessing
from medsam2_backend.engine.model import load_model
from medsam2_backend.engine.sam2_engine import Sam2Engine
from synthetic_volumes import blob_volume

pytestmark = pytest.mark.sam2

PRE = Preprocessing(preset="soft_tissue")
BOX = np.array([16, 10, 48, 34], np.float32)
FIX_POINTS = np.array([[40, 30], [24, 16]], np.float32)  # a positive and a negative click
FIX_LABELS = np.array([1, 0], np.int32)


@pytest.fixture(scope="module")
def volume():
    return blob_volume((9, 48, 64))


def tracked(sam2_model, volume, anchor=4):
    s = Sam2Engine(sam2_model).open_session(volume, preprocessing=PRE)
    s.add_prompt(1, anchor, box=BOX)
    first = {r.slice_index: r for r in s.propagate()}
    return s, first


def logits_differ(a, b, tol=1e-3):
    return float(np.abs(a.logits - b.logits).max()) > tol


def assert_correction_kept(session, results, fix):
    """The user's check: after re-propagation the corrected slice shows what the click showed."""
    np.testing.assert_array_equal(results[fix.slice_index].mask, fix.mask)
    np.testing.assert_array_equal(session.object_mask(1)[fix.slice_index], fix.mask)


@pytest.mark.parametrize("side", ["forward", "backward"])
def test_a_correction_survives_repropagation_and_steers_the_slices_beyond(sam2_model, volume, side):
    s, first = tracked(sam2_model, volume)
    c, beyond, between = (6, (7, 8), (5,)) if side == "forward" else (2, (1, 0), (3,))
    fix = s.add_prompt(1, c, points=FIX_POINTS, labels=FIX_LABELS)
    assert (fix.mask != first[c].mask).any(), "the click must change the slice, or the test proves nothing"
    run = s.propagate()
    assert [(p.direction, p.first) for p in run.passes] == [(side, c)]
    results = {r.slice_index: r for r in run}
    assert_correction_kept(s, results, fix)
    assert all(logits_differ(results[k], first[k]) for k in beyond), "the correction must reach the memory"
    for k in between:  # not re-tracked: the slices the user already accepted keep their masks
        np.testing.assert_array_equal(s.object_mask(1)[k], first[k].mask)


def test_two_corrections_on_one_side_in_any_order_both_stick(sam2_model, volume):
    s, first = tracked(sam2_model, volume, anchor=1)
    far = s.add_prompt(1, 6, points=FIX_POINTS, labels=FIX_LABELS)
    near = s.add_prompt(1, 3, box=[20, 14, 44, 30])  # the nearer one second: re-tracking starts there
    run = s.propagate()
    assert [(p.direction, p.first) for p in run.passes] == [("forward", 3)]
    results = {r.slice_index: r for r in run}
    assert_correction_kept(s, results, near)
    assert_correction_kept(s, results, far)
    np.testing.assert_array_equal(s.object_mask(1)[2], first[2].mask)
    assert logits_differ(results[7], first[7])
    # a third round: a click on a slice the corrections steered, and both earlier corrections still hold
    again = s.add_prompt(1, 5, points=FIX_POINTS[:1], labels=FIX_LABELS[:1])
    results = {r.slice_index: r for r in s.propagate()}
    assert_correction_kept(s, results, again)
    for fix in (near, far):
        np.testing.assert_array_equal(s.object_mask(1)[fix.slice_index], fix.mask)


def test_a_mask_correction_sticks(sam2_model, volume):
    s, first = tracked(sam2_model, volume)
    painted = np.zeros((48, 64), bool)
    painted[12:30, 20:50] = True
    fix = s.add_prompt(1, 7, mask=painted)
    results = {r.slice_index: r for r in s.propagate()}
    assert_correction_kept(s, results, fix)
    assert logits_differ(results[8], first[8])


def test_postprocessing_never_changes_a_prompted_or_corrected_slice(sam2_model, volume):
    s, _ = tracked(sam2_model, volume)
    painted = np.zeros((48, 64), bool)
    painted[10:30, 10:30] = True
    painted[15:20, 15:20] = False  # a hole the user left on purpose
    painted[40:44, 55:60] = True  # and an island
    fix = s.add_prompt(1, 6, mask=painted)
    results = list(s.propagate(postprocess=("largest_component", "fill_holes")))
    assert not any(r.stage == "postprocess" and r.slice_index in (4, 6) for r in results)
    np.testing.assert_array_equal(s.object_mask(1)[6], fix.mask)


def test_replaying_the_calls_with_their_propagations_on_the_same_session_gives_the_same_masks():
    """What an exact Undo replay relies on: the object reset, then the same add_prompt and propagate calls in order,
    on the same session (its cache now warm), give every mask bit for bit. In bf16, where a cached slice once came
    back cast and so gave another mask than its first encoding."""
    s = Sam2Engine(load_model(random_weights=True, seed=0, precision="bf16")).open_session(
        blob_volume((5, 48, 64)), preprocessing=PRE)

    def history():
        s.add_prompt(1, 1, box=BOX)
        first = {r.slice_index: r.logits for r in s.propagate(direction="forward")}
        fix = s.add_prompt(1, 3, points=FIX_POINTS, labels=FIX_LABELS)
        again = {r.slice_index: r.logits for r in s.propagate(direction="forward")}
        return first, fix.logits, again, s.object_mask(1).copy()

    (first, fix, again, mask) = history()
    s.reset_object(1)
    (first_r, fix_r, again_r, mask_r) = history()
    for ours, theirs in ((first_r, first), (again_r, again)):
        assert sorted(ours) == sorted(theirs)
        for k in theirs:
            np.testing.assert_array_equal(ours[k], theirs[k])
    np.testing.assert_array_equal(fix_r, fix)
    np.testing.assert_array_equal(mask_r, mask)
