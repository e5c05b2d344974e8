"""A propagation streamed to the client while the engine computes it.

The engine iterates in a worker thread (it holds the session's lock until it ends); each slice is encoded there
and handed to the event loop through a queue. The response body waits on that queue and checks for a client
disconnect a few times a second. The client acknowledges the slices it has read (`protocol.ACKNOWLEDGE`); the
engine computes at most `window` slices beyond the last acknowledgement, so a client that stops reading while
its socket stays open (socket buffers hold hundreds of frames) costs a window of work, not the whole run. When
the client goes away, or acknowledges nothing for `stall_s`, the run is cancelled, the engine stops after the slice
it is computing and the session is unlocked.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time

from medsam2_client import protocol, wire

from ..engine import EngineInputError

log = logging.getLogger(__name__)
_POLL_S = 0.2


class PropagationStream:
    def __init__(self, manager, session, run, loop: asyncio.AbstractEventLoop,
                 stall_s: float = protocol.DEFAULT_STALL_TIMEOUT_S, window: int = protocol.PROPAGATION_WINDOW):
        self.manager, self.session, self.run, self.loop = manager, session, run, loop
        self.stall_s, self.window = stall_s, window
        self.queue: asyncio.Queue = asyncio.Queue()
        self._acked = self._sent = 0  # slice frames acknowledged by the client / handed to the response
        self._progress = threading.Condition()
        self._abandoned = threading.Event()
        self.worker = threading.Thread(target=self._work, name=f"propagate-{session.id[:8]}", daemon=True)

    def start(self) -> None:
        self.session.run, self.session.stream = self.run, self
        self.worker.start()

    def acknowledge(self, received: int) -> None:
        """The client has read `received` slice frames (from any thread)."""
        with self._progress:
            self._acked = max(self._acked, min(received, self._sent))
            self._progress.notify_all()

    # ---- worker thread -------------------------------------------------------------------------------------------
    def _work(self) -> None:
        run, planned = self.run, self.run.planned
        steps = iter(run)
        try:
            if not self._post(wire.json_frame(wire.START, {"planned": planned, "window": self.window})):
                return
            while True:
                r = next(steps, None)  # the engine holds its accelerator lock for the slice's model work
                if r is None:
                    break
                data = wire.slice_frame(r.obj_id, r.slice_index, r.mask, r.object_score, r.iou, r.stage,
                                        run.summary.slices_done, planned)
                if not self._offer(data):
                    run.cancel()
                    return
            self._post(wire.json_frame(wire.SUMMARY, summary_json(run)))
        except EngineInputError as e:
            self._post(wire.json_frame(wire.ERROR, {"error": {"code": protocol.BAD_REQUEST, "message": str(e)}}))
        except Exception:
            log.exception("propagation failed")
            self._post(wire.json_frame(wire.ERROR, {"error": {
                "code": protocol.INTERNAL, "message": "The propagation failed on the server; it keeps running. "
                "Details are in the server log."}}))
        finally:
            steps.close()
            self.manager.release(self.session)
            self._post(None)

    def _offer(self, data: bytes) -> bool:
        """Queue one slice frame once the window has room; False when the client is gone or stopped reading."""
        deadline = time.monotonic() + self.stall_s
        with self._progress:
            while self._sent - self._acked >= self.window:
                if self._abandoned.is_set() or time.monotonic() >= deadline:
                    if not self._abandoned.is_set():
                        log.info("the client read nothing for %g s; cancelling its propagation", self.stall_s)
                    return False
                self._progress.wait(_POLL_S)
            self._sent += 1
        return not self._abandoned.is_set() and self._post(data)

    def _post(self, item) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:  # the event loop is closed: the server is shutting down
            return False

    # ---- response body (event loop) ------------------------------------------------------------------------------
    async def body(self, request):
        getter = None
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait({getter}, timeout=_POLL_S)
                if not done:
                    if await request.is_disconnected():
                        log.info("client left during propagation; cancelling")
                        return
                    continue
                item, getter = getter.result(), None
                if item is None:
                    return
                yield item
        finally:
            if getter is not None:
                getter.cancel()
            self._abandoned.set()
            self.run.cancel()


def summary_json(run) -> dict:
    s = run.summary
    return {
        "planned": run.planned,
        "slices_done": s.slices_done,
        "cancelled": s.cancelled,
        "stopped_early": [{"obj_id": o, "direction": d, "slice_index": k} for (o, d), k in s.stopped_early.items()],
        "least_certain": {str(o): [[k, iou if math.isfinite(iou) else None] for k, iou in items]
                          for o, items in s.least_certain.items()},
    }
