"""The per-round timeout scheduler: callbacks run once, in deadline order, on one thread;
cancelled ones never run."""

from __future__ import annotations

import threading
import time

from aerie_rpc.deadlines import Deadlines


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def test_callbacks_run_in_deadline_order_and_cancelled_ones_never():
    deadlines = Deadlines()
    fired: list[str] = []
    deadlines.schedule(0.15, lambda: fired.append("late"))
    deadlines.schedule(0.05, lambda: fired.append("early"))
    dropped = deadlines.schedule(0.10, lambda: fired.append("cancelled"))
    dropped.cancel()
    assert wait_for(lambda: len(fired) == 2)
    time.sleep(0.1)
    assert fired == ["early", "late"]
    assert deadlines.pending() == 0


def test_many_rounds_share_one_thread():
    deadlines = Deadlines()
    before = threading.active_count()
    handles = [deadlines.schedule(30.0, lambda: None) for _ in range(500)]
    assert threading.active_count() == before + 1
    for h in handles:
        h.cancel()
    assert deadlines.pending() == 0
    for _ in range(3000):  # rounds that each cancel their timeout: swept, not kept for 30 s
        deadlines.schedule(30.0, lambda: None).cancel()
    assert len(deadlines._heap) < 2100


def test_a_failing_callback_does_not_stop_the_others():
    deadlines = Deadlines()
    fired = threading.Event()
    deadlines.schedule(0.01, lambda: 1 / 0)
    deadlines.schedule(0.02, fired.set)
    assert fired.wait(5.0)


def test_gateway_watchdog_cancels_a_silent_call_and_each_event_rearms_it():
    from gateway.service import _Watchdog

    class Call:
        cancelled = 0

        def cancel(self):
            self.cancelled += 1

    deadlines, call = Deadlines(), Call()
    watchdog = _Watchdog(deadlines, call, timeout_s=0.3)
    for _ in range(5):  # events keep arriving in time: it never fires
        time.sleep(0.1)
        watchdog.reset(0.3)
    assert not watchdog.fired and call.cancelled == 0
    assert wait_for(lambda: watchdog.fired)  # then silence
    assert call.cancelled == 1
    watchdog.stop()
