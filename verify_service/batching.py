"""Batched verification in the verify service: the rounds of concurrent sessions in one forward.

With `--batch-sessions N` every session of a feature spec is a row of one `BatchVerifier`
(a `BatchKVCache` of N rows). Each Verify stream hands its round's tree to the `SessionBatch`
and waits; the batch's scheduler thread collects the trees pending, waiting up to
`--batch-window-ms` after the first for the others (or less: as soon as every session still
generating has one pending; a session that let a window pass without a tree is not waited for
again until its next tree comes), checks each tree alone, so that a bad one is refused to its own
stream only, and verifies the rest in one target forward. Rows whose session has no round
pending sit the forward out (padding; their caches are untouched).

Prefill joins a row (one forward per session, in the caller's thread); Release, the idle
TTL and drain give rows back. Every forward, join and leave runs under the servicer's
`compute` lock: a row leaving moves the last row's KV into its place, which must not race a
forward.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from aerie.batch.trees import TreeBatch
from aerie.batch.verify import BatchVerifier, NewSession, Prefilled
from aerie.errors import InputError
from aerie.sampling import SamplingParams
from aerie.tree import DraftTree
from aerie.verifier import RoundResult, StopCriteria
from aerie_rpc.status import Conflict, Exhausted, NotFound, Unavailable

log = logging.getLogger("aerie.verify.batch")


@dataclass(frozen=True)
class BatchedRound:
    """One session's round, verified together with `batch_size - 1` others."""

    result: RoundResult
    generated: int  # tokens the session has generated so far
    batch_size: int  # sessions whose trees were in the same forward
    queued_ms: float  # from the tree's arrival to the start of its forward
    forward_ms: float  # the batched forward, acceptance and compaction


@dataclass
class _Pending:
    key: str
    tree: DraftTree
    future: Future
    arrived: float  # time.perf_counter()


class SessionBatch:
    """Sessions sharing one `BatchVerifier`, and the thread that runs their rounds."""

    def __init__(self, verifier: BatchVerifier, compute: threading.Lock, window_s: float, name: str = "batch"):
        self.verifier = verifier
        self.compute = compute
        self.window_s = window_s
        self._rows: dict[str, int] = {}  # session -> its row now (rows move when one leaves)
        self._cond = threading.Condition()
        self._pending: dict[str, _Pending] = {}
        # Sessions still generating: a round waits for each of them to have a tree pending
        # (or for the window to pass) before the forward starts.
        self._active: set[str] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"verify-{name}", daemon=True)
        self._thread.start()

    @property
    def rows(self) -> int:
        return self.verifier.cache.rows

    # --- sessions join and leave ---------------------------------------------------------

    def join(self, key: str, prompt: Sequence[int], resume: Sequence[int], params: SamplingParams,
             stop: StopCriteria) -> Prefilled:
        """Prefill a session into a free row (its own forward)."""
        with self._cond:
            if self._closed:
                raise Unavailable("verifier is shutting down: use another verifier")
        with self.compute:
            if key in self._rows:
                raise Conflict(f"session '{key}' already holds a row on this verifier")
            if len(self._rows) >= self.rows:
                # The session table admits no more sessions than rows; this is a release
                # still in progress.
                raise Exhausted(f"all {self.rows} rows of the batch (--batch-sessions) are in use: retry later")
            (prefilled,) = self.verifier.join([NewSession(key, tuple(prompt), params, stop, tuple(resume))])
            self._rows[key] = len(self.verifier.rows) - 1
        if not prefilled.done:
            with self._cond:
                self._active.add(key)
        return prefilled

    def leave(self, key: str) -> bool:
        """Give the session's row back; False if it holds none."""
        with self.compute:
            row = self._rows.pop(key, None)
            if row is not None:
                self.verifier.leave(row)
                self._renumber()
        with self._cond:
            self._active.discard(key)
            orphan = self._pending.pop(key, None)
            self._cond.notify_all()  # the sessions left may now all be pending
        if orphan is not None:
            orphan.future.set_exception(NotFound(f"session '{key}' was released while its round waited"))
        return row is not None

    def _renumber(self) -> None:
        self._rows = {row.session.key: i for i, row in enumerate(self.verifier.rows)}

    # --- rounds --------------------------------------------------------------------------

    def submit(self, key: str, tree: DraftTree) -> Future:
        """Queue the session's next tree; the future gives its `BatchedRound`."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise Unavailable("verifier is shutting down: resume the session on another verifier")
            if key in self._pending:
                raise Conflict(f"session '{key}' already has a round waiting to be verified")
            self._pending[key] = _Pending(key, tree, future, time.perf_counter())
            self._active.add(key)
            self._cond.notify_all()
        return future

    def verify(self, key: str, tree: DraftTree) -> BatchedRound:
        return self.submit(key, tree).result()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    break  # closed, and nothing left to verify
                deadline = min(p.arrived for p in self._pending.values()) + self.window_s
                while not self._closed and self._active - self._pending.keys():
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = list(self._pending.values())
                # Who let the window pass without a tree (a client gone quiet, a slow
                # drafter) is not waited for until its next tree: one silent session must not
                # hold every round for the window until the TTL reaps it.
                self._active &= self._pending.keys()
                self._pending.clear()
            self._run(batch)
        self._free_rows()

    def _run(self, batch: list[_Pending]) -> None:
        ready: list[tuple[_Pending, int]] = []
        with self.compute:
            start = time.perf_counter()
            trees: list[DraftTree | None] = [None] * len(self.verifier.rows)
            for p in batch:
                row = self._rows.get(p.key)
                if row is None:
                    p.future.set_exception(NotFound(f"session '{p.key}' holds no row on this verifier: prefill it again"))
                    continue
                try:
                    self.verifier.check_row(row, p.tree)
                except InputError as e:  # refused to its sender; the batch goes on without it
                    p.future.set_exception(e)
                    continue
                trees[row] = p.tree
                ready.append((p, row))
            if not ready:
                return
            try:
                # As one TreeBatch, checked again in a few tensor operations rather than tree by tree.
                results = self.verifier.verify(TreeBatch.from_trees(trees))
            except BaseException as e:  # noqa: BLE001 - every waiting stream hears of it
                for p, _ in ready:
                    p.future.set_exception(e)
                return
            forward_ms = (time.perf_counter() - start) * 1e3
            done = [p.key for p, row in ready if results[row].done]
            out = [
                (p, BatchedRound(results[row], len(self.verifier.rows[row].generated), len(ready),
                                 (start - p.arrived) * 1e3, forward_ms))
                for p, row in ready
            ]
        if done:
            with self._cond:
                self._active.difference_update(done)
        for p, rnd in out:
            p.future.set_result(rnd)

    # --- shutdown ------------------------------------------------------------------------

    def close(self, timeout_s: float | None = None) -> None:
        """Verify the rounds already queued, refuse new ones, then free every row."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _free_rows(self) -> None:
        with self.compute:
            while self.verifier.rows:
                self.verifier.leave(len(self.verifier.rows) - 1)
            self._rows.clear()
        with self._cond:
            self._active.clear()
        log.info("batch closed: every row freed")


class BatchedSession:
    """A session's handle in the service's session table: its rounds go through the batch,
    and closing it (release, TTL, a failed round) frees its row."""

    def __init__(self, batch: SessionBatch, key: str):
        self.batch, self.key = batch, key

    def verify(self, tree: DraftTree) -> BatchedRound:
        return self.batch.verify(self.key, tree)

    def close(self) -> None:
        self.batch.leave(self.key)
