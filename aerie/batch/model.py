"""The cache-and-model operations of a `BatchVerifier`: what it does to the target and its
batched KV cache, apart from deciding what to accept.

`BatchVerifier` decides (which trees, which paths are accepted, which rows leave); a
`BatchModel` carries the decisions out: rows join with a prefill forward, a graphed forward
runs over [batch, width] padded inputs, accepted entries are compacted, rows are removed.
`LocalBatchModel` does so on this process's model. A sharded target does the same on every
rank (`aerie.parallel.mirror.MirroredBatchModel`): the operations are the unit that is
mirrored, so they take and give only integers and tensors, never sessions or trees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from aerie.accept import accept_greedy_rows
from aerie.batch.cache import BatchKVCache, RowCompaction
from aerie.batch.inputs import padded_inputs, prefill_inputs, prefill_shape, tree_geometry
from aerie.batch.trees import TreeBatch
from aerie.fused import fused
from aerie.graphs import bucket_for
from aerie.kvcache import additive_mask
from aerie.target import forward_features
from aerie.tree import ancestor_closure

if TYPE_CHECKING:
    from aerie.target import Target

# (out, features): out is a greedy forward's acceptance ([b, w + 2], see `greedy_acceptance`),
# [b, w, vocab] float logits, or (on a rank without the LM head) a zero-width [b, w, 0]
# stand-in; features are [b, w, F].
ForwardOutput = tuple[torch.Tensor, torch.Tensor]


def greedy_acceptance(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A greedy forward's out [b, w + 2] -> what `accept_greedy_rows` gave for each row's
    tree inside the forward: (path [b, w], root first, padded with -1; length [b]; bonus [b],
    the target's argmax after the path). A one-node row's bonus is its plain next token."""
    return out[:, :-2], out[:, -2], out[:, -1]


@dataclass(frozen=True)
class ForwardShape:
    """How a forward over rows [0, batch) runs: padded to `width` tokens per row, replayed
    as a graph when `graphed`, giving each row's greedy acceptance rather than logits when
    `argmax`. Part of the graph key, so it must be the same on every rank of a sharded
    target."""

    batch: int
    width: int
    graphed: bool
    argmax: bool

    @property
    def graph_key(self) -> tuple | None:
        return ("tree", self.batch, self.width, self.argmax) if self.graphed else None


class BatchModel(Protocol):
    """The operations a `BatchVerifier` runs on the target and its cache."""

    @property
    def cache(self) -> BatchKVCache: ...

    def prefill(self, prompts: Sequence[Sequence[int]]) -> ForwardOutput:
        """Claim len(prompts) rows after those in use and run the prompts into them (one
        eager forward); each row's length becomes its prompt's. Returns the float logits at
        each prompt's last token ([n, vocab]) and the features of every token ([n, w, F])."""
        ...

    def forward(self, trees: TreeBatch, argmax: bool) -> ForwardOutput:
        """One forward of rows [0, len(trees)): row r's tree (none for a row that sits it
        out) after its committed entries. Lengths do not change: the new entries are scratch
        until `compact` keeps some."""
        ...

    def compact(self, moves: Sequence[RowCompaction]) -> None:
        """Keep each moved row's accepted entries after its committed ones (see BatchKVCache.compact)."""
        ...

    def remove_row(self, row: int) -> int | None:
        """Free `row`; the last row in use moves into it. Returns the row that moved, or None."""
        ...


class LocalBatchModel:
    """`BatchModel` on this process's model and cache.

    `reads_logits=False` is for the ranks > 0 of a sharded target, which hold no LM head:
    their forwards exist for the all-reduces, and give a zero-width stand-in for logits.
    Prefills of up to `prefill_graph_tokens` padded tokens replay CUDA graphs (a join is
    otherwise one eager forward, which on a small target costs more than several rounds)."""

    def __init__(self, target: Target, cache: BatchKVCache, largest_graph: int = 128, reads_logits: bool = True,
                 prefill_graph_tokens: int = 512):
        self.target = target
        self._cache = cache
        self.largest_graph = largest_graph
        self.prefill_graph_tokens = prefill_graph_tokens
        self.reads_logits = reads_logits
        self.lm_head = target.model.get_output_embeddings()
        self.fused = target.fused  # as the single-session static path
        # Attention as the single-session static path runs it (StaticKV.attention_options);
        # batches of a target without static caches still read each KV head once.
        self.attention = {"fold_query_groups": True} if target.static is None else target.static.attention_options()

    @property
    def cache(self) -> BatchKVCache:
        return self._cache

    # --- the model -------------------------------------------------------------------------

    def _model(self, b: dict[str, torch.Tensor], argmax: bool, logits_at: torch.Tensor | None = None,
               kv_width: int | None = None) -> ForwardOutput:
        """The target over `b`; its attention spans `kv_width` entries per row (a prefill's
        own tokens) or, by default, the cache's capacity."""
        reach = ancestor_closure(b["parents"])
        positions, mask = tree_geometry(b["parents"], b["lengths"], kv_width or self._cache.capacity, reach)
        if self.attention.get("split_kv"):  # the kernels take an additive mask
            mask = additive_mask(mask, self.target.model.dtype)
        with fused(self.fused):
            last, feats = forward_features(self.target.model, self.target.features, input_ids=b["ids"],
                                           position_ids=positions, attention_mask=mask,
                                           past_key_values=self._cache, use_cache=True, **self.attention)
        if not self.reads_logits:
            return last[..., :0], feats
        if logits_at is not None:  # one position per row (prefill): skip the others' LM head
            last = last[torch.arange(last.shape[0], device=last.device), logits_at]
        logits = self.lm_head(last)
        if not argmax:
            return logits.float(), feats
        # Greedy rows are accepted here, inside the graph: the host reads back each row's path.
        path, length, bonus = accept_greedy_rows(b["ids"], b["parents"], logits.argmax(-1), reach)
        return torch.cat([path, length[:, None], bonus[:, None]], dim=1), feats

    # --- the operations --------------------------------------------------------------------

    def prefill_shape(self, prompts: int, longest: int) -> tuple[int, int, bool]:
        """(batch, width, graphed) of a prefill of `prompts` prompts of up to `longest` tokens."""
        cache = self._cache
        return prefill_shape(prompts, longest, self.prefill_graph_tokens, cache.capacity, cache.graphs.enabled)

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> ForwardOutput:
        """Prefill `prompts` into new rows after the rows in use: each row's logits at its last
        prompt token [n, vocab] and features at every prompt token [n, longest, F]."""
        # no_grad, not inference_mode: the storage may be allocated here, and rows leaving
        # move its entries in place outside any inference block.
        cache = self._cache
        rows = cache.add_rows(len(prompts))
        longest = max(len(p) for p in prompts)
        batch, width, graphed = self.prefill_shape(len(prompts), longest)
        cache.reserve(width)
        inputs = prefill_inputs(prompts, batch, width, rows.start, cache.capacity - 1)
        key = ("prefill", batch, width) if graphed else None
        logits, feats = cache.run(key, (rows.start, rows.stop), _pinned(inputs),
                                  lambda b: self._model(b, argmax=False, logits_at=b["last"], kv_width=width),
                                  own_keys=True)
        for row, prompt in zip(rows, prompts):
            cache.lengths[row] = len(prompt)
        # Copies: the next replay of that graph overwrites its outputs.
        return logits[: len(prompts)].clone(), feats[: len(prompts), :longest].clone()

    def shape_for(self, trees: TreeBatch, argmax: bool) -> ForwardShape:
        """Both dimensions rounded up to a power of two, so that a few graphs cover every
        round; wider than the largest graph runs eagerly at its own width."""
        widest = max(trees.sizes)
        n = len(trees)
        return ForwardShape(
            batch=bucket_for(n, self._cache.rows) or n,
            width=bucket_for(widest, self.largest_graph) or widest,
            graphed=widest <= self.largest_graph,
            argmax=argmax,
        )

    def forward(self, trees: TreeBatch, argmax: bool) -> ForwardOutput:
        return self.run_forward(trees, self.shape_for(trees, argmax))

    @torch.inference_mode()
    def run_forward(self, trees: TreeBatch, shape: ForwardShape) -> ForwardOutput:
        """`forward` at a given shape (a sharded target's ranks run rank 0's)."""
        cache = self._cache
        cache.reserve(max(cache.lengths[: shape.batch]) + shape.width)
        inputs = padded_inputs(trees.tokens, trees.parents, trees.sizes, cache.lengths, shape.width, shape.batch,
                               cache.capacity)
        return cache.run(shape.graph_key, (0, shape.batch), _pinned(inputs.as_dict()), lambda b: self._model(b, shape.argmax))

    def compact(self, moves: Sequence[RowCompaction]) -> None:
        self._cache.compact(moves)

    def remove_row(self, row: int) -> int | None:
        return self._cache.remove_row(row)


def _pinned(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs in pinned host memory where CUDA is there (async copies)."""
    if torch.cuda.is_available():
        d = {k: v.pin_memory() for k, v in d.items()}
    return d
