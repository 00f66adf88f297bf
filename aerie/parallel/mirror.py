"""Rank 0 drives, the other ranks mirror: the target interface over a sharded model.

`TensorParallelTarget` has the interface of `aerie.target.Target` (what `VerifySession`
calls). Each forward or compaction is first sent to the other ranks, which run
`serve_mirror`, then run locally; all ranks thus enter the model's all-reduces together.
Every rank runs the call through the same `apply_call`, on the same integers.

Batches of sessions go the same way: `MirroredBatchModel` is the `BatchModel` that
`BatchVerifier` gets from a `TensorParallelTarget`. Each of its operations (rows joining with
their prompts, a padded forward at rank 0's shape, compaction moves, a row leaving) is sent as
integers and run on every rank's own `BatchKVCache` by `apply_batch_call`; acceptance, which
needs the logits, stays on rank 0.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import torch
from transformers import Cache, DynamicCache

from aerie.batch.cache import BatchKVCache, RowCompaction
from aerie.batch.model import ForwardOutput, ForwardShape, LocalBatchModel
from aerie.batch.trees import TreeBatch
from aerie.parallel.protocol import Call, Channel, Op
from aerie.target import FeatureSpec, Target, TargetOutput

T = TypeVar("T")
C = TypeVar("C", bound=Cache)  # a session's cache or a batch's: both are numbered alike


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
        self._cache_ids: weakref.WeakKeyDictionary[Cache, int] = weakref.WeakKeyDictionary()
        self._finalizers: dict[int, weakref.finalize] = {}
        self._released: deque[int] = deque()
        self._broken: str | None = None

    def register(self, cache: C) -> C:
        with self._lock:
            cache_id = next(self._ids)
            self._cache_ids[cache] = cache_id
            self._finalizers[cache_id] = weakref.finalize(cache, self._dropped, cache_id)
        return cache

    def release(self, cache: Cache) -> None:
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

    def cache_id(self, cache: Cache) -> int:
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

    def batch_model(self, cache: BatchKVCache, largest_graph: int = 128,
                    prefill_graph_tokens: int = 512) -> MirroredBatchModel:
        """The forwards of a batch of sessions over `cache`, mirrored on every rank. The other
        ranks run the default graph sizes, so these must be the defaults too: a rank that
        pads a forward another runs unpadded would wait in a mismatched all-reduce."""
        if (largest_graph, prefill_graph_tokens) != (128, 512):
            raise ValueError("a sharded target's batched forwards run at the default graph sizes")
        return MirroredBatchModel(self._local.batch_model(cache), self._group)

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


# --- batches of sessions ------------------------------------------------------------------------


def _ints(values: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long)


def _back_to_back(lists: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged lists as (values back to back, length of each)."""
    return _ints([v for xs in lists for v in xs]), _ints([len(xs) for xs in lists])


def _split(values: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [part.tolist() for part in values.split(lengths.tolist())]


def batch_open_call(batch_id: int, cache: BatchKVCache) -> Call:
    # The other ranks' caches must grow (and so rebuild their masks and graphs) at the same
    # moments as rank 0's: same rows, same starting capacity, same graph setting.
    return Call(Op.BATCH_OPEN, batch_id, (_ints([cache.rows, cache.capacity, int(cache.graphs.enabled)]),))


def batch_prefill_call(batch_id: int, prompts: Sequence[Sequence[int]]) -> Call:
    return Call(Op.BATCH_PREFILL, batch_id, _back_to_back(prompts))


def batch_forward_call(batch_id: int, trees: TreeBatch, shape: ForwardShape) -> Call:
    dims = _ints([shape.batch, shape.width, int(shape.graphed), int(shape.argmax), trees.width])
    return Call(Op.BATCH_FORWARD, batch_id, (trees.tokens.flatten(), trees.parents.flatten(), _ints(trees.sizes), dims))


def batch_compact_call(batch_id: int, moves: Sequence[RowCompaction]) -> Call:
    kept, counts = _back_to_back([m.keep for m in moves])
    return Call(Op.BATCH_COMPACT, batch_id, (_ints([m.row for m in moves]), _ints([m.committed for m in moves]),
                                             counts, kept))


def batch_remove_row_call(batch_id: int, row: int) -> Call:
    return Call(Op.BATCH_REMOVE_ROW, batch_id, (_ints([row]),))


def open_batch(target: Target, call: Call) -> LocalBatchModel:
    """A rank > 0's batch for a BATCH_OPEN: its own cache over its shard's heads (allocated on
    the first forward), and no logits (it has no LM head)."""
    rows, capacity, graphs = call.tensors[0].tolist()
    cache = BatchKVCache(target.config.num_hidden_layers, rows, capacity, target.device, bool(graphs))
    return LocalBatchModel(target, cache, reads_logits=False)


def _prefill(model: LocalBatchModel, call: Call) -> ForwardOutput:
    return model.prefill(_split(*call.tensors))


def _forward(model: LocalBatchModel, call: Call) -> ForwardOutput:
    flat_tokens, flat_parents, sizes, dims = call.tensors
    batch, width, graphed, argmax, tree_width = dims.tolist()
    shape = ForwardShape(batch, width, bool(graphed), bool(argmax))
    tokens, parents = flat_tokens.view(-1, tree_width), flat_parents.view(-1, tree_width)
    trees = TreeBatch(tokens, parents, torch.zeros(tokens.shape), tuple(sizes.tolist()))  # no logprobs needed
    return model.run_forward(trees, shape)


def _compact(model: LocalBatchModel, call: Call) -> None:
    rows, committed, counts, kept = call.tensors
    keeps = _split(kept, counts)
    model.compact([RowCompaction(r, c, tuple(k)) for r, c, k in zip(rows.tolist(), committed.tolist(), keeps)])


def _remove_row(model: LocalBatchModel, call: Call) -> int | None:
    return model.remove_row(int(call.tensors[0][0]))


_BATCH_HANDLERS: dict[Op, Callable[[LocalBatchModel, Call], object]] = {
    Op.BATCH_PREFILL: _prefill, Op.BATCH_FORWARD: _forward, Op.BATCH_COMPACT: _compact,
    Op.BATCH_REMOVE_ROW: _remove_row,
}


def apply_batch_call(model: LocalBatchModel, call: Call) -> object:
    """Run one mirrored batch operation on this rank's batch (what a rank > 0 does with it;
    rank 0 decodes the same call through the same functions)."""
    handler = _BATCH_HANDLERS.get(call.op)
    if handler is None:
        raise ValueError(f"{call.op.name} is not an operation on a batch")
    return handler(model, call)


class MirroredBatchModel:
    """`BatchModel` on rank 0 of a sharded target: every operation is sent to the other ranks,
    then run here, through `MirrorGroup.run` (one order across threads; a failure leaves the
    group out of step). The shape of each forward is rank 0's choice and travels with it, so
    that every rank pads alike and replays the same graph."""

    def __init__(self, local: LocalBatchModel, group: MirrorGroup):
        self._local = local
        self._group = group
        # Numbered like a session's cache: dropping the batch drops it on the other ranks.
        self._id = group.cache_id(group.register(local.cache))
        group.run(batch_open_call(self._id, local.cache), lambda: None)

    @property
    def cache(self) -> BatchKVCache:
        return self._local.cache

    def prefill(self, prompts: Sequence[Sequence[int]]) -> ForwardOutput:
        call = batch_prefill_call(self._id, prompts)
        return self._group.run(call, lambda: _prefill(self._local, call))

    def forward(self, trees: TreeBatch, argmax: bool) -> ForwardOutput:
        call = batch_forward_call(self._id, trees, self._local.shape_for(trees, argmax))
        return self._group.run(call, lambda: _forward(self._local, call))

    def compact(self, moves: Sequence[RowCompaction]) -> None:
        call = batch_compact_call(self._id, moves)
        self._group.run(call, lambda: _compact(self._local, call))

    def remove_row(self, row: int) -> int | None:
        call = batch_remove_row_call(self._id, row)
        return self._group.run(call, lambda: _remove_row(self._local, call))


# --- the other ranks ----------------------------------------------------------------------------


@dataclass
class MirrorState:
    """What a rank > 0 holds for rank 0: sessions' caches and batches, by id."""

    caches: dict[int, DynamicCache] = field(default_factory=dict)
    batches: dict[int, LocalBatchModel] = field(default_factory=dict)


def serve_mirror(target: Target, channel: Channel) -> MirrorState:
    """The loop of a rank > 0: run every call rank 0 sends, until it sends SHUTDOWN.

    `target` wraps this rank's shard, with the cache kind of rank 0's; its feature spec does
    not matter (features are rank 0's business). Caches are made (or taken from the pool) on
    their first forward, batches when rank 0 opens them; both are dropped when rank 0 says so.
    Returns what is still held at SHUTDOWN (what rank 0 still had).
    """
    held = MirrorState()
    while True:
        call = channel.receive()
        for cache_id in call.released:
            released = held.caches.pop(cache_id, None)
            if released is not None:
                target.release_cache(released)  # back to the pool, as on rank 0
            held.batches.pop(cache_id, None)  # its storage goes with it
        if call.op is Op.SHUTDOWN:
            return held
        if call.op is Op.BATCH_OPEN:
            held.batches[call.cache_id] = open_batch(target, call)
            continue
        if call.op in _BATCH_HANDLERS:
            apply_batch_call(held.batches[call.cache_id], call)
            continue
        if call.op is Op.FORWARD and call.cache_id not in held.caches:
            held.caches[call.cache_id] = target.new_cache()
        apply_call(target, held.caches[call.cache_id], call)
