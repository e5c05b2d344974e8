"""Several segments in one propagation, in process and through client + server: every object's slices arrive,
interleaved by slice, each with its obj_id, and equal a propagation of that object alone (disk engine)."""

import numpy as np

from medsam2_backend.engine import DiskEngine
from medsam2_client import MedSAM2Client
from server_helpers import random_volume, thread_server

PROMPTS = {1: (4, dict(box=[2, 3, 20, 24])), 2: (9, dict(box=[22, 10, 40, 30])), 3: (9, dict(points=[[30, 8]],
                                                                                             labels=[1]))}


def alone(volume):
    s = DiskEngine(radius=5, shrink=1).open_session(volume)
    masks = {}
    for obj_id, (k, prompt) in PROMPTS.items():
        s.add_prompt(obj_id, k, **prompt)
        masks.update({(r.obj_id, r.slice_index): r.mask for r in s.propagate([obj_id])})
    return masks


def test_three_segments_in_one_propagation_equal_three_alone_in_process():
    volume = random_volume((14, 36, 44))
    s = DiskEngine(radius=5, shrink=1).open_session(volume)
    for obj_id, (k, prompt) in PROMPTS.items():
        s.add_prompt(obj_id, k, **prompt)
    run = s.propagate([1, 2, 3])
    results = list(run)
    assert run.planned == len(results) == 3 * 14 and run.summary.slices_done == 3 * 14
    assert {(r.obj_id, r.slice_index) for r in results} == set(alone(volume))
    for r in results:
        np.testing.assert_array_equal(r.mask, alone(volume)[(r.obj_id, r.slice_index)])
    # lockstep: the forward sweep pauses at the highest anchor (9), the backward sweep runs, then forward goes on
    order = [r.slice_index for r in results]
    assert order[:4] == [4, 5, 6, 7] and order.index(13) > order.index(0)
    assert set(run.summary.least_certain) == {1, 2, 3}


def test_three_segments_through_the_server():
    volume = random_volume((14, 36, 44))
    expected = alone(volume)
    with thread_server(DiskEngine(radius=5, shrink=1)) as (url, _):
        s = MedSAM2Client(url, timeout=10).open_session(volume)
        for obj_id, (k, prompt) in PROMPTS.items():
            s.add_prompt(obj_id, k, **prompt)
        run = s.propagate([1, 2, 3])
        got = {(m.obj_id, m.slice_index): m.mask for m in run}
        assert run.planned == 3 * 14 and sorted(got) == sorted(expected)
        for key, mask in got.items():
            np.testing.assert_array_equal(mask, expected[key])
        assert set(run.summary.least_certain) == {1, 2, 3}
