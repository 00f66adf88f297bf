"""The drafter side of a batch of sessions: the draft head runs for every session at once.

Per session this is `DraftSession.draft`: commit the pairs the verifier just accepted, then
grow an EAGLE-2 tree level by level and rerank. Trees have the same shape at every level for
every session (the root expands into top_k candidates, each later frontier of top_k nodes
into top_k * top_k, the next frontier is the best top_k by path score; a static tree has
fixed slots), so a level is one head forward of [sessions, frontier] and one batched top-k,
and the whole expansion, every level, is one CUDA graph per batch size. The rerank of every
session's candidates runs vectorised inside that graph too (`rerank_tensors`); the host reads
back the reranked trees in one copy, and reranks on its own only a session whose best
candidates tie so that they are not closed under ancestors (`finish_rerank`).

The head's KV lives in its own `BatchKVCache` whose rows match the verifier's."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aerie.batch.cache import BatchKVCache
from aerie.batch.inputs import batch_inputs, prefill_inputs, prefill_shape, tree_geometry
from aerie.batch.trees import TreeBatch
from aerie.fused import fused, fusion_for
from aerie.graphs import bucket_for
from aerie.heads import DraftHead
from aerie.kvcache import pinned_tensor
from aerie.tree import CandidatePool, DraftTree, TreeConfig, full_tree, rerank, static_level_index


def expand_rows(
    frontier_logprobs: torch.Tensor, child_logprobs: torch.Tensor, config: TreeConfig, level: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`aerie.tree.expand_level` for every row at once: frontier_logprobs [b, f],
    child_logprobs [b, f, V] -> (parent_slot, tokens, cumulative [b, c], next_frontier [b, m]).
    Device work only, nothing read back: the whole expansion is one CUDA graph."""
    b, f = frontier_logprobs.shape
    device = child_logprobs.device
    if config.kind == "static":  # the same slots in every row
        slots, ranks, width = static_level_index(level, device)
        top_lp, top_tok = torch.topk(child_logprobs, width, dim=-1)  # [b, f, width]
        cumulative = frontier_logprobs[:, slots] + top_lp[:, slots, ranks]
        every = torch.arange(slots.shape[0], device=device)
        return slots.expand(b, -1), top_tok[:, slots, ranks], cumulative, every.expand(b, -1)
    k = config.top_k
    top_lp, top_tok = torch.topk(child_logprobs, k, dim=-1)  # [b, f, k]
    cumulative = (frontier_logprobs[:, :, None] + top_lp).reshape(b, f * k)
    # expand, not repeat_interleave: no output size to compute, so nothing syncs under capture
    parent_slot = torch.arange(f, device=device)[:, None].expand(f, k).reshape(1, f * k).expand(b, f * k)
    order = torch.sort(cumulative, dim=-1, descending=True, stable=True).indices
    return parent_slot, top_tok.reshape(b, f * k), cumulative, order[:, : min(k, f * k)]


def order_subtrees(keep: torch.Tensor, scores: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """Sort each row's kept node indices [b, t] by (depth, -score, index), as tree._subtree."""
    keep = keep.sort(dim=1).values
    keep = keep.gather(1, torch.sort(-scores.gather(1, keep), dim=1, stable=True).indices)
    return keep.gather(1, torch.sort(depth[keep], dim=1, stable=True).indices)


def rerank_tensors(
    tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor, depth: torch.Tensor,
    total_tokens: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vectorised `aerie.tree.rerank` (or `full_tree` when total_tokens is None) of every
    row's candidate pool: tokens, parents, scores [b, N] (node 0 the root), depth [N] (the
    same in every row). Returns each row's tree as tokens, parents, scores [b, t + 1], and
    closed [b]: False for a row whose best nodes are not closed under ancestors (float ties),
    whose tree must come from `rerank` itself (`finish_rerank`). Device work only: it runs
    inside the expansion's graph."""
    b, n = tokens.shape
    device = tokens.device
    if total_tokens is None or total_tokens >= n - 1:
        keep = torch.arange(1, n, device=device).expand(b, n - 1)
    else:
        keep = torch.sort(scores[:, 1:], dim=1, descending=True, stable=True).indices[:, :total_tokens] + 1
    kept = torch.zeros(b, n, dtype=torch.bool, device=device)
    kept[:, 0] = True
    kept.scatter_(1, keep, True)
    closed = kept.gather(1, parents.gather(1, keep).clamp_min(0)).all(dim=1)
    keep = order_subtrees(keep, scores, depth)
    t = keep.shape[1]
    new_index = torch.zeros(b, n, dtype=torch.long, device=device)
    new_index.scatter_(1, keep, torch.arange(1, t + 1, device=device).expand(b, t))
    new_parents = torch.cat([parents[:, :1], new_index.gather(1, parents.gather(1, keep))], dim=1)
    new_tokens = torch.cat([tokens[:, :1], tokens.gather(1, keep)], dim=1)
    new_scores = torch.cat([scores[:, :1], scores.gather(1, keep)], dim=1)
    return new_tokens, new_parents, new_scores, closed


def finish_rerank(
    reranked: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    pool: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    total_tokens: int | None,
) -> TreeBatch:
    """The trees of `rerank_tensors` (on the host) as a TreeBatch; a row it could not rerank
    goes through `rerank` with its candidate `pool` (tokens, parents, scores, read from the
    device only then)."""
    tokens, parents, scores, closed = reranked
    b, width = tokens.shape
    if bool(closed.all()):
        return TreeBatch(tokens.long(), parents.long(), scores.float(), (width,) * b)
    pool_tokens, pool_parents, pool_scores = (t.cpu() for t in pool)
    trees = []
    for r in range(b):
        if bool(closed[r]):
            trees.append(DraftTree(tokens[r].long(), parents[r].long(), scores[r].float()))
        else:
            row = CandidatePool(pool_tokens[r].tolist(), pool_parents[r].tolist(), pool_scores[r].tolist())
            trees.append(rerank(row, total_tokens) if total_tokens is not None else full_tree(row))
    return TreeBatch.from_trees(trees)


def rerank_rows(
    tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor, depth: torch.Tensor,
    total_tokens: int | None,
) -> TreeBatch:
    """`aerie.tree.rerank` of every row's candidate pool at once (see `rerank_tensors`)."""
    pool = (tokens, parents, scores)
    return finish_rerank(rerank_tensors(*pool, depth, total_tokens), pool, total_tokens)


class BatchDrafter:
    """The draft head over a batch of sessions; row i of its cache is row i of the verifier's."""

    def __init__(self, head: DraftHead, tree: TreeConfig, cache: BatchKVCache, largest_graph: int = 128,
                 prefill_graph_tokens: int = 512):
        self.head = head
        self.tree = tree
        self.cache = cache
        self.largest_graph = largest_graph
        self.prefill_graph_tokens = prefill_graph_tokens
        self.device = head.fc.weight.device
        self.dtype = head.fc.weight.dtype
        # The head's output at each row's last committed pair: the root of its next tree.
        self.root_hidden = torch.zeros(cache.rows, head.hidden_size, device=self.device, dtype=self.dtype)
        self.root_tokens = [0] * cache.rows  # and its token, the root itself
        self.fused = fusion_for(head, self.device)

    def _head(self, key, window: tuple[int, int], inputs: dict[str, torch.Tensor],
              kv_width: int | None = None) -> torch.Tensor:
        """The head over rows of new pairs (inputs "x" and "ids") after each row's committed
        entries, attending over the cache's rows `window`, or with `kv_width` (a join) over
        the new pairs alone."""
        def step(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor]:
            positions, mask = tree_geometry(b["parents"], b["lengths"], kv_width or self.cache.capacity)
            return (self.head.step(b["x"], b["ids"], positions, mask, self.cache),)

        with fused(self.fused):
            (hidden,) = self.cache.run(key, window, inputs, step, own_keys=kv_width is not None)
        return hidden

    @torch.inference_mode()
    def join(self, features: Sequence[torch.Tensor], next_tokens: Sequence[Sequence[int]]) -> None:
        """New sessions (after the rows in use): commit their prompts' pairs in one forward
        (as the target's prefill: a graph per bucket, attending to the new pairs alone),
        remembering the last one's output as the root of the first tree."""
        cache = self.cache
        rows = cache.add_rows(len(features))
        longest = max(len(t) for t in next_tokens)
        batch, width, graphed = prefill_shape(len(features), longest, self.prefill_graph_tokens, cache.capacity,
                                              cache.graphs.enabled)
        cache.reserve(width)
        inputs = prefill_inputs(next_tokens, batch, width, rows.start, cache.capacity - 1)
        inputs["x"] = _pad_features([*features, *[None] * (batch - len(features))], width, self.dtype, self.device)
        key = ("join", batch, width) if graphed else None
        hidden = self._head(key, (rows.start, rows.stop), inputs, kv_width=width)
        for i, row in enumerate(rows):
            cache.lengths[row] = len(next_tokens[i])
            self.root_hidden[row] = hidden[i, len(next_tokens[i]) - 1]
            self.root_tokens[row] = int(next_tokens[i][-1])

    def leave(self, row: int) -> None:
        moved = self.cache.remove_row(row)
        if moved is not None:
            self.root_hidden[row] = self.root_hidden[moved]
            self.root_tokens[row] = self.root_tokens[moved]

    @torch.inference_mode()
    def draft(self, features: Sequence[torch.Tensor], next_tokens: Sequence[Sequence[int]]) -> TreeBatch:
        """Commit each row's pairs (features[r][i], next_tokens[r][i]) (rows may have none:
        just joined) and draft one tree per row, rooted at its last committed token."""
        cache, config = self.cache, self.tree
        n = cache.in_use
        batch = bucket_for(n, cache.rows) or n
        widest = max((len(t) for t in next_tokens), default=0)
        # Commits hold 1 .. depth + 1 pairs per row; padding them all to one width keeps one
        # graph per batch size (the head is one layer: the padding costs little).
        commit_width = (bucket_for(max(widest, config.depth + 1), self.largest_graph) or widest) if widest else 0
        # Room for the commit and every drafted level, reserved once: growing drops graphs.
        cache.reserve(max(cache.lengths[:batch]) + commit_width + config.depth * max(config.top_k, config.total_tokens))
        if widest:
            self._commit(features, next_tokens, batch, commit_width)
        inputs = {
            "root_hidden": self.root_hidden[:batch],
            "roots": pinned_tensor(self.root_tokens[:batch]),
            "committed": pinned_tensor(cache.lengths[:batch]),
        }
        key = ("expand", batch, config.kind, config.depth, config.top_k, config.total_tokens)  # all that shapes it
        with fused(self.fused):
            trees, *pool = cache.run(key, (0, batch), inputs, self._expand)
        # The drafted entries sit past each row's length, so they are already gone: the
        # next commit overwrites them. One copy of the reranked trees to the host (float64
        # holds every token id exactly).
        width = (trees.shape[1] - 1) // 3
        reranked = trees[:n].cpu().split([width, width, width, 1], dim=1)
        return finish_rerank((*reranked[:3], reranked[3][:, 0].bool()), [t[:n] for t in pool], self._kept_nodes)

    @property
    def _kept_nodes(self) -> int | None:
        """Nodes a rerank keeps: a dynamic tree's budget; a static tree keeps every candidate."""
        return self.tree.total_tokens if self.tree.kind == "dynamic" else None

    def _expand(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Every row's tree, grown level by level from its root (token `roots` [b], hidden
        state `root_hidden` [b, h], after `committed` [b] entries) and reranked: (trees, the
        tokens, parents, scores and closed flag of `rerank_tensors` side by side in one
        [b, 3 (t + 1) + 1] float64 tensor; then the candidate pool's tokens, parents and path
        scores, [b, candidates], root first). Device work only, the same shapes every round:
        one CUDA graph per batch size.

        Each level is one head forward of [b, frontier]; the frontier's nodes attend to the
        committed entries and to the drafted entries of their own ancestors."""
        head, config, cache = self.head, self.tree, self.cache
        root_hidden, committed = b["root_hidden"], b["committed"]
        batch, device = root_hidden.shape[0], root_hidden.device
        frontier_hidden = root_hidden[:, None]  # [b, f, h]
        frontier_lp = torch.zeros(batch, 1, device=device)
        frontier_nodes = torch.zeros(batch, 1, dtype=torch.long, device=device)
        tokens, parents, scores = [], [], []  # per level
        size = 1  # candidates so far, root included
        ancestry = torch.zeros(batch, 1, 0, dtype=torch.bool, device=device)  # frontier x drafted entries
        fed = 0
        for level in range(1, config.depth + 1):
            logprobs = head.draft_logprobs(frontier_hidden)  # [b, f, V]
            slots, draft_ids, cumulative, next_frontier = expand_rows(frontier_lp, logprobs, config, level)
            level_tokens = head.to_target_ids(draft_ids)
            tokens.append(level_tokens)
            parents.append(frontier_nodes.gather(1, slots))
            scores.append(cumulative)
            base, size = size, size + level_tokens.shape[1]
            if level == config.depth:
                break
            parent_slot = slots.gather(1, next_frontier)  # [b, m]: into the current frontier
            m = next_frontier.shape[1]
            ancestry = torch.cat([
                ancestry.gather(1, parent_slot[:, :, None].expand(batch, m, fed)),
                torch.eye(m, dtype=torch.bool, device=device).expand(batch, m, m),
            ], dim=2)
            positions, mask, cache.write_rows, cache.write_slots = self._level_geometry(committed, fed, ancestry, level)
            x = frontier_hidden.gather(1, parent_slot[:, :, None].expand(batch, m, frontier_hidden.shape[-1]))
            frontier_hidden = head.step(x, level_tokens.gather(1, next_frontier), positions, mask, cache)
            frontier_lp = cumulative.gather(1, next_frontier)
            frontier_nodes = base + next_frontier
            fed += m
        pool_tokens = torch.cat([b["roots"][:, None], *tokens], dim=1)
        pool_parents = torch.cat([torch.full((batch, 1), -1, device=device), *parents], dim=1)
        pool_scores = torch.cat([torch.zeros(batch, 1, device=device), *scores], dim=1)
        depth = torch.cat([torch.full((t.shape[1],), level, device=device) for level, t in enumerate(tokens, 1)])
        depth = torch.cat([torch.zeros(1, dtype=depth.dtype, device=device), depth])
        new_tokens, new_parents, new_scores, closed = rerank_tensors(pool_tokens, pool_parents, pool_scores, depth,
                                                                     self._kept_nodes)
        trees = torch.cat([new_tokens.double(), new_parents.double(), new_scores.double(), closed[:, None].double()], 1)
        return trees, pool_tokens, pool_parents, pool_scores

    def _commit(self, features, next_tokens, batch: int, width: int) -> None:
        cache = self.cache
        inputs = batch_inputs(next_tokens, None, cache.lengths, width, batch, cache.capacity)
        x = _pad_features(list(features) + [None] * (batch - len(features)), width, self.dtype, self.device)
        key = ("commit", batch, width, x.shape[-1]) if width <= self.largest_graph else None
        hidden = self._head(key, (0, batch), {**inputs.as_dict(), "x": x})
        rows = [r for r, t in enumerate(next_tokens) if len(t)]
        for r in rows:
            cache.lengths[r] += len(next_tokens[r])
            self.root_tokens[r] = int(next_tokens[r][-1])
        index = torch.tensor(rows, device=self.device)
        last = torch.tensor([len(next_tokens[r]) - 1 for r in rows], device=self.device)
        self.root_hidden[index] = hidden[index, last]  # one gather, not one copy per row

    def _level_geometry(self, committed: torch.Tensor, fed: int, ancestry: torch.Tensor,
                        level: int) -> tuple[torch.Tensor, ...]:
        """Positions, mask, write rows and write slots of one level's forward: the m frontier
        nodes of every row go to slots committed + fed .. + m - 1 at position
        committed + level - 1, and see the committed entries and the drafted entries of their
        ancestors (`ancestry`, [b, m, fed + m])."""
        b, m, seen = ancestry.shape
        device = committed.device
        col = torch.arange(self.cache.capacity, device=device)
        mask = (col[None, None, :] < committed[:, None, None]).expand(b, m, -1).clone()
        columns = (committed[:, None] + torch.arange(seen, device=device)[None, :])[:, None, :].expand(b, m, seen)
        mask.scatter_(2, columns, ancestry)
        slots = committed[:, None] + fed + torch.arange(m, device=device)[None, :]
        rows = torch.arange(b, device=device)[:, None].expand(b, m)
        return (committed + level - 1)[:, None].expand(b, m), mask[:, None], rows, slots


def _pad_features(features: Sequence[torch.Tensor | None], width: int, dtype, device) -> torch.Tensor:
    """[b, width, F]: each row's features, zero rows past its own (and for rows without any).
    One scatter for every row, not one copy per row; by index, not by a boolean mask, which
    would make the host wait for the device."""
    present = [f for f in features if f is not None and len(f)]
    dim = next(f.shape[-1] for f in features if f is not None)
    x = torch.zeros(len(features), width, dim, dtype=dtype, device=device)
    if present:
        sizes = [len(f) if f is not None else 0 for f in features]
        rows = pinned_tensor([r for r, n in enumerate(sizes) for _ in range(n)]).to(device, non_blocking=True)
        cols = pinned_tensor([j for n in sizes for j in range(n)]).to(device, non_blocking=True)
        x[rows, cols] = torch.cat(present).to(device, dtype)
    return x
