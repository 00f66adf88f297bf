"""A preallocated KV cache for a batch of sessions: one row per session, each with its own length.

Storage is one tensor [layers, 2, rows, kv_heads, capacity, head_dim]. Sessions occupy rows
0 .. in_use - 1 without gaps (one leaving is replaced by the last row), so that a forward over
`b` sessions attends over the view of rows [0, b) and a batch padded to a power of two only
adds free rows, whose lengths are 0. A forward writes each token at an explicit (row, slot)
pair, given as [b, n] index tensors: the shapes and addresses stay fixed, so the forward can
be captured as a CUDA graph once per (batch bucket, width bucket) and replayed.

Slots at or past a row's length are scratch space: a forward may write padding there, no mask
lets a real token see it, and the next forward overwrites it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from aerie.kvcache import StaticLayer, StaticStorage, pinned_tensor


@dataclass(frozen=True)
class RowCompaction:
    """Keep slots [0, committed) of `row`, then the slots committed + keep[i], moved to
    committed + i: the accepted path of a verified tree."""

    row: int
    committed: int
    keep: tuple[int, ...]


class _BatchLayer(StaticLayer):
    def write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        owner = self.owner
        rows, slots = owner.write_rows, owner.write_slots  # [b, n] each
        # Views [rows, capacity, heads, dim]: index_put_ with the (row, slot) pairs writes
        # each token's [heads, dim] in place, with no host sync (graph-capturable).
        self.keys.transpose(1, 2).index_put_((rows, slots), key_states.transpose(1, 2))
        self.values.transpose(1, 2).index_put_((rows, slots), value_states.transpose(1, 2))
        if owner.own_keys:
            # A prefill: its rows start empty, so its tokens attend to each other alone. Not
            # reading the storage keeps the forward free of the rows' place in it (a graph
            # captured for one join then serves every join of that shape).
            return key_states, value_states
        lo, hi = owner.window
        return self.keys[lo:hi], self.values[lo:hi]

    def get_seq_length(self) -> int:
        return 0


class BatchKVCache(StaticStorage):
    """KV storage for up to `rows` sessions of up to `capacity` tokens each."""

    def __init__(self, num_layers: int, rows: int, capacity: int, device: torch.device, cuda_graphs: bool = True):
        self.rows = rows
        self.lengths = [0] * rows  # entries in use, per row
        self.in_use = 0  # rows [0, in_use) hold sessions
        # Set by each forward: which (row, slot) every new token goes to, and which rows
        # the attention reads (rows [lo, hi) of the storage, matching the batch).
        self.write_rows: torch.Tensor | None = None
        self.write_slots: torch.Tensor | None = None
        self.window = (0, rows)
        self.own_keys = False  # set by each forward: attend to its own new tokens only (a prefill)
        super().__init__([_BatchLayer(self) for _ in range(num_layers)], capacity, device, cuda_graphs)

    # --- storage -------------------------------------------------------------------------

    def allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._allocate(self.rows, key_states, value_states)

    def reserve(self, needed: int) -> None:
        # A verify round (inference mode) may grow the storage, and a join (no_grad, outside
        # inference mode) then writes into it, which torch refuses for an inference tensor:
        # the grown storage is allocated as a normal tensor.
        with torch.inference_mode(False), torch.no_grad():
            super().reserve(needed)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Rows differ; transformers only uses this for cache_position, which our explicit
        # position ids and 4-D masks make irrelevant.
        return 0

    # --- rows: sessions join and leave between rounds ------------------------------------

    def add_rows(self, count: int) -> range:
        """Claim `count` free rows (empty) for new sessions; they follow the rows in use."""
        if self.in_use + count > self.rows:
            raise ValueError(f"batched KV cache has {self.rows} rows, {self.in_use} in use: cannot add {count}")
        new = range(self.in_use, self.in_use + count)
        for r in new:
            self.lengths[r] = 0
        self.in_use += count
        return new

    @torch.inference_mode()
    def remove_row(self, row: int) -> int | None:
        """Free `row`. The last row in use moves into it (its entries are copied), so that the
        rows in use stay contiguous; returns the row that moved, or None."""
        if not 0 <= row < self.in_use:
            raise ValueError(f"row {row} is not in use")
        last = self.in_use - 1
        moved = None
        if row != last:
            n = self.lengths[last]
            if self.storage is not None and n:
                self.storage[:, :, row, :, :n] = self.storage[:, :, last, :, :n]
            self.lengths[row] = n
            moved = last
        self.lengths[last] = 0
        self.in_use = last
        return moved

    # --- after a verify round --------------------------------------------------------------

    @torch.inference_mode()
    def compact(self, moves: Sequence[RowCompaction]) -> None:
        """Keep each row's accepted nodes, moved right after its committed entries: one
        gather and one scatter over every row and layer. Rows whose kept nodes already sit in
        place (the first nodes of the tree) move nothing."""
        pairs_row: list[int] = []
        pairs_src: list[int] = []
        pairs_dst: list[int] = []
        for m in moves:
            for i, k in enumerate(m.keep):
                if k != i:
                    pairs_row.append(m.row)
                    pairs_src.append(m.committed + k)
                    pairs_dst.append(m.committed + i)
            self.lengths[m.row] = m.committed + len(m.keep)
        if not pairs_row or self.storage is None:
            return
        rows = pinned_tensor(pairs_row).to(self.device, non_blocking=True)
        src = pinned_tensor(pairs_src).to(self.device, non_blocking=True)
        dst = pinned_tensor(pairs_dst).to(self.device, non_blocking=True)
        # [rows, capacity, layers, 2, heads, dim] view: the gather copies every source before
        # any destination is written, so overlapping moves within a row are safe.
        view = self.storage.permute(2, 4, 0, 1, 3, 5)
        view.index_put_((rows, dst), view[rows, src])

    def truncate(self, lengths: Sequence[int]) -> None:
        """Rows 0 .. len(lengths) - 1 keep only their first lengths[r] entries."""
        for r, n in enumerate(lengths):
            self.lengths[r] = min(self.lengths[r], n)

    # --- running a forward -----------------------------------------------------------------

    def run(
        self,
        key: Hashable | None,
        window: tuple[int, int],
        inputs: dict[str, torch.Tensor],
        fn: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]],
        own_keys: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Run `fn` over `inputs`, which hold "rows" and "slots" (the [b, n] write targets)
        beside the model's own, unless `fn` sets `write_rows` and `write_slots` itself. With
        a `key` (and graphs enabled) the inputs are copied into buffers kept per key and `fn`
        over those is captured once and replayed; the outputs are then overwritten by the
        next replay. key=None runs eagerly. The attention reads rows `window` of the storage,
        or with `own_keys` only the forward's own new keys and values (which are still
        written to the storage)."""
        self.window = window

        def call(buffers: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
            self.write_rows, self.write_slots = buffers.get("rows"), buffers.get("slots")
            self.own_keys = own_keys
            try:
                return fn(buffers)
            finally:
                self.own_keys = False

        if key is None or not self.graphs.enabled:
            return call({name: t.to(self.device, non_blocking=True) for name, t in inputs.items()})
        return self._replay(key, inputs, call)
