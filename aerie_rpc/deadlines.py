"""Per-round timeouts on one thread.

A service times every round (a gateway waits for the drafter's next event, a drafter for the
verifier's answer). A `threading.Timer` per round would start and tear down a thread for each
of them, hundreds of times a second per busy session; `Deadlines` keeps one thread and a heap
of pending callbacks instead.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable


class Deadline:
    """A scheduled callback; `cancel()` before it runs and it never will."""

    __slots__ = ("at", "fn", "cancelled")

    def __init__(self, at: float, fn: Callable[[], None]):
        self.at = at
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Deadlines:
    """Runs each callback once its delay has passed, on one daemon thread started on first
    use. Callbacks must be quick (they cancel a call or set a flag): they run one at a time."""

    def __init__(self, name: str = "aerie-deadlines"):
        self._name = name
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()  # ties in time keep scheduling order
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        # Cancelled callbacks stay in the heap until their time; most rounds cancel theirs,
        # so the heap is swept whenever it has doubled since the last sweep.
        self._sweep_at = 1024

    def schedule(self, delay_s: float, fn: Callable[[], None]) -> Deadline:
        deadline = Deadline(time.monotonic() + delay_s, fn)
        with self._cond:
            if len(self._heap) >= self._sweep_at:
                self._heap = [entry for entry in self._heap if not entry[2].cancelled]
                heapq.heapify(self._heap)
                self._sweep_at = max(1024, 2 * len(self._heap))
            heapq.heappush(self._heap, (deadline.at, next(self._order), deadline))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return deadline

    def pending(self) -> int:
        """Callbacks still to run (cancelled ones leave at their time)."""
        with self._cond:
            return sum(not d.cancelled for _, _, d in self._heap)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, deadline = heapq.heappop(self._heap)
            if not deadline.cancelled:
                try:
                    deadline.fn()
                except Exception:  # a failing callback must not stop the others
                    pass
