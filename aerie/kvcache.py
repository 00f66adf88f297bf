"""A preallocated KV cache with explicit write slots, for static shapes and CUDA graphs.

`SlotCache` behaves like transformers' DynamicCache as the rest of aerie sees it: it holds
`get_seq_length()` entries, a forward appends its tokens after them, and compaction or
truncation shrinks it. The storage, though, is allocated once per layer at a fixed capacity
and written in place at the slots in `write_at`, so that one forward has the same shapes and
the same tensor addresses every time: the condition for capturing it as a CUDA graph.

A forward of n tokens padded to a bucket of b >= n rows writes b slots; the b - n slots past
the real tokens are scratch space that no mask lets a real token see, and the next forward
overwrites them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from aerie.graphs import GraphCache, bucket_for


class StaticLayer(CacheLayerMixin):
    """One layer's view of a static cache's storage: allocated by its owner on first use,
    sized to the owner's capacity; subclasses say where new entries are written (`write`)."""

    is_compileable = True

    def __init__(self, owner: StaticStorage):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.owner.allocate(key_states, value_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.write(key_states, value_states)

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.owner.capacity, 0

    def get_max_length(self) -> int:
        return self.owner.capacity


class _SlotLayer(StaticLayer):
    def write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.owner.write_at[: key_states.shape[-2]]
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.owner.length


_STORAGE_IDS = itertools.count()
# Static capacities are multiples of this: the rows of an attention mask over the whole cache
# are then aligned as SDPA's fused kernels require (see aerie.target.layer_aligned).
SLOT_ALIGNMENT = 8


def aligned_capacity(capacity: int) -> int:
    return -(-capacity // SLOT_ALIGNMENT) * SLOT_ALIGNMENT


class StaticStorage(Cache):
    """What every static KV cache shares: one storage tensor [layers, 2, rows, heads,
    capacity, head_dim] whose slices are every layer's keys and values (so that compaction
    moves all of them in one gather), grown by doubling, and the CUDA graphs captured over it
    with the buffers their inputs are copied into."""

    def __init__(self, layers: list[CacheLayerMixin], capacity: int, device: torch.device, cuda_graphs: bool):
        self.capacity = aligned_capacity(capacity)
        self.device = torch.device(device)
        # The graphs captured over this cache's buffers, which only it may replay.
        self.graphs = GraphCache(enabled=cuda_graphs and self.device.type == "cuda")
        self._inputs: dict = {}  # per graph key: the buffers its inputs are copied into
        self.storage: torch.Tensor | None = None
        super().__init__(layers=layers)

    def _allocate(self, rows: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The storage, shaped after the first layer's keys (every layer has the same)."""
        if key_states.shape != value_states.shape:
            raise ValueError("static KV caches need keys and values of one shape")
        _, h, _, d = key_states.shape
        self._bind(key_states.new_zeros(len(self.layers), 2, rows, h, self.capacity, d))

    def _bind(self, storage: torch.Tensor) -> None:
        self.storage = storage
        # Names this storage for graphs kept elsewhere that read or write it (a device round's,
        # in the head cache's graphs): a grown cache gets a new name, unlike id(), never reused.
        self.storage_id = next(_STORAGE_IDS)
        for i, layer in enumerate(self.layers):
            layer.keys, layer.values = storage[i, 0], storage[i, 1]
            layer.is_initialized = True

    def reserve(self, needed: int) -> None:
        """Make room for `needed` slots, doubling the storage if it is too small. Growing
        moves the buffers, so every graph captured over the old ones is dropped."""
        if needed <= self.capacity:
            return
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        if self.storage is not None:
            grown = self.storage.new_zeros(*self.storage.shape[:4], capacity, self.storage.shape[-1])
            grown[..., : self.capacity, :] = self.storage
            self._bind(grown)
        self.capacity = capacity
        self.graphs.clear()
        self._inputs.clear()

    def drop_graphs(self, which: Callable[[Hashable], bool]) -> None:
        """Let go of the graphs (and their input buffers) whose keys `which` picks."""
        for key in [k for k in self.graphs.graphs if which(k)]:
            del self.graphs.graphs[key]
            self._inputs.pop(key, None)

    def _replay(
        self,
        key: Hashable,
        inputs: dict[str, torch.Tensor],
        fn: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]],
    ) -> tuple[torch.Tensor, ...]:
        """Copy `inputs` into the buffers kept for `key` and replay the graph of `fn` over
        them (captured on first use); the outputs are overwritten by the next replay. Inputs
        of another shape under the same key get new buffers and a new capture."""
        buffers = self._inputs.get(key)
        if buffers is None or any(buffers[n].shape != t.shape for n, t in inputs.items()):
            buffers = {name: torch.empty(t.shape, dtype=t.dtype, device=self.device) for name, t in inputs.items()}
            self._inputs[key] = buffers
            self.graphs.graphs.pop(key, None)
        for name, t in inputs.items():
            buffers[name].copy_(t, non_blocking=True)
        return self.graphs.run(key, lambda: fn(buffers))


class SlotCache(StaticStorage):
    """KV storage for one sequence: `capacity` slots per layer, `length` of them in use."""

    def __init__(self, num_layers: int, capacity: int, device: torch.device, cuda_graphs: bool = True):
        self.length = 0
        self.write_at = _slots(aligned_capacity(capacity), torch.device(device))
        super().__init__([_SlotLayer(self) for _ in range(num_layers)], capacity, device, cuda_graphs)

    def allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._allocate(key_states.shape[0], key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def reserve(self, needed: int) -> None:
        if needed > self.capacity:
            super().reserve(needed)
            self.write_at = _slots(self.capacity, self.device)

    def set_write_slots(self, start: int, count: int) -> None:
        """The next forward writes `count` rows at slots start, start + 1, ..."""
        with torch.inference_mode():  # `write_at` is an inference tensor (see `_slots`)
            self.write_at[:count] = torch.arange(start, start + count, device=self.device)

    def run(
        self,
        key: Hashable,
        inputs: dict[str, torch.Tensor],
        fn: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]],
        graphed: bool,
    ) -> tuple[torch.Tensor, ...]:
        """Run `fn` over `inputs` (already padded to the forward's static shape), replayed as
        a graph when `graphed`."""
        if not graphed:
            return fn({name: _inference(t.to(self.device, non_blocking=True)) for name, t in inputs.items()})
        return self._replay(key, inputs, fn)

    @torch.inference_mode()
    def compact(self, committed: int, keep: list[int]) -> None:
        """Keep slots [0, committed) and then the slots committed + keep[i], moved in place
        to committed + i. `keep` is increasing, so no slot is read after it is written."""
        if keep and keep != list(range(len(keep))):
            index = pinned_tensor(keep).to(self.device, non_blocking=True) + committed
            if self.storage is not None:
                self.storage[..., committed : committed + len(keep), :] = self.storage.index_select(4, index)
        self.length = committed + len(keep)

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def reset(self) -> None:
        self.length = 0


# A compiled forward (aerie.fused.Compiled) guards on whether each tensor it reads is an
# inference tensor, and compiles again whenever one flips. Every tensor a static forward reads
# is made one: the forwards run in inference mode, so whatever they allocate already is.
def _slots(capacity: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        return torch.arange(capacity, device=device)


def _inference(t: torch.Tensor) -> torch.Tensor:
    if t.is_inference():
        return t
    with torch.inference_mode():
        return t.clone()


class CachePool:
    """Finished sequences' caches, kept (up to `keep`) with their captured graphs so that
    the next sequences skip allocation and capture."""

    def __init__(self, make: Callable[[], SlotCache], keep: int):
        self.make = make
        self.keep = keep
        self._free: list[SlotCache] = []

    def take(self) -> SlotCache:
        return self._free.pop() if self._free else self.make()

    def give(self, cache: SlotCache) -> None:
        if len(self._free) < self.keep:
            cache.reset()
            self._free.append(cache)


def pinned_tensor(values, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A CPU tensor that copies to the GPU without making the host wait (pinned when CUDA
    is there to pin for)."""
    t = torch.as_tensor(values, dtype=dtype)
    return t.pin_memory() if torch.cuda.is_available() else t


@dataclass(frozen=True)
class Attend:
    """Which entries a forward's n new rows attend to: every cache entry before `visible`,
    then `pattern` ([n, past + n - visible] boolean) over the entries from `visible` on, the
    new rows' own included. pattern None means causal among the new rows (visible == past).

    The target's tree verify sees everything committed plus each node's ancestors; a draft
    level sees the committed entries plus its own drafted ancestors, which sit in the cache
    after them. Both masks are built where `pattern` lives, so a drafter that keeps its tree
    on the GPU builds them there without a host round trip."""

    visible: int
    pattern: torch.Tensor | None = None

    def dense(self, n: int, past: int) -> torch.Tensor:
        """[1, 1, n, past + n]: the mask a forward over a dynamic cache takes."""
        device = self.pattern.device if self.pattern is not None else None
        out = torch.ones(1, 1, n, past + n, dtype=torch.bool, device=device)
        out[0, 0, :, self.visible :] = self._pattern(n, past, device)
        return out

    def padded(self, n: int, past: int, rows: int, capacity: int, device: torch.device) -> torch.Tensor:
        """[1, 1, rows, capacity] on `device`: the static shape of a graphed forward.

        Rows past n are padding: they see the entries in use and their own slot, so that no
        row is empty (an all-masked row would put NaNs in the scratch slots, and NaN times a
        zero attention weight is still NaN)."""
        out = torch.zeros(1, 1, rows, capacity, dtype=torch.bool, device=device)
        out[0, 0, :n, : self.visible] = True
        pattern = self._pattern(n, past, device)
        out[0, 0, :n, self.visible : past + n] = pattern.to(device, non_blocking=True)
        if rows > n:
            out[0, 0, n:, :past] = True
            pad = torch.arange(n, rows, device=device)
            out[0, 0, pad, past + pad] = True
        return out

    def _pattern(self, n: int, past: int, device) -> torch.Tensor:
        if self.pattern is not None:
            if self.pattern.shape != (n, past + n - self.visible):
                raise ValueError(f"attention pattern {tuple(self.pattern.shape)} does not fit {n} rows over "
                                 f"{past + n - self.visible} entries")
            return self.pattern
        if self.visible != past:
            raise ValueError("a causal pattern must see every entry in use")
        return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def seen_on_device(capacity: int, visible: torch.Tensor, slots: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """[n, capacity] boolean, built where `visible` (a 0-d length) lives: row i sees every
    entry before `visible`, and the entries at `slots` that pattern[i] marks. What a graph
    builds that does not know the committed length: `Attend.padded` on the device."""
    mask = (torch.arange(capacity, device=visible.device) < visible).expand(pattern.shape[0], -1).clone()
    return mask.scatter_(1, slots.expand(pattern.shape[0], -1), pattern)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive one (0 where seen, -inf where not) that SDPA
    would make of it in every layer, two kernels each: made once per forward instead."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Extend dim 1 of `t` to `rows` by repeating its last row (valid ids, positions and
    features for the padding rows, whose outputs nobody reads)."""
    n = t.shape[1]
    if rows == n:
        return t
    return torch.cat([t, t[:, -1:].expand(t.shape[0], rows - n, *t.shape[2:])], dim=1)


def static_forward(
    cache: SlotCache,
    kind: Hashable,
    rows: dict[str, torch.Tensor],
    attend: Attend | None,
    fn: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]],
    largest_graph: int,
) -> tuple[torch.Tensor, ...]:
    """One forward of n new rows on `cache`, as a graph when n fits a bucket.

    `rows` are the inputs with the rows in dim 1 ([1, n, ...]), `attend` what they see (None:
    causal). `fn` gets them padded, plus "mask" at the static shape, and returns outputs with
    the rows in dim 0; they come back cut to n rows. The n new entries are then in use."""
    n = next(iter(rows.values())).shape[1]
    past = cache.length
    bucket = bucket_for(n, largest_graph)
    width = bucket or n
    cache.reserve(past + width)
    cache.set_write_slots(past, width)
    inputs = {name: pad_rows(t, width) for name, t in rows.items()}
    attend = attend or Attend(past)
    inputs["mask"] = attend.padded(n, past, width, cache.capacity, cache.device)
    outputs = cache.run((kind, width), inputs, fn, graphed=bucket is not None)
    cache.length = past + n
    return tuple(o[:n] for o in outputs)
