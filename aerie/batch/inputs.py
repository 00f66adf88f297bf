"""The padded inputs of one batched forward (token ids, tree parents, row lengths and write
slots), and the positions and attention mask that follow from them.

Each row of the batch is one session's segment of new tokens, a tree in topological order
(root at 0, parent -1; a causal chain is the tree whose node j has parent j - 1) placed after
the row's `length` committed entries. Rows are padded to a common width and the batch to a
common row count. Node j of row r is written at slot length[r] + j of cache row
first_row + r, sits at position length[r] + depth(j), and sees the row's committed entries and
its own ancestors. Padding nodes see the committed entries and their own slot only: a fully
masked row would put NaNs into the scratch slots (see kvcache.Attend.padded).

The host packs each row's tokens and parents (`batch_inputs`: a few small tensors, vectorised
over rows, so that host work per round does not grow with the sessions in Python); the
positions and the [batch, 1, width, capacity] mask follow from the parents and the lengths
(`tree_geometry`), which the forward computes on the device, inside its CUDA graph.

A prefill (`prefill_inputs`) is the case of empty rows: its prompts are chains from slot 0,
they attend to each other alone (a [batch, 1, width, width] mask), and padding rows, which
have no cache row of their own, write to a scratch slot instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aerie.tree import ancestor_closure


@dataclass
class ForwardInputs:
    ids: torch.Tensor  # [b, w] int64
    parents: torch.Tensor  # [b, w] int64: each row's tree; padding nodes are roots of their own (-1)
    lengths: torch.Tensor  # [b] int64: each row's committed entries
    rows: torch.Tensor  # [b, w] int64: cache row of each new token
    slots: torch.Tensor  # [b, w] int64: cache slot of each new token
    sizes: list[int]  # real (unpadded) tokens per row

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids, "parents": self.parents, "lengths": self.lengths, "rows": self.rows,
                "slots": self.slots}


def real_nodes(sizes: Sequence[int], width: int) -> torch.Tensor:
    """[len(sizes), width] bool: True at the first sizes[r] columns of row r."""
    return torch.arange(width)[None, :] < torch.as_tensor(sizes)[:, None]


def pack_rows(rows: Sequence[Sequence[int]], width: int, batch: int, fill: int) -> torch.Tensor:
    """[batch, width] int64: row r starts with rows[r], the rest is `fill`. One tensor built
    from the rows back to back (a wide batch is hundreds of rows every step)."""
    out = torch.full((batch, width), fill, dtype=torch.long)
    sizes = [len(r) for r in rows] + [0] * (batch - len(rows))
    out[real_nodes(sizes, width)] = torch.tensor([v for r in rows for v in r], dtype=torch.long)
    return out


def batch_inputs(
    tokens: Sequence[Sequence[int]],
    parents: Sequence[Sequence[int]] | None,
    lengths: Sequence[int],
    width: int,
    batch: int,
    capacity: int,
    first_row: int = 0,
) -> ForwardInputs:
    """Inputs for rows first_row .. first_row + batch - 1 of a batched cache.

    tokens[r] (and parents[r], None meaning causal chains) are the new tokens of row r, for
    r < len(tokens); the rows after have none (all padding). lengths[r] is row r's committed
    length, for every r < batch. Needs lengths[r] + width <= capacity.
    """
    sizes = [len(t) for t in tokens]
    if parents is None:  # a chain: node j's parent is j - 1
        parents = [range(-1, len(t) - 1) for t in tokens]
    # Packed at their own width; padded_inputs checks it against `width` and pads the rest.
    widest = max(sizes, default=0)
    return padded_inputs(pack_rows(tokens, widest, len(tokens), 0), pack_rows(parents, widest, len(tokens), -1),
                         sizes, lengths, width, batch, capacity, first_row)


# The narrowest prefill graph: shorter prompts share it, so that a few graphs cover every join.
MIN_PREFILL_WIDTH = 32


def prefill_shape(prompts: int, longest: int, graph_tokens: int, capacity: int, graphs: bool) -> tuple[int, int, bool]:
    """(batch, width, graphed) of a prefill of `prompts` prompts of up to `longest` tokens into
    a cache of `capacity` slots: padded to powers of two (the width to at least
    MIN_PREFILL_WIDTH) and replayed as a graph while that is at most `graph_tokens` tokens
    and leaves a scratch slot past it; otherwise (or without `graphs`) eagerly, unpadded."""
    batch = 1 << (prompts - 1).bit_length()
    width = max(MIN_PREFILL_WIDTH, 1 << (longest - 1).bit_length())
    if graphs and batch * width <= graph_tokens and width < capacity:
        return batch, width, True
    return prompts, longest, False


def prefill_inputs(
    prompts: Sequence[Sequence[int]], batch: int, width: int, first_row: int, scratch_slot: int
) -> dict[str, torch.Tensor]:
    """Inputs of a prefill of `prompts` into the empty rows first_row, first_row + 1, ...,
    padded to [batch, width]: each prompt a causal chain from slot 0, and "last" [batch], the
    column of each row's last token (whose logits the prefill keeps). The rows past the
    prompts exist for the padding alone: every token of theirs is written to `scratch_slot`
    of the last prompt's row (past any entry it will hold), so that no real row is touched."""
    n = len(prompts)
    sizes = [len(p) for p in prompts]
    if max(sizes) > width or n > batch:
        raise ValueError(f"{n} prompts of up to {max(sizes)} tokens do not fit [{batch}, {width}]")
    rows = torch.full((batch, width), first_row + n - 1, dtype=torch.long)
    rows[:n] = (first_row + torch.arange(n))[:, None]
    slots = torch.full((batch, width), scratch_slot, dtype=torch.long)
    slots[:n] = torch.arange(width)[None, :]
    return {
        "ids": pack_rows(prompts, width, batch, 0),
        "parents": pack_rows([range(-1, s - 1) for s in sizes], width, batch, -1),
        "lengths": torch.zeros(batch, dtype=torch.long),
        "rows": rows,
        "slots": slots,
        "last": torch.tensor(sizes + [1] * (batch - n), dtype=torch.long) - 1,
    }


def padded_inputs(
    ids: torch.Tensor,
    parents: torch.Tensor,
    sizes: Sequence[int],
    lengths: Sequence[int],
    width: int,
    batch: int,
    capacity: int,
    first_row: int = 0,
) -> ForwardInputs:
    """`batch_inputs` for trees already packed into rows: ids and parents [b, w] (b <= batch,
    each row's sizes[r] nodes first, 0 and -1 after), cut or padded to [batch, width]."""
    if max(sizes, default=0) > width:
        raise ValueError(f"a row has {max(sizes)} new tokens, more than the width {width}")
    length = torch.as_tensor(list(lengths[:batch]), dtype=torch.long)
    if int(length.max()) + width > capacity:
        raise ValueError(f"rows need {int(length.max()) + width} slots, the cache has {capacity}")
    w = min(ids.shape[1], width)
    pad = (0, width - w, 0, batch - ids.shape[0])
    return ForwardInputs(
        ids=torch.nn.functional.pad(ids[:, :w], pad, value=0),
        parents=torch.nn.functional.pad(parents[:, :w], pad, value=-1),
        lengths=length,
        rows=(first_row + torch.arange(batch))[:, None].expand(batch, width).contiguous(),
        slots=(length[:, None] + torch.arange(width)[None, :]).contiguous(),
        sizes=list(sizes) + [0] * (batch - len(sizes)),
    )


def tree_geometry(parents: torch.Tensor, lengths: torch.Tensor, capacity: int,
                  reach: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [b, w] and attention mask [b, 1, w, capacity] of rows of trees `parents`
    [b, w] placed after `lengths` [b] committed entries, on the tensors' device: node j of row
    r sits at position lengths[r] + depth(j) and sees the row's committed entries and its own
    ancestors (itself included) at slots lengths[r] + i. `reach` is `ancestor_closure(parents)`
    where the caller has it already."""
    b, w = parents.shape
    if reach is None:
        reach = ancestor_closure(parents)
    positions = lengths[:, None] + reach.sum(-1) - 1
    mask = torch.arange(capacity, device=parents.device)[None, None, :] < lengths[:, None, None]
    mask = mask.expand(b, w, capacity).clone()
    columns = (lengths[:, None] + torch.arange(w, device=parents.device)[None, :])[:, None, :].expand(b, w, w)
    mask.scatter_(2, columns, reach)
    return positions, mask[:, None]
