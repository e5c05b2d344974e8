"""The server's sessions: one volume each, bounded in number, idle time and memory - admitted before allocation.

A session is used by one request at a time (its own lock); the engine serialises model work of all sessions
itself (the SAM-2 engine holds one lock for the accelerator around each slice), so concurrent sessions never
interleave inside the model, and nothing here blocks the server's event loop on it.

Memory is admitted, not discovered: an upload's declared size, a new object's masks, what a prompt or a
propagation adds to the engine's tracking states (its bound, held while it runs; the engine measures what they
hold after) and a propagation's feature cache are reserved against the budget before anything is allocated
(uploads in flight count too). To make room,
spare volumes go first, then idle sessions' feature caches shrink, then sessions idle for longer than the eviction
grace period are evicted (least recently used first). A session used within the grace period is never evicted: the
newcomer is told the server is busy and when to retry. Sessions idle for longer than the idle timeout are expired
by a reaper in the background. An evicted or expired session's client gets `session_expired` and re-opens.
Volumes are shared by fingerprint, and a closed session's volume is kept (first to go under memory pressure) so
re-opening it - on another axis, say - needs no upload.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import secrets
import threading
import time

import numpy as np

from medsam2_client import protocol

from .errors import ApiError

log = logging.getLogger(__name__)
_GONE_REMEMBERED = 4096


def _mib(n: int) -> str:
    return f"{n / 2**20:.4g} MiB"


@dataclasses.dataclass(eq=False)
class ManagedSession:
    id: str
    fingerprint: str
    volume: np.ndarray
    engine_session: object
    last_used: float
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    run: object | None = None  # the propagation in progress, for cancel
    growth: Reservation | None = None  # what its tracking states may add, admitted before it started
    stream: object | None = None  # its stream, for acknowledgements
    closed: bool = False

    @property
    def cache(self):
        """The engine session's feature cache, where it has one (SAM-2's; the test engine has none)."""
        return getattr(self.engine_session, "cache", None)

    def working_bytes(self) -> int:
        """Memory beyond the volume: what the engine session counts, plus a running propagation's cache grant."""
        n = self.engine_session.working_bytes()
        cache = self.cache
        if self.run is not None and cache is not None:
            n += max(0, cache.budget_bytes - cache.nbytes)
        return n


class Reservation:
    """Bytes admitted against the budget for something not yet allocated; released once it is (or is not)."""

    def __init__(self, manager: "SessionManager", nbytes: int):
        self.manager, self.nbytes = manager, nbytes

    def release(self) -> None:
        with self.manager._lock:
            self.manager._reserved -= self.nbytes
            self.nbytes = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class SessionManager:
    def __init__(self, engine, *, max_sessions: int = protocol.DEFAULT_MAX_SESSIONS,
                 memory_budget_bytes: int = protocol.DEFAULT_MEMORY_BUDGET_BYTES,
                 idle_timeout_s: float = protocol.DEFAULT_IDLE_TIMEOUT_S, busy_wait_s: float = 30.0,
                 eviction_grace_s: float = protocol.DEFAULT_EVICTION_GRACE_S,
                 max_objects: int = protocol.MAX_OBJECTS_PER_SESSION):
        self.engine = engine
        self.max_sessions = max_sessions
        self.memory_budget_bytes = memory_budget_bytes
        self.idle_timeout_s = idle_timeout_s
        self.busy_wait_s = busy_wait_s
        self.eviction_grace_s = eviction_grace_s
        self.max_objects = max_objects
        # A session's feature cache may hold its share of the budget at most; it shrinks when others need room.
        self.cache_budget_bytes = memory_budget_bytes // max(1, max_sessions)
        self._lock = threading.Lock()
        self._sessions: collections.OrderedDict[str, ManagedSession] = collections.OrderedDict()  # LRU first
        self._spare_volumes: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._gone: collections.OrderedDict[str, str] = collections.OrderedDict()  # id -> why
        self._reserved = 0
        self.evictions = 0

    # ---- opening and closing --------------------------------------------------------------------------------------
    def cached_volume(self, fingerprint: str) -> np.ndarray | None:
        with self._lock:
            for s in self._sessions.values():
                if s.fingerprint == fingerprint:
                    return s.volume
            volume = self._spare_volumes.get(fingerprint)
            if volume is not None:
                self._spare_volumes.move_to_end(fingerprint)
            return volume

    def admit_volume(self, nbytes: int) -> Reservation:
        """Reserve room for a volume about to be received (and a slot for its session), or refuse it now."""
        if nbytes > self.memory_budget_bytes:
            raise ApiError(protocol.TOO_LARGE, f"The volume ({_mib(nbytes)}) exceeds the server's memory budget "
                           f"({_mib(self.memory_budget_bytes)}); crop it or start the server with a larger "
                           f"--memory-budget.")
        with self._lock:
            self._claim_slot_locked()
            return self._reserve_locked(nbytes, protect=None, what=f"a volume of {_mib(nbytes)}")

    def add_volume(self, fingerprint: str, volume: np.ndarray, reservation: Reservation) -> None:
        """A received volume, kept (as a spare until a session opens on it); its reservation becomes its count."""
        volume.setflags(write=False)  # shared between sessions: nobody may write into it
        with self._lock:
            self._spare_volumes[fingerprint] = volume
            self._reserved -= reservation.nbytes
            reservation.nbytes = 0

    def create(self, volume: np.ndarray, fingerprint: str, spacing, axis: int, preprocessing) -> ManagedSession:
        """A session on `volume` (one this manager holds: see `add_volume`)."""
        engine_session = self.engine.open_session(volume, spacing, axis, preprocessing)  # validates
        with self._lock:
            try:
                self._claim_slot_locked()
            except ApiError:
                engine_session.close()
                raise
            s = ManagedSession(secrets.token_urlsafe(24), fingerprint, volume, engine_session, time.monotonic())
            self._sessions[s.id] = s
            self._spare_volumes.pop(fingerprint, None)
        if s.cache is not None:
            s.cache.shrink(min(s.cache.budget_bytes, self.cache_budget_bytes))
        log.info("session %s opened: volume %s %s, axis %d", s.id[:8], volume.shape, volume.dtype, axis)
        return s

    def close(self, session_id: str) -> None:
        with self.use(session_id) as s:
            with self._lock:
                self._drop_locked(s, "closed by the client", keep_volume=True)

    def sweep(self) -> int:
        """Expire sessions idle for longer than the idle timeout (the reaper calls this); how many went."""
        deadline = time.monotonic() - self.idle_timeout_s
        expired = 0
        with self._lock:
            for s in [s for s in self._sessions.values() if s.last_used < deadline]:
                if s.lock.acquire(blocking=False):
                    try:
                        self._drop_locked(s, f"it was idle for more than {self.idle_timeout_s:g} s",
                                          keep_volume=True)
                        expired += 1
                    finally:
                        s.lock.release()
        return expired

    # ---- use -------------------------------------------------------------------------------------------------------
    def acquire(self, session_id: str) -> ManagedSession:
        """The session with its lock held (release with `release`): one request at a time per session."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                raise self._expired_error(session_id)
            s.last_used = time.monotonic()  # a waiting request keeps the session from expiring or being evicted
        if not s.lock.acquire(timeout=self.busy_wait_s):
            raise ApiError(protocol.BUSY, "This session is still busy with another request (a propagation?); "
                           "cancel it or try again when it has finished.")
        if s.closed:
            s.lock.release()
            raise self._expired_error(session_id)
        with self._lock:
            s.last_used = time.monotonic()
            self._sessions.move_to_end(s.id)
        return s

    def release(self, s: ManagedSession) -> None:
        s.last_used = time.monotonic()
        s.run = s.stream = None
        if s.growth is not None:
            s.growth.release()  # the engine counts what the states hold now
            s.growth = None
        s.lock.release()

    @contextlib.contextmanager
    def use(self, session_id: str):
        s = self.acquire(session_id)
        try:
            yield s
        finally:
            self.release(s)

    def cancel(self, session_id: str) -> bool:
        """Cancel the session's propagation, if one runs; True when there was one."""
        s = self.get(session_id)
        run = s.run
        if run is not None:
            run.cancel()
        return run is not None

    def get(self, session_id: str) -> ManagedSession:
        """The session without taking its lock (cancel, acknowledgements)."""
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            raise self._expired_error(session_id)
        return s

    # ---- growth of a session (its lock held) -----------------------------------------------------------------------
    def admit_object(self, s: ManagedSession, obj_id, mask: bool = False) -> Reservation:
        """Room for a prompt: a new object's masks (the whole volume, one bool per voxel) and what the prompt adds
        to the engine's tracking states, or a sentence why not. Release it once the prompt has run (the engine
        then counts what it holds)."""
        es = s.engine_session
        new_object = isinstance(obj_id, int) and obj_id not in es.object_ids  # else the engine checks the id
        if new_object and len(es.object_ids) >= self.max_objects:
            raise ApiError(protocol.TOO_LARGE, f"This session already has {self.max_objects} objects, the most "
                           f"this server keeps per session; reset an object you no longer need.")
        masks = es.num_slices * math.prod(es.slice_shape) if new_object else 0
        nbytes = masks + es.prompt_growth_bytes(mask)
        what = f"another object ({_mib(masks)} of masks)" if new_object else f"a prompt ({_mib(nbytes)})"
        with self._lock:
            return self._reserve_locked(nbytes, protect=s, what=what)

    def plan_propagation(self, s: ManagedSession, *args):
        """The engine's propagation plan (`VolumeSession.propagate(*args)`) once what its tracking states will add
        is admitted (held until the session is released); then its feature cache may grow into what is free."""
        run = s.engine_session.propagate(*args)
        nbytes = s.engine_session.propagation_growth_bytes(run.passes)
        with self._lock:
            s.growth = self._reserve_locked(nbytes, protect=s, what=f"this propagation's tracking states "
                                            f"({_mib(nbytes)} for {run.planned} slices)")
        self.grant_cache(s)
        return run

    def grant_cache(self, s: ManagedSession) -> None:
        """Before a propagation: let the session's feature cache grow into what is free, up to its share."""
        cache = s.cache
        if cache is None:
            return
        with self._lock:
            free = self.memory_budget_bytes - self._memory_locked()
            cache.shrink(max(0, min(self.cache_budget_bytes, cache.nbytes + free)))

    # ---- memory ----------------------------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        with self._lock:
            return self._memory_locked()

    def _memory_locked(self) -> int:
        volumes = {s.fingerprint: s.volume.nbytes for s in self._sessions.values()}
        volumes.update((fp, v.nbytes) for fp, v in self._spare_volumes.items())
        return sum(volumes.values()) + sum(s.working_bytes() for s in self._sessions.values()) + self._reserved

    def _reserve_locked(self, nbytes: int, protect: ManagedSession | None, what: str) -> Reservation:
        while self._memory_locked() + nbytes > self.memory_budget_bytes:
            if not self._make_room_locked(self._memory_locked() + nbytes - self.memory_budget_bytes, protect):
                own = 0 if protect is None else protect.volume.nbytes + protect.engine_session.working_bytes() - (
                    protect.cache.nbytes if protect.cache is not None else 0)
                if own + nbytes > self.memory_budget_bytes:
                    raise ApiError(protocol.TOO_LARGE, f"There is no room for {what} within the server's memory "
                                   f"budget ({_mib(self.memory_budget_bytes)}); reset objects you no longer need, "
                                   f"crop the volume, or start the server with a larger --memory-budget.")
                raise self._busy_locked()
        self._reserved += nbytes
        return Reservation(self, nbytes)

    def _make_room_locked(self, excess: int, protect: ManagedSession | None) -> bool:
        """Free one thing towards `excess` bytes: a spare volume, idle feature caches, or an idle session."""
        if self._spare_volumes:
            self._spare_volumes.popitem(last=False)
            return True
        freed = 0
        for s in self._sessions.values():
            cache = s.cache
            if cache is None or not cache.nbytes or (s is not protect and s.lock.locked()) or s.run is not None:
                continue
            before = cache.nbytes
            cache.shrink(max(0, before - (excess - freed)))
            freed += before - cache.nbytes
            if freed >= excess:
                break
        if freed:
            return True
        return self._evict_one_locked(protect, "evicted to make room within the server's memory budget",
                                      keep_volume=False)

    def _claim_slot_locked(self) -> None:
        while len(self._sessions) >= self.max_sessions:
            if not self._evict_one_locked(None, "evicted to make room for another user's session",
                                          keep_volume=True):
                raise self._busy_locked()

    def _evict_one_locked(self, protect: ManagedSession | None, why: str, keep_volume: bool) -> bool:
        """Evict the least recently used session idle for longer than the grace period; False when none is."""
        grace_ends = time.monotonic() - self.eviction_grace_s
        for s in list(self._sessions.values()):
            if s is not protect and s.last_used < grace_ends and s.lock.acquire(blocking=False):
                try:
                    self._drop_locked(s, why + f" after it was unused for {self.eviction_grace_s:g} s",
                                      keep_volume=keep_volume)
                finally:
                    s.lock.release()
                self.evictions += 1
                return True
        return False

    def _busy_locked(self) -> ApiError:
        now = time.monotonic()
        active = [s for s in self._sessions.values() if s.lock.locked() or now - s.last_used <= self.eviction_grace_s]
        soonest = min((s.last_used + self.eviction_grace_s - now for s in active if not s.lock.locked()),
                      default=self.eviction_grace_s)
        n = max(1, len(active))
        return ApiError(protocol.BUSY, f"The server is busy: {n} user{'s are' if n != 1 else ' is'} active; "
                        f"retry in a moment.", retry_after_s=min(max(soonest, 1.0), max(self.eviction_grace_s, 1.0)))

    def _drop_locked(self, s: ManagedSession, why: str, keep_volume: bool) -> None:
        s.closed = True
        self._sessions.pop(s.id, None)
        s.engine_session.close()
        self._gone[s.id] = why
        while len(self._gone) > _GONE_REMEMBERED:
            self._gone.popitem(last=False)
        in_use = any(o.fingerprint == s.fingerprint for o in self._sessions.values())
        if keep_volume and not in_use:
            self._spare_volumes[s.fingerprint] = s.volume
        log.info("session %s %s", s.id[:8], why)

    def _expired_error(self, session_id: str) -> ApiError:
        why = self._gone.get(session_id, "this server does not know it (it may have been restarted)")
        return ApiError(protocol.SESSION_EXPIRED, f"The segmentation session is no longer on the server: {why}. "
                        f"Open it again (the client does this by itself, re-sending the volume and prompts).")

    def stats(self) -> dict:
        with self._lock:
            return {"sessions": len(self._sessions), "memory_bytes": self._memory_locked(),
                    "reserved_bytes": self._reserved, "evictions": self.evictions}
