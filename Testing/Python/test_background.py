"""The Qt-free worker/queue under the effect: backend reads on a worker thread, applying on the caller's thread."""

import threading
import time

import pytest

from MedSAM2SlicerLib.background import ActionGuard, BackgroundReader, BusyError, call_in_background


class LoopScheduler:
    """What a QTimer does in the app: call `tick` repeatedly on this (the main) thread until stopped."""

    def __init__(self):
        self.tick, self.running = None, False

    def __call__(self, tick):
        self.tick, self.running = tick, True
        return self

    def stop(self):
        self.running = False

    def run(self, timeout_s=10.0):
        deadline = time.monotonic() + timeout_s
        ticks = 0
        while self.running and time.monotonic() < deadline:
            self.tick()
            ticks += 1
            time.sleep(0.001)
        assert not self.running, "never finished"
        return ticks


def test_items_are_read_on_a_worker_and_applied_in_order_on_the_main_thread():
    main, read_on, applied, outcome = threading.get_ident(), [], [], []

    def produce():
        for i in range(10):
            read_on.append(threading.get_ident())
            yield i

    reader = BackgroundReader(produce, lambda item: applied.append((item, threading.get_ident())),
                              outcome.append, max_per_tick=3)
    scheduler = LoopScheduler()
    reader.start(scheduler)
    ticks = scheduler.run()
    assert [item for item, _ in applied] == list(range(10)) and {t for _, t in applied} == {main}
    assert main not in read_on and outcome == [None] and ticks >= 4  # at most 3 per tick
    assert reader.wait(5)


@pytest.mark.parametrize("where", ["produce", "apply"])
def test_an_error_ends_the_run_once_and_nothing_is_applied_after_it(where):
    applied, outcome = [], []

    def produce():
        yield 1
        if where == "produce":
            raise ConnectionError("gone")
        yield 2
        yield 3

    def apply(item):
        if where == "apply" and item == 2:
            raise ValueError("bad write")
        applied.append(item)

    scheduler = LoopScheduler()
    BackgroundReader(produce, apply, outcome.append).start(scheduler)
    scheduler.run()
    assert applied == [1] and len(outcome) == 1 and type(outcome[0]) is (
        ConnectionError if where == "produce" else ValueError)


def test_one_call_in_the_background_returns_its_result_on_the_main_thread():
    got, ticks = [], []
    scheduler = LoopScheduler()
    call_in_background(lambda: time.sleep(0.05) or 42, lambda result, error: got.append((result, error)),
                       scheduler, on_tick=lambda: ticks.append(1))
    scheduler.run()
    assert got == [(42, None)] and ticks  # the main thread ran meanwhile


def test_the_guard_allows_one_action_and_tells_observers():
    guard, states = ActionGuard(), []
    guard.add_observer(states.append)
    guard.acquire("propagating")
    with pytest.raises(BusyError, match="busy \\(propagating\\)"):
        guard.acquire("placing a prompt")
    guard.release()
    guard.acquire("placing a prompt")
    assert states == [True, False, True]
