"""One copy of a volume, whatever the number of sessions and axes on it (issue 10, item 7).

Opening a session on another propagation axis must not allocate another volume: not on the server (sessions of
one fingerprint share its array; the intensity range is found without copying the voxels), not in the client
(sessions of one fingerprint keep one array). Allocations are counted with tracemalloc, which numpy reports to.
"""

import gc
import tracemalloc
import warnings
import weakref

import numpy as np
import pytest

from medsam2_backend.engine import DiskEngine, Preprocessing
from medsam2_backend.engine.preprocess import intensity_range
from medsam2_backend.engine.sam2_engine import Sam2Engine
from medsam2_backend.server.sessions import SessionManager
from medsam2_client import MedSAM2Client, wire
from server_helpers import random_volume, thread_server

DTYPES = (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.float32, np.float64)


def volumes(dtype, rng):
    """Full-range values, sparse ones, one voxel, a few values repeated, the type's extremes (overflow)."""
    shape = (5, 7, 9)
    if np.dtype(dtype).kind == "f":
        full = (rng.standard_normal(shape) * 10.0 ** rng.integers(-30, 30)).astype(dtype)
        low, high = np.finfo(dtype).min, np.finfo(dtype).max
    else:
        low, high = np.iinfo(dtype).min, np.iinfo(dtype).max
        full = rng.integers(low, high, shape, endpoint=True, dtype=np.int64 if dtype != np.uint32 else np.uint64)
    sparse = np.where(rng.random(shape) < 0.05, full, 0)
    single = np.zeros(shape)
    single[2, 3, 4] = high
    extremes = np.full(shape, low)
    extremes[-1, -1, -1] = high
    repeated = rng.integers(-3, 4, shape).clip(max(low, -3))
    return [np.asarray(v).astype(dtype) for v in (full, sparse, single, extremes, repeated)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
def test_the_intensity_range_is_numpys_percentile_of_the_nonzero_voxels(dtype):
    rng = np.random.default_rng(7)
    for volume in volumes(dtype, rng):
        for q in [(0.5, 99.5), (0.0, 100.0), tuple(sorted(rng.uniform(0, 100, 2)))]:
            nonzero = volume[volume != 0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy's own arithmetic may overflow at the type's extremes
                want = tuple(float(x) for x in np.percentile(nonzero, q)) if nonzero.size else (0.0, 1.0)
            assert intensity_range(volume, Preprocessing(percentiles=q)) == want


def allocated_while(call):
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_another_axis_on_an_uploaded_volume_allocates_no_second_volume(sam2_model, dtype):
    volume = random_volume((128, 256, 256), dtype=dtype)
    manager = SessionManager(Sam2Engine(sam2_model), max_sessions=3)
    fp = wire.fingerprint(volume)
    manager.add_volume(fp, volume, manager.admit_volume(volume.nbytes))
    sessions = []
    for axis in (0, 1, 2):
        s, peak = allocated_while(lambda: manager.create(volume, fp, (1.0, 1.0, 1.0), axis, None))
        # Percentile scaling reads every voxel; what it allocates is a slab's temporaries, not a volume.
        assert peak < volume.nbytes / 4, f"axis {axis}: {peak / volume.nbytes:.2f} volumes allocated"
        sessions.append(s)
    assert all(s.engine_session.frames.volume is volume for s in sessions)
    assert manager.memory_bytes() == volume.nbytes  # counted once, too


def test_client_sessions_of_one_volume_keep_one_array():
    volume = random_volume((12, 20, 24))
    with thread_server(DiskEngine(radius=3)) as (url, _):
        client = MedSAM2Client(url)
        first = client.open_session(volume.copy(), axis=0)
        second_copy = volume.copy()
        gone = weakref.ref(second_copy)
        second = client.open_session(second_copy, axis=2)
        del second_copy
        gc.collect()
        assert second._volume is first._volume and gone() is None  # the caller's copy is not kept
        assert (first.uploads, second.uploads) == (1, 0)
        assert second.add_prompt(1, 3, box=(2, 2, 8, 8)).mask.shape == (12, 20)
