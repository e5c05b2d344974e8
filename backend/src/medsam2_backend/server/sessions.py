"""The server's sessions: one volume each, bounded in number, idle time and memory.

A session is used by one request at a time (its own lock); the engine serialises model work of all sessions
itself (the SAM-2 engine holds one lock for the accelerator around each slice), so concurrent sessions never
interleave inside the model, and nothing here blocks the server's event loop on it. Sessions idle for longer than the
idle timeout expire; when the memory estimate (volumes + mask stores + feature caches) exceeds the budget, the
least recently used idle sessions are evicted. Either way the client gets `session_expired` and re-opens.
Volumes are shared by fingerprint, and a closed session's volume is kept (first to go under memory pressure) so
re-opening it - on another axis, say - needs no upload.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import secrets
import threading
import time

import numpy as np

from medsam2_client import protocol

from .errors import ApiError

log = logging.getLogger(__name__)
_GONE_REMEMBERED = 4096


@dataclasses.dataclass(eq=False)
class ManagedSession:
    id: str
    fingerprint: str
    volume: np.ndarray
    engine_session: object
    last_used: float
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    run: object | None = None  # the propagation in progress, for cancel
    closed: bool = False

    def working_bytes(self) -> int:
        """Memory beyond the volume, as the engine session counts it (masks, feature cache)."""
        return self.engine_session.working_bytes()


class SessionManager:
    def __init__(self, engine, *, max_sessions: int = protocol.DEFAULT_MAX_SESSIONS,
                 memory_budget_bytes: int = protocol.DEFAULT_MEMORY_BUDGET_BYTES,
                 idle_timeout_s: float = protocol.DEFAULT_IDLE_TIMEOUT_S, busy_wait_s: float = 30.0):
        self.engine = engine
        self.max_sessions = max_sessions
        self.memory_budget_bytes = memory_budget_bytes
        self.idle_timeout_s = idle_timeout_s
        self.busy_wait_s = busy_wait_s
        self._lock = threading.Lock()
        self._sessions: collections.OrderedDict[str, ManagedSession] = collections.OrderedDict()  # LRU first
        self._spare_volumes: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._gone: collections.OrderedDict[str, str] = collections.OrderedDict()  # id -> why
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

    def create(self, volume: np.ndarray, fingerprint: str, spacing, axis: int, preprocessing) -> ManagedSession:
        if volume.nbytes > self.memory_budget_bytes:
            raise ApiError(protocol.TOO_LARGE, f"The volume ({volume.nbytes / 2**20:.4g} MiB) exceeds the server's "
                           f"memory budget ({self.memory_budget_bytes / 2**20:.4g} MiB); crop it or start the "
                           f"server with a larger --memory-budget.")
        self.sweep()
        volume.setflags(write=False)  # shared between sessions: nobody may write into it
        engine_session = self.engine.open_session(volume, spacing, axis, preprocessing)  # validates (bad_request)
        with self._lock:
            while len(self._sessions) >= self.max_sessions:
                if not self._evict_one_locked(protect=None, why="evicted to make room for a new session"):
                    engine_session.close()
                    raise ApiError(protocol.BUSY, f"The server already runs {self.max_sessions} sessions, all busy; "
                                   f"close one or try again shortly.")
            s = ManagedSession(secrets.token_urlsafe(24), fingerprint, volume, engine_session, time.monotonic())
            self._sessions[s.id] = s
            self._spare_volumes.pop(fingerprint, None)
        self.enforce_budget(protect=s)
        log.info("session %s opened: volume %s %s, axis %d", s.id[:8], volume.shape, volume.dtype, axis)
        return s

    def close(self, session_id: str) -> None:
        with self.use(session_id) as s:
            with self._lock:
                self._drop_locked(s, "closed by the client", keep_volume=True)

    def sweep(self) -> None:
        """Expire sessions idle for longer than the idle timeout."""
        deadline = time.monotonic() - self.idle_timeout_s
        with self._lock:
            for s in [s for s in self._sessions.values() if s.last_used < deadline]:
                if s.lock.acquire(blocking=False):
                    try:
                        self._drop_locked(s, f"it was idle for more than {self.idle_timeout_s:g} s",
                                          keep_volume=True)
                    finally:
                        s.lock.release()

    # ---- use -------------------------------------------------------------------------------------------------------
    def acquire(self, session_id: str) -> ManagedSession:
        """The session with its lock held (release with `release`): one request at a time per session."""
        self.sweep()
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                raise self._expired_error(session_id)
            s.last_used = time.monotonic()  # a waiting request keeps the session from expiring
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
        s.run = None
        s.lock.release()
        if not s.closed:
            self.enforce_budget(protect=s)

    @contextlib.contextmanager
    def use(self, session_id: str):
        s = self.acquire(session_id)
        try:
            yield s
        finally:
            self.release(s)

    def cancel(self, session_id: str) -> bool:
        """Cancel the session's propagation, if one runs; True when there was one."""
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            raise self._expired_error(session_id)
        run = s.run
        if run is not None:
            run.cancel()
        return run is not None

    # ---- memory ----------------------------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        with self._lock:
            return self._memory_locked()

    def _memory_locked(self) -> int:
        volumes = {s.fingerprint: s.volume.nbytes for s in self._sessions.values()}
        volumes.update((fp, v.nbytes) for fp, v in self._spare_volumes.items())
        return sum(volumes.values()) + sum(s.working_bytes() for s in self._sessions.values())

    def enforce_budget(self, protect: ManagedSession | None) -> None:
        """Free spare volumes, then evict least recently used idle sessions, until within the memory budget."""
        with self._lock:
            while self._memory_locked() > self.memory_budget_bytes:
                if self._spare_volumes:
                    self._spare_volumes.popitem(last=False)
                elif not self._evict_one_locked(protect, "evicted to stay within the server's memory budget"):
                    return  # only busy or protected sessions are left

    def _evict_one_locked(self, protect: ManagedSession | None, why: str) -> bool:
        for s in list(self._sessions.values()):
            if s is not protect and s.lock.acquire(blocking=False):
                try:
                    self._drop_locked(s, why, keep_volume=False)
                finally:
                    s.lock.release()
                self.evictions += 1
                return True
        return False

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
                    "evictions": self.evictions}
