"""Prompt/propagation semantics shared by every engine, checked with the deterministic disk engine."""

import numpy as np
import pytest

from medsam2_backend.engine import DiskEngine, EngineInputError
from medsam2_backend.engine.test_engine import shrink_mask

VOL = np.zeros((20, 40, 50), np.int16)


def session(radius=10.0, shrink=2.0, axis=0, vol=VOL):
    return DiskEngine(radius=radius, shrink=shrink).open_session(vol, axis=axis)


def box_mask(shape, x0, y0, x1, y1):
    m = np.zeros(shape, bool)
    m[y0:y1 + 1, x0:x1 + 1] = True
    return m


def test_prompt_returns_slice_mask_at_once_and_propagation_covers_both_ways():
    s = session()
    r = s.add_prompt(1, 10, box=[5, 4, 25, 30])
    assert r.stage == "prompt" and np.array_equal(r.mask, box_mask((40, 50), 5, 4, 25, 30))
    run = s.propagate()
    assert run.planned == 20
    results = list(run)
    assert sorted(x.slice_index for x in results) == list(range(20))
    by_slice = {x.slice_index: x for x in results}
    for k in (3, 12, 17):
        assert np.array_equal(by_slice[k].mask, shrink_mask(r.mask, 2.0 * abs(k - 10)))
    assert run.summary.slices_done == 20 and not run.summary.cancelled
    # least certain = farthest from the prompt (the engine's IoU falls with distance)
    assert [k for k, _ in run.summary.least_certain[1][:1]] == [0]
    assert np.array_equal(s.object_mask(1)[12], by_slice[12].mask)


def test_correction_repropagates_only_its_side_from_the_corrected_slice():
    s = session(shrink=1.0)
    s.add_prompt(1, 10, box=[5, 4, 25, 30])
    list(s.propagate())
    before = s.object_mask(1).copy()
    fix = s.add_prompt(1, 14, points=[[40, 20]], labels=[1])
    assert s.prompts(1)[14].points.tolist() == [[40, 20]]
    run = s.propagate()
    assert [(p.direction, p.first, p.last) for p in run.passes] == [("forward", 14, 19)]
    results = {x.slice_index: x.mask for x in run}
    assert sorted(results) == list(range(14, 20))
    after = s.object_mask(1)
    assert np.array_equal(after[:14], before[:14]), "slices before the correction keep their masks"
    assert np.array_equal(after[16], shrink_mask(fix.mask, 2.0))
    # adding a point to the same slice merges with what is there; replace starts over
    both = s.add_prompt(1, 14, points=[[10, 35]], labels=[1])
    assert both.mask[20, 40] and both.mask[35, 10]
    only = s.add_prompt(1, 14, points=[[10, 35]], labels=[1], replace=True)
    assert not only.mask[20, 40] and only.mask[35, 10]


def test_backward_correction_and_range_limits():
    s = session()
    s.add_prompt(1, 10, box=[5, 4, 25, 30])
    run = s.propagate(start=6, stop=12)
    assert sorted(x.slice_index for x in run) == list(range(6, 13))
    s.add_prompt(1, 7, box=[0, 0, 30, 30])
    # the correction re-runs its side from it; beyond the first range nothing was computed: it runs from there
    assert [(p.direction, p.first, p.last) for p in s.propagate(start=2).passes] == [
        ("forward", 13, 19), ("backward", 7, 2)]
    list(s.propagate(start=2))
    assert [(p.direction, p.first, p.last) for p in s.propagate().passes] == [("backward", 1, 0)]
    list(s.propagate())
    # nothing stale: an explicit propagate re-runs the requested sides from the anchor
    assert [(p.direction, p.first) for p in s.propagate().passes] == [("forward", 10), ("backward", 10)]


def test_a_correction_beyond_a_limited_range_leaves_no_gap():
    s = session(shrink=1.0)
    first = s.add_prompt(1, 10, box=[5, 4, 25, 30]).mask
    list(s.propagate(stop=12))
    s.add_prompt(1, 15, points=[[40, 20]], labels=[1])
    results = {x.slice_index: x.mask for x in s.propagate()}
    assert sorted(results) == list(range(13, 20)), "slices 13 and 14 were never computed: they must be now"
    assert np.array_equal(results[13], shrink_mask(first, 3.0))


def test_stop_after_empty_slices_clears_what_lies_beyond():
    s = session(shrink=4.0)
    s.add_prompt(1, 5, box=[10, 10, 30, 30])  # 21 px wide: gone after ~3 slices at 4 px/slice
    s._masks[1][15] = True  # what an earlier run might have left
    run = s.propagate(direction="forward", stop_after_empty=2)
    results = list(run)
    stop = run.summary.stopped_early[(1, "forward")]
    assert stop < 19
    tracked = [x for x in results if x.stage == "propagate"]
    assert not tracked[-1].mask.any() and not tracked[-2].mask.any() and tracked[-3].mask.any()
    cleared = [x.slice_index for x in results if x.stage == "cleared"]
    assert cleared == list(range(stop + 1, 20))
    assert not s.object_mask(1)[15].any()


def test_cancel_stops_between_slices_and_keeps_the_side_dirty():
    s = session()
    s.add_prompt(1, 0, box=[5, 5, 30, 30])
    run = s.propagate()
    seen = []
    for x in run:
        seen.append(x.slice_index)
        if len(seen) == 3:
            run.cancel()
    assert seen == [0, 1, 2] and run.summary.cancelled and run.summary.slices_done == 3
    assert [(p.first, p.last) for p in s.propagate().passes] == [(0, 19), (0, 0)]


def test_two_objects_are_independent():
    s = session()
    s.add_prompt(1, 10, box=[0, 0, 10, 10])
    s.add_prompt(2, 4, box=[30, 20, 45, 35])
    assert s.working_bytes() == 2 * VOL.size  # one bool mask volume per object
    results = list(s.propagate(obj_ids=[2]))
    assert {x.obj_id for x in results} == {2}
    assert not s.object_mask(1)[4].any() and s.object_mask(2)[4, 25, 35]
    s.reset_object(2)
    assert s.object_ids == [1]


def test_postprocess_keeps_largest_component_and_fills_holes():
    s = session(radius=3.0, shrink=0.0)
    mask = np.zeros((40, 50), bool)
    mask[5:25, 5:25] = True
    mask[10:15, 10:15] = False  # a hole
    mask[30:33, 40:43] = True  # a small separate island
    s.add_prompt(1, 10, mask=mask)
    results = list(s.propagate(start=8, stop=12, postprocess=("largest_component", "fill_holes")))
    post = [x for x in results if x.stage == "postprocess"]
    assert s.propagate(start=8, stop=12).planned == 5 and results and len(results) == 9
    assert sorted(x.slice_index for x in post) == [8, 9, 11, 12], "the prompted slice is the user's: kept"
    np.testing.assert_array_equal(s.object_mask(1)[10], mask)
    final = s.object_mask(1)[11]
    assert final[12, 12] and not final[31, 41] and final.sum() == 400


@pytest.mark.parametrize("axis", [1, 2])
def test_any_axis_equals_transposed_volume(axis):
    rng = np.random.default_rng(1)
    vol = rng.integers(-100, 100, (12, 30, 34)).astype(np.int16)
    ref = session(axis=0, vol=vol)
    ref.add_prompt(1, 6, box=[3, 4, 20, 25])
    list(ref.propagate())
    moved = np.moveaxis(vol, 0, axis)
    s = session(axis=axis, vol=moved)
    assert np.array_equal(s.slice_image(6), vol[6])
    s.add_prompt(1, 6, box=[3, 4, 20, 25])
    list(s.propagate())
    assert np.array_equal(s.object_mask(1), np.moveaxis(ref.object_mask(1), 0, axis))


@pytest.mark.parametrize("kwargs, message", [
    (dict(obj_id=1, slice_index=20, box=[1, 1, 5, 5]), "outside the volume"),
    (dict(obj_id=1, slice_index=-1, box=[1, 1, 5, 5]), "outside the volume"),
    (dict(obj_id=1, slice_index=2.5, box=[1, 1, 5, 5]), "whole number"),
    (dict(obj_id=-3, slice_index=2, box=[1, 1, 5, 5]), "object id"),
    (dict(obj_id=1, slice_index=2, box=[9, 1, 5, 5]), "reversed"),
    (dict(obj_id=1, slice_index=2, box=[1, 1, 60, 5]), "outside the slice"),
    (dict(obj_id=1, slice_index=2, box=[1, 2, 3]), "four numbers"),
    (dict(obj_id=1, slice_index=2, points=[[50, 10]], labels=[1]), r"Point \(50, 10\) is outside the slice"),
    (dict(obj_id=1, slice_index=2, points=[[np.nan, 10]], labels=[1]), "NaN"),
    (dict(obj_id=1, slice_index=2, points=[[5, 10]], labels=[2]), "one label per point"),
    (dict(obj_id=1, slice_index=2, points=[[5, 10]]), "go together"),
    (dict(obj_id=1, slice_index=2), "needs points, a box or a mask"),
    (dict(obj_id=1, slice_index=2, mask=np.ones((4, 4), bool)), "slice's shape"),
    (dict(obj_id=1, slice_index=2, mask=np.ones((40, 50), bool), box=[1, 1, 5, 5]), "cannot be combined"),
])
def test_bad_prompts_get_clear_errors_and_change_nothing(kwargs, message):
    s = session()
    with pytest.raises(EngineInputError, match=message):
        s.add_prompt(**kwargs)
    assert s.object_ids == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(direction="up"), "Unknown direction"),
    (dict(start=15, stop=3), "range is empty"),
    (dict(stop_after_empty=0), "at least 1"),
    (dict(obj_ids=[7]), "Object 7 has no prompt"),
    (dict(postprocess=["smooth"]), "Unknown post-processing"),
])
def test_bad_propagation_options(kwargs, message):
    s = session()
    with pytest.raises(EngineInputError, match="Nothing to propagate"):
        s.propagate()
    s.add_prompt(1, 2, box=[1, 1, 5, 5])
    with pytest.raises(EngineInputError, match=message):
        s.propagate(**kwargs)


def test_bad_session_arguments():
    with pytest.raises(EngineInputError, match="axis"):
        session(axis=3)
    with pytest.raises(EngineInputError, match="spacing"):
        DiskEngine().open_session(VOL, spacing=(1, 0, 1))
