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


def state_tensor_bytes(es) -> int:
    """The memory features and mask logits SAM-2 keeps per tracked slice, read from the states themselves."""
    total = 0
    for states in es._states.values():
        for state in states.values():
            for outputs in state["output_dict_per_obj"][0].values():
                for out in outputs.values():
                    total += out["maskmem_features"].nbytes + out["pred_masks"].nbytes
    return total


def propagate(manager, s):
    with manager.use(s.id):
        s.run = run = manager.plan_propagation(s, None)
        return list(run)


def test_tracking_states_count_against_the_budget(sam2_model):
    volume = random_volume((4, 40, 48))
    manager = SessionManager(Sam2Engine(sam2_model), max_sessions=1, memory_budget_bytes=1 << 30)
    s = open_on(manager, volume)
    es = s.engine_session
    with manager.use(s.id), manager.admit_object(s, 1):
        es.add_prompt(1, 1, box=(10, 10, 30, 30))
    after_prompt = es.tracking_bytes()
    assert 0 < after_prompt <= es.prompt_growth_bytes()
    bound = es.propagation_growth_bytes(es.propagate().passes)
    assert len(propagate(manager, s)) == 4
    grown = es.tracking_bytes() - after_prompt
    # Every tracked slice keeps its memory features and mask logits: 5 slice states (the prompted slice on both
    # sides), each at least 64 x 32 x 32 bfloat16 features; the bound held while it ran covers what it added.
    assert es.tracking_bytes() >= state_tensor_bytes(es) >= 5 * 64 * 32 * 32 * 2
    assert 0 < grown <= bound < 2 * grown
    masks = volume.size  # one bool per voxel for the one object
    assert manager.memory_bytes() == volume.nbytes + masks + s.cache.nbytes + es.tracking_bytes()
    assert manager.stats()["reserved_bytes"] == 0


def test_growth_that_cannot_fit_is_refused_after_the_feature_cache_shrinks(sam2_model):
    manager = SessionManager(Sam2Engine(sam2_model), max_sessions=1, memory_budget_bytes=1 << 30)
    s = open_on(manager, random_volume((4, 40, 48)))
    es = s.engine_session
    with manager.use(s.id), manager.admit_object(s, 1):
        es.add_prompt(1, 1, box=(10, 10, 30, 30))
    propagate(manager, s)
    entry = s.cache.nbytes // len(s.cache)
    assert len(s.cache) == 4
    # A second object fits only if the cache gives up a slice's features: it does, and the server stays within.
    with manager.use(s.id), manager.admit_object(s, 2):
        es.add_prompt(2, 1, box=(12, 12, 28, 28))
    growth = es.propagation_growth_bytes(es.propagate([2]).passes)
    manager.memory_budget_bytes = budget = manager.memory_bytes() - entry + growth
    with manager.use(s.id):
        s.run = run = manager.plan_propagation(s, [2])
        assert s.cache.nbytes <= 3 * entry
        assert len(list(run)) == 4
    assert manager.memory_bytes() <= budget and manager.stats()["reserved_bytes"] == 0
    # A third object's propagation cannot fit even with the cache at its floor: refused with a sentence.
    with manager.use(s.id), manager.admit_object(s, 3):
        es.add_prompt(3, 2, box=(12, 12, 28, 28))
    growth = es.propagation_growth_bytes(es.propagate([3]).passes)
    cached = s.cache.nbytes
    manager.memory_budget_bytes = manager.memory_bytes() - cached + growth - 1
    with manager.use(s.id), pytest.raises(ApiError, match="no room for this propagation's tracking states") as e:
        manager.plan_propagation(s, [3])
    assert e.value.code == "too_large" and s.cache.nbytes < cached
    assert manager.stats()["reserved_bytes"] == 0 and s.growth is None
    assert es.add_prompt(3, 2, box=(10, 10, 30, 30)).mask.shape == (40, 48)  # the session still works
