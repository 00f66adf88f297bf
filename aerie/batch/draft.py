"""The drafter side of a batch of sessions: the draft head runs for every session at once.

Per session this is `DraftSession.draft`: commit the pairs the verifier just accepted, then
grow an EAGLE-2 tree level by level and rerank. Dynamic trees have the same shape at every
level for every session (the root expands into top_k candidates, each later frontier of
top_k nodes into top_k * top_k, the next frontier is the best top_k by path score), so a
level is one head forward of [sessions, top_k] and one batched top-k; only the final rerank
differs per session in content, and it runs vectorised over rows on the host after a single
copy of the candidates. Static (EAGLE-1) trees are expanded per row with `expand_level`.

The head's KV lives in its own `BatchKVCache` whose rows match the verifier's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aerie.batch.cache import BatchKVCache
from aerie.batch.inputs import batch_inputs, tree_geometry
from aerie.fused import fused_norms, norms_to_fuse
from aerie.graphs import bucket_for
from aerie.heads import DraftHead
from aerie.tree import CandidatePool, DraftTree, TreeConfig, expand_level, full_tree, rerank


def expand_rows(
    frontier_logprobs: torch.Tensor, child_logprobs: torch.Tensor, config: TreeConfig, level: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`aerie.tree.expand_level` for every row at once: frontier_logprobs [b, f],
    child_logprobs [b, f, V] -> (parent_slot, tokens, cumulative [b, c], next_frontier [b, m])."""
    b, f = frontier_logprobs.shape
    if config.kind == "static":  # same slots for every row: stack the per-row results
        parts = [expand_level(frontier_logprobs[r], child_logprobs[r], config, level) for r in range(b)]
        return tuple(torch.stack([p[i] for p in parts]) for i in range(4))
    k = config.top_k
    top_lp, top_tok = torch.topk(child_logprobs, k, dim=-1)  # [b, f, k]
    cumulative = (frontier_logprobs[:, :, None] + top_lp).reshape(b, f * k)
    parent_slot = torch.arange(f, device=child_logprobs.device).repeat_interleave(k).expand(b, f * k)
    order = torch.sort(cumulative, dim=-1, descending=True, stable=True).indices
    return parent_slot, top_tok.reshape(b, f * k), cumulative, order[:, : min(k, f * k)]


def order_subtrees(keep: torch.Tensor, scores: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """Sort each row's kept node indices [b, t] by (depth, -score, index), as tree._subtree."""
    keep = keep.sort(dim=1).values
    keep = keep.gather(1, torch.sort(-scores.gather(1, keep), dim=1, stable=True).indices)
    return keep.gather(1, torch.sort(depth[keep], dim=1, stable=True).indices)


def rerank_rows(
    tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor, depth: torch.Tensor,
    total_tokens: int | None,
) -> list[DraftTree]:
    """`aerie.tree.rerank` (or `full_tree` when total_tokens is None) of every row's candidate
    pool: tokens, parents, scores [b, N] (node 0 the root), depth [N] (the same in every row).
    Vectorised; a row whose best nodes are not closed under ancestors (float ties) goes
    through `rerank` itself."""
    b, n = tokens.shape
    if total_tokens is None or total_tokens >= n - 1:
        keep = torch.arange(1, n).expand(b, n - 1)
    else:
        keep = torch.sort(scores[:, 1:].double(), dim=1, descending=True, stable=True).indices[:, :total_tokens] + 1
    kept = torch.zeros(b, n, dtype=torch.bool)
    kept[:, 0] = True
    kept.scatter_(1, keep, True)
    closed = kept.gather(1, parents.gather(1, keep).clamp_min(0)).all(dim=1)
    keep = order_subtrees(keep, scores, depth)
    t = keep.shape[1]
    new_index = torch.zeros(b, n, dtype=torch.long)
    new_index.scatter_(1, keep, torch.arange(1, t + 1).expand(b, t))
    new_parents = torch.cat([torch.full((b, 1), -1), new_index.gather(1, parents.gather(1, keep))], dim=1)
    new_tokens = torch.cat([tokens[:, :1], tokens.gather(1, keep)], dim=1)
    new_scores = torch.cat([torch.zeros(b, 1), scores.gather(1, keep).float()], dim=1)
    trees = []
    for r in range(b):
        if bool(closed[r]):
            trees.append(DraftTree(new_tokens[r].clone(), new_parents[r].clone(), new_scores[r].clone()))
        else:
            pool = CandidatePool(tokens[r].tolist(), parents[r].tolist(), scores[r].tolist())
            trees.append(rerank(pool, total_tokens) if total_tokens is not None else full_tree(pool))
    return trees


class BatchDrafter:
    """The draft head over a batch of sessions; row i of its cache is row i of the verifier's."""

    def __init__(self, head: DraftHead, tree: TreeConfig, cache: BatchKVCache, largest_graph: int = 128):
        self.head = head
        self.tree = tree
        self.cache = cache
        self.largest_graph = largest_graph
        self.device = head.fc.weight.device
        self.dtype = head.fc.weight.dtype
        # The head's output at each row's last committed pair: the root of its next tree.
        self.root_hidden = torch.zeros(cache.rows, head.hidden_size, device=self.device, dtype=self.dtype)
        self.root_tokens = [0] * cache.rows  # and its token, the root itself
        self.fused = norms_to_fuse(head, self.device)

    def _head(self, key, batch: int, feed: dict[str, torch.Tensor], x: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        """The head over `feed`: rows of trees after the committed entries (`batch_inputs`), or
        a level's frontier with its positions and mask already built (`_level_inputs`)."""
        def step(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor]:
            if "mask" in b:
                positions, mask = b["pos"], b["mask"]
            else:
                positions, mask = tree_geometry(b["parents"], b["lengths"], self.cache.capacity)
            return (self.head.step(b["x"], b["ids"], positions, mask, self.cache),)

        with fused_norms(self.fused):
            (hidden,) = self.cache.run(key, (first_row, first_row + batch), {**feed, "x": x}, step)
        return hidden

    @torch.inference_mode()
    def join(self, features: Sequence[torch.Tensor], next_tokens: Sequence[Sequence[int]]) -> None:
        """New sessions (after the rows in use): commit their prompts' pairs in one eager
        forward, remembering the last one's output as the root of the first tree."""
        cache = self.cache
        rows = cache.add_rows(len(features))
        width = max(len(t) for t in next_tokens)
        cache.reserve(width)
        inputs = batch_inputs(next_tokens, None, [0] * len(rows), width, len(rows), cache.capacity, rows.start)
        x = _pad_features(features, width, self.dtype, self.device)
        hidden = self._head(None, len(rows), inputs.as_dict(), x, rows.start)
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
    def draft(self, features: Sequence[torch.Tensor], next_tokens: Sequence[Sequence[int]]) -> list[DraftTree]:
        """Commit each row's pairs (features[r][i], next_tokens[r][i]) (rows may have none:
        just joined) and draft one tree per row, rooted at its last committed token."""
        cache, head, config = self.cache, self.head, self.tree
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
        committed = torch.tensor(cache.lengths[:batch])
        roots = torch.tensor(self.root_tokens[:batch])

        frontier_hidden = self.root_hidden[:batch, None]  # [b, 1, h]
        frontier_lp = torch.zeros(batch, 1, device=self.device)
        frontier_nodes = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        pool_tokens = [roots.to(self.device)[:, None]]
        pool_parents = [torch.full((batch, 1), -1, device=self.device)]
        pool_scores = [torch.zeros(batch, 1, device=self.device)]
        depth = [0]
        size = 1  # candidates so far, root included
        ancestry = torch.zeros(batch, 1, 0, dtype=torch.bool, device=self.device)  # frontier x fed entries
        fed = 0
        for level in range(1, config.depth + 1):
            logprobs = head.draft_logprobs(frontier_hidden)  # [b, f, V]
            slots, draft_ids, cumulative, next_frontier = expand_rows(frontier_lp, logprobs, config, level)
            tokens = head.to_target_ids(draft_ids)
            pool_tokens.append(tokens)
            pool_parents.append(frontier_nodes.gather(1, slots))
            pool_scores.append(cumulative)
            depth += [level] * tokens.shape[1]
            base, size = size, size + tokens.shape[1]
            if level == config.depth:
                break
            # Feed the next frontier: each node attends to the committed pairs and to the
            # drafted entries of its own ancestors, at position committed + level - 1.
            parent_slot = slots.gather(1, next_frontier)  # [b, m]: into the current frontier
            m = next_frontier.shape[1]
            ancestry = torch.cat([
                ancestry.gather(1, parent_slot[:, :, None].expand(batch, m, fed)),
                torch.eye(m, dtype=torch.bool, device=self.device).expand(batch, m, m),
            ], dim=2)
            inputs = self._level_inputs(committed, fed, ancestry, tokens.gather(1, next_frontier), level)
            x = frontier_hidden.gather(1, parent_slot[:, :, None].expand(batch, m, frontier_hidden.shape[-1]))
            key = ("level", batch, m) if m <= self.largest_graph else None  # m is fixed per level
            frontier_hidden = self._head(key, batch, inputs, x)
            frontier_lp = cumulative.gather(1, next_frontier)
            frontier_nodes = base + next_frontier
            fed += m
        # The drafted entries sit past each row's length, so they are already gone: the
        # next commit overwrites them.
        # One copy of every candidate to the host, then the rerank per row.
        cand_tokens = torch.cat(pool_tokens, dim=1)[:n].cpu()
        cand_parents = torch.cat(pool_parents, dim=1)[:n].cpu()
        cand_scores = torch.cat(pool_scores, dim=1)[:n].cpu()
        total = config.total_tokens if config.kind == "dynamic" else None
        return rerank_rows(cand_tokens, cand_parents, cand_scores, torch.tensor(depth), total)

    def _commit(self, features, next_tokens, batch: int, width: int) -> None:
        cache = self.cache
        inputs = batch_inputs(next_tokens, None, cache.lengths, width, batch, cache.capacity)
        x = _pad_features(list(features) + [None] * (batch - len(features)), width, self.dtype, self.device)
        key = ("commit", batch, width, x.shape[-1]) if width <= self.largest_graph else None
        hidden = self._head(key, batch, inputs.as_dict(), x)
        rows = [r for r, t in enumerate(next_tokens) if len(t)]
        for r in rows:
            cache.lengths[r] += len(next_tokens[r])
            self.root_tokens[r] = int(next_tokens[r][-1])
        index = torch.tensor(rows, device=self.device)
        last = torch.tensor([len(next_tokens[r]) - 1 for r in rows], device=self.device)
        self.root_hidden[index] = hidden[index, last]  # one gather, not one copy per row

    def _level_inputs(self, committed: torch.Tensor, fed: int, ancestry: torch.Tensor, ids: torch.Tensor,
                      level: int) -> dict[str, torch.Tensor]:
        """Inputs of one level's forward, built on the device: the m frontier nodes of every
        row go to slots committed + fed .. + m - 1 and see the committed entries and the
        drafted entries of their ancestors (`ancestry`, [b, m, fed + m])."""
        b, m, seen = ancestry.shape
        capacity, device = self.cache.capacity, self.device
        committed = committed.to(device)
        col = torch.arange(capacity, device=device)
        mask = (col[None, None, :] < committed[:, None, None]).expand(b, m, capacity).clone()
        columns = (committed[:, None] + torch.arange(seen, device=device)[None, :])[:, None, :].expand(b, m, seen)
        mask.scatter_(2, columns, ancestry)
        new = torch.arange(m, device=device)
        return {
            "ids": ids,
            "pos": (committed + level - 1)[:, None].expand(b, m),
            "mask": mask[:, None],
            "rows": torch.arange(b, device=device)[:, None].expand(b, m),
            "slots": committed[:, None] + fed + new[None, :],
        }


def _pad_features(features: Sequence[torch.Tensor | None], width: int, dtype, device) -> torch.Tensor:
    """[b, width, F]: each row's features, zero rows past its own (and for rows without any)."""
    dim = next(f.shape[-1] for f in features if f is not None)
    x = torch.zeros(len(features), width, dim, dtype=dtype, device=device)
    for r, f in enumerate(features):
        if f is not None and len(f):
            x[r, : f.shape[0]] = f.to(device, dtype)
    return x
