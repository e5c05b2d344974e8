"""What lets the GUI stay responsive while MedSAM2 works: one action at a time, and slow reads off the GUI thread.

Qt-free, so pytest drives it: the effect and panel pass in how to schedule work on the main thread (in the app a
`qt.QTimer`; in tests a loop). MRML, VTK and Qt are only ever touched from the main thread: the worker thread
only reads from the backend (network or in-process engine) and puts what it got into a queue.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable

from .controller import MedSAM2ActionError


class BusyError(MedSAM2ActionError):
    """A second GUI action while one runs (a click queued during a propagation, Start pressed twice...)."""


class ActionGuard:
    """At most one GUI action at a time; observers hear when it starts and ends (to disable buttons)."""

    def __init__(self):
        self.running: str | None = None  # what runs, in words ("propagating"), or None
        self._observers: list[Callable[[bool], None]] = []

    def acquire(self, what: str) -> None:
        if self.running is not None:
            raise BusyError(f"MedSAM2 is busy ({self.running}); wait until it finishes, or press Cancel.")
        self.running = what
        self._notify()

    def release(self) -> None:
        self.running = None
        self._notify()

    def add_observer(self, observer: Callable[[bool], None]) -> None:
        self._observers.append(observer)

    def remove_observer(self, observer: Callable[[bool], None]) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def _notify(self) -> None:
        for observer in list(self._observers):
            observer(self.running is not None)


_DONE = object()


class BackgroundReader:
    """Iterates `produce()` on a worker thread; `drain()`, called on the main thread, applies what arrived.

    `start_timer(tick)` arranges for `tick()` to be called repeatedly on the main thread and returns an object with
    `stop()` (the app: a `qt.QTimer`'s timeout). Each tick applies up to `max_per_tick` queued items with
    `apply(item)` (so the event loop runs between, e.g. to deliver Cancel), then calls `on_tick()`; when the
    producer is exhausted `finished(None)` is called, or `finished(error)` if the producer or `apply` raised.
    After `finished` nothing else is called. `stop_applying()` drops whatever still arrives (e.g. the selection
    changed): the producer should be cancelled by its owner so the thread ends soon.
    """

    def __init__(self, produce: Callable[[], Iterable], apply: Callable[[object], None],
                 finished: Callable[[BaseException | None], None], on_tick: Callable[[], None] | None = None,
                 max_per_tick: int = 4):
        self._produce, self._apply, self._finished, self._on_tick = produce, apply, finished, on_tick
        self.max_per_tick = max_per_tick
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._timer = None
        self._applying = True
        self.done = False

    def start(self, start_timer: Callable[[Callable[[], None]], object]) -> None:
        self._thread = threading.Thread(target=self._work, name="MedSAM2 reader", daemon=True)
        self._thread.start()
        self._timer = start_timer(self.drain)

    def _work(self) -> None:
        try:
            for item in self._produce():
                self._queue.put((item, None))
            self._queue.put((_DONE, None))
        except BaseException as error:  # handed to the main thread, which turns it into a sentence
            self._queue.put((_DONE, error))

    def stop_applying(self) -> None:
        self._applying = False

    def drain(self) -> None:
        """Apply what has arrived, up to `max_per_tick` items (main thread)."""
        for _ in range(self.max_per_tick):
            if self.done:
                return
            try:
                item, error = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _DONE:
                self._finish(error)
                return
            if not self._applying:
                continue
            try:
                self._apply(item)
            except Exception as apply_error:
                self._applying = False
                self._finish(apply_error)
                return
        if self._on_tick is not None and not self.done:
            self._on_tick()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker thread ended (tests, and a clean exit); True if it did."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _finish(self, error: BaseException | None) -> None:
        self.done = True
        if self._timer is not None:
            self._timer.stop()
        self._finished(error)


def call_in_background(work: Callable[[], object], finished: Callable[[object, BaseException | None], None],
                       start_timer: Callable[[Callable[[], None]], object],
                       on_tick: Callable[[], None] | None = None) -> BackgroundReader:
    """Run one slow call (e.g. the first upload of a volume) on a worker thread; `finished(result, error)` on the
    main thread, `on_tick()` there meanwhile (e.g. to show the upload's progress)."""
    results = []
    reader = BackgroundReader(lambda: [work()], results.append,
                              lambda error: finished(results[0] if results else None, error), on_tick)
    reader.start(start_timer)
    return reader
