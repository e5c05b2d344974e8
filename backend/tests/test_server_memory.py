"""The session manager's memory admission with SAM-2's feature cache (random weights): caches shrink before
anything is refused, and a session's cache budget derives from the server's."""

import pytest

from medsam2_backend.engine.sam2_engine import Sam2Engine
from medsam2_backend.server.errors import ApiError
from medsam2_backend.server.sessions import SessionManager
from server_helpers import random_volume

MIB = 1 << 20


def open_on(manager, volume):
    from medsam2_client import wire

    fp = wire.fingerprint(volume)
    manager.add_volume(fp, volume, manager.admit_volume(volume.nbytes))
    return manager.create(volume, fp, (1.0, 1.0, 1.0), 0, None)


def test_feature_caches_shrink_before_anything_is_refused(sam2_model):
    budget = 400 * MIB
    manager = SessionManager(Sam2Engine(sam2_model, cache_budget_bytes=1 << 30), max_sessions=2,
                             memory_budget_bytes=budget, eviction_grace_s=60)
    s = open_on(manager, random_volume((4, 48, 48)))
    assert s.cache.budget_bytes == budget // 2  # the server's share, not the engine's 1 GiB
    with manager.use(s.id):
        s.engine_session.add_prompt(1, 0, box=(10, 10, 30, 30))
        manager.grant_cache(s)
        s.run = run = s.engine_session.propagate()
        assert len(list(run)) == 4
    cached = s.cache.nbytes
    assert len(s.cache) == 4 and cached > 4 * MIB
    assert manager.memory_bytes() <= budget
    # Another volume that fits only if the (idle, recently used) session's cache gives room: it does.
    need = budget - manager.memory_bytes() + cached // 2
    with manager.admit_volume(need):
        assert 0 < s.cache.nbytes <= cached - cached // 2
        assert manager.stats()["sessions"] == 1 and manager.memory_bytes() <= budget
        # More than the whole cache can give, while its session is within its grace period: busy, not evicted.
        with pytest.raises(ApiError, match="busy: 1 user is active") as refused:
            manager.admit_volume(budget - manager.memory_bytes() + s.cache.nbytes + MIB)
        assert refused.value.headers["Retry-After"] and manager.stats()["sessions"] == 1
    assert manager.stats()["reserved_bytes"] == 0
    assert s.engine_session.add_prompt(1, 2, box=(10, 10, 30, 30)).slice_index == 2  # the session still works
