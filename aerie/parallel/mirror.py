"""Rank 0 drives, the other ranks mirror: the target interface over a sharded model.

`TensorParallelTarget` has the interface of `aerie.target.Target` (what `VerifySession`
calls). Each forward or compaction is first sent to the other ranks, which run
`serve_mirror`, then run locally; all ranks thus enter the model's all-reduces together.
Every rank runs the call through the same `apply_call`, on the same integers.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import torch
from transformers import DynamicCache

from aerie.parallel.protocol import Call, Channel, Op
from aerie.target import FeatureSpec, Target, TargetOutput

T = TypeVar("T")


class OutOfStep(RuntimeError):
    """The ranks no longer run the same calls: only a restart of every rank recovers.

    Not an `AerieError`: no request can fix it, and the service must not answer it as one.
    """


def apply_call(target: Target, cache: DynamicCache, call: Call) -> TargetOutput | None:
    """Run one mirrored call on this rank's shard."""
    if call.op is Op.FORWARD:
        input_ids, *parents = call.tensors
        return target.forward(cache, input_ids, tree_parents=parents[0] if parents else None)
    if call.op is Op.COMPACT:
        committed, keep = call.tensors
        target.compact(cache, int(committed[0]), keep.tolist())
        return None
    raise ValueError(f"{call.op.name} is not a call on a cache")


class MirrorGroup:
    """Rank 0's end of the channel, shared by every `TensorParallelTarget` over one model.

    It numbers the caches, sends each call before running it locally (under one lock, so
    that the calls of concurrent sessions reach every rank in one order), and tells the other
    ranks which caches were dropped. A dropped cache is noticed by a finalizer, which may run
    in any thread at any moment, so it only queues the id; the ids ride on the next call.
    """

    def __init__(self, channel: Channel, on_broken: Callable[[str], None] | None = None):
        self._channel = channel
        self._on_broken = on_broken
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._cache_ids: weakref.WeakKeyDictionary[DynamicCache, int] = weakref.WeakKeyDictionary()
        self._finalizers: dict[int, weakref.finalize] = {}
        self._released: deque[int] = deque()
        self._broken: str | None = None

    def register(self, cache: DynamicCache) -> DynamicCache:
        with self._lock:
            cache_id = next(self._ids)
            self._cache_ids[cache] = cache_id
            self._finalizers[cache_id] = weakref.finalize(cache, self._dropped, cache_id)
        return cache

    def release(self, cache: DynamicCache) -> None:
        """Drop `cache` on the other ranks now rather than when it is garbage-collected (a
        target that pools caches hands the same object out again, under a new id)."""
        with self._lock:
            cache_id = self._cache_ids.pop(cache, None)
        if cache_id is not None:
            self._finalizers[cache_id].detach()
            self._dropped(cache_id)

    def _dropped(self, cache_id: int) -> None:
        # Runs in finalizers too, in any thread, possibly with self._lock held further up
        # the stack: so no lock, only atomic deque and dict operations.
        self._finalizers.pop(cache_id, None)
        self._released.append(cache_id)

    def cache_id(self, cache: DynamicCache) -> int:
        try:
            return self._cache_ids[cache]
        except KeyError:
            raise ValueError("this cache was not made by a TensorParallelTarget of this group") from None

    def run(self, call: Call, local: Callable[[], T]) -> T:
        with self._lock:
            if self._broken is not None:
                raise OutOfStep(self._broken)
            try:
                self._channel.send(replace(call, released=self._take_released()))
                return local()
            except BaseException as e:
                # The other ranks got (part of) a call this rank did not finish: their caches
                # and the collectives are out of step from here on.
                self._broken = (
                    f"the tensor-parallel group is out of step after a failed {call.op.name.lower()} "
                    f"({type(e).__name__}: {e}): restart the verify service"
                )
                if self._on_broken is not None:
                    self._on_broken(self._broken)
                raise

    def shutdown(self) -> None:
        """Tell the other ranks to leave their loops (once; later calls fail)."""
        with self._lock:
            if self._broken is None:
                self._broken = "the tensor-parallel group was shut down"
                self._channel.send(Call(Op.SHUTDOWN, released=self._take_released()))

    def _take_released(self) -> tuple[int, ...]:
        ids = []
        while self._released:
            ids.append(self._released.popleft())
        return tuple(ids)


class TensorParallelTarget:
    """`Target`'s interface on rank 0 of a sharded model; every call is mirrored."""

    def __init__(self, local: Target, group: MirrorGroup):
        self._local = local
        self._group = group

    # What the local target answers without touching the other ranks. Rank 0 keeps the whole
    # LM head, so the vocabulary is the model's.
    model = property(lambda self: self._local.model)
    config = property(lambda self: self._local.config)
    device = property(lambda self: self._local.device)
    hidden_size = property(lambda self: self._local.hidden_size)
    vocab_size = property(lambda self: self._local.vocab_size)
    max_positions = property(lambda self: self._local.max_positions)
    # Every rank runs the same cache kind: static caches capture each rank's forward, all-reduces
    # included, as a CUDA graph, in the same order on every rank.
    static = property(lambda self: self._local.static)

    @property
    def features(self) -> FeatureSpec:
        return self._local.features

    @features.setter
    def features(self, spec: FeatureSpec) -> None:
        # Only rank 0 reads features: the other ranks need not know which ones.
        self._local.features = spec

    def new_cache(self) -> DynamicCache:
        # The other ranks make their cache on its first forward: no call needed here.
        return self._group.register(self._local.new_cache())

    def forward(
        self, cache: DynamicCache, input_ids: torch.Tensor, tree_parents: torch.Tensor | None = None
    ) -> TargetOutput:
        tensors = (input_ids.long().cpu(),) if tree_parents is None else (input_ids.long().cpu(), tree_parents.long().cpu())
        call = Call(Op.FORWARD, self._group.cache_id(cache), tensors)
        return self._group.run(call, lambda: apply_call(self._local, cache, call))

    def release_cache(self, cache: DynamicCache) -> None:
        """A finished sequence's cache: freed on the other ranks with the next call."""
        self._group.release(cache)
        self._local.release_cache(cache)

    def compact(self, cache: DynamicCache, committed: int, keep: list[int]) -> None:
        call = Call(Op.COMPACT, self._group.cache_id(cache), (torch.tensor([committed]), torch.tensor(keep, dtype=torch.long)))
        self._group.run(call, lambda: apply_call(self._local, cache, call))


def serve_mirror(target: Target, channel: Channel) -> dict[int, DynamicCache]:
    """The loop of a rank > 0: run every call rank 0 sends, until it sends SHUTDOWN.

    `target` wraps this rank's shard, with the cache kind of rank 0's; its feature spec does
    not matter (features are rank 0's business). Caches are made (or taken from the pool) on
    their first forward and given back when rank 0 says so.
    Returns the caches still held at SHUTDOWN (those of sessions rank 0 still had).
    """
    caches: dict[int, DynamicCache] = {}
    while True:
        call = channel.receive()
        for cache_id in call.released:
            released = caches.pop(cache_id, None)
            if released is not None:
                target.release_cache(released)  # back to the pool, as on rank 0
        if call.op is Op.SHUTDOWN:
            return caches
        if call.op is Op.FORWARD and call.cache_id not in caches:
            caches[call.cache_id] = target.new_cache()
        apply_call(target, caches[call.cache_id], call)
