"""The drafter side of one sequence: the head's KV cache and tree drafting.

Head position i holds the pair (feature_i, token_{i+1}): the target's feature at position i
and the token that follows it, which is EAGLE's one-step shift. Each round the drafter first
appends the pairs the verifier just committed, then grows a tree from the last committed
token with the head's own outputs as features, and finally drops the drafted entries again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aerie.fused import fused
from aerie.heads import DraftHead
from aerie.kvcache import Attend, SlotCache, pinned_tensor, seen_on_device
from aerie.target import truncate_cache
from aerie.tree import CandidatePool, DraftTree, TreeConfig, expand_level, full_tree, node_depths, rerank


@dataclass
class DraftSession:
    head: DraftHead
    tree: TreeConfig
    cache: object = None

    def __post_init__(self) -> None:
        self.cache = self.head.new_cache()
        self._pool: CandidatePool | None = None

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Path scores and depths of every candidate the last round drafted (root excluded),
        before reranking cut them: what `--tree-budget auto` learns from."""
        pool = self._pool
        return torch.tensor(pool.logprobs[1:], dtype=torch.float64), node_depths(torch.tensor(pool.parents))[1:]

    def close(self) -> None:
        """Give the head's KV cache back for the next sequence."""
        if self.cache is not None:
            self.head.release_cache(self.cache)
            self.cache = None

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def draft(self, features: torch.Tensor, next_tokens: list[int]) -> DraftTree:
        """Commit the pairs (features[i], next_tokens[i]) and draft a tree rooted at
        next_tokens[-1], the last committed token."""
        head, device = self.head, self.head.fc.weight.device
        start = self.length
        ids = pinned_tensor(next_tokens).to(device, non_blocking=True)[None]
        positions = torch.arange(start, start + len(next_tokens), device=device)[None]
        hidden = head(features.to(device, head.fc.weight.dtype)[None], ids, positions, Attend(start), self.cache)[0]
        committed = self.length
        if isinstance(self.cache, SlotCache) and self.tree.kind != "static":
            tokens, parents, scores = self._grow_static(hidden[-1:], committed)
        else:
            tokens, parents, scores = grow_candidates(head, self.cache, self.tree, hidden[-1:], committed)
        truncate_cache(self.cache, committed)
        # The round's one read; float64 holds every token id exactly.
        flat = torch.cat([tokens.double(), parents.double(), scores.double()]).tolist()
        n = tokens.shape[0]
        self._pool = CandidatePool(
            tokens=[next_tokens[-1]] + [int(t) for t in flat[:n]],
            parents=[-1] + [int(p) for p in flat[n : 2 * n]],
            logprobs=[0.0] + flat[2 * n :],
        )
        if self.tree.kind == "dynamic":
            return rerank(self._pool, self.tree.total_tokens)
        return full_tree(self._pool)

    def _grow_static(self, root_hidden: torch.Tensor, committed: int) -> tuple[torch.Tensor, ...]:
        """`grow_candidates` on the static cache as one CUDA graph per tree shape: the
        committed length is an input on the device, so the same graph serves every round.
        (Static trees feed a different number of nodes per level and take the per-forward
        path instead.)"""
        cache, config = self.cache, self.tree
        cache.reserve(committed + (config.depth - 1) * config.top_k)
        inputs = {"root": root_hidden, "committed": torch.full((), committed, device=root_hidden.device)}
        with fused(self.head.fused):
            return cache.run(("grow", config.kind, config.depth, config.top_k), inputs,
                             lambda b: grow_candidates(self.head, cache, config, b["root"], b["committed"]),
                             graphed=cache.graphs.enabled)


def grow_candidates(head: DraftHead, cache, config: TreeConfig, root_hidden: torch.Tensor,
                    committed: int | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every candidate of one round, level by level from the root: (tokens, parents,
    path scores), root excluded, in drafting order (a parent before its children). A
    candidate's index is its place in that order plus one; the root is 0.

    The level's candidates are chosen from the head's next-token scores at the frontier;
    the ones chosen for the next frontier are fed back through the head, each seeing the
    committed entries and its own drafted ancestors (which sit in the cache after them).
    Everything stays on the head's device: the host only queues work. `committed` is a
    device scalar inside a captured round, whose length the graph does not know."""
    device = root_hidden.device
    tokens, parents, scores = [], [], []  # per level
    frontier_nodes = torch.zeros(1, dtype=torch.long, device=device)  # candidate indices, root = 0
    frontier_hidden = root_hidden
    frontier_scores = torch.zeros(1, device=device)
    ancestry = torch.zeros(1, 0, dtype=torch.bool, device=device)  # frontier rows over drafted entries
    size = 1
    for level in range(1, config.depth + 1):
        slots, draft_ids, cumulative, chosen = expand_level(
            frontier_scores, head.draft_logprobs(frontier_hidden), config, level
        )
        level_tokens = head.to_target_ids(draft_ids)
        tokens.append(level_tokens)
        parents.append(frontier_nodes[slots])
        scores.append(cumulative)
        level_nodes = torch.arange(size, size + slots.shape[0], device=device)
        size += slots.shape[0]
        if level == config.depth:
            break
        fed = chosen.shape[0]
        ancestry = torch.cat(
            [ancestry[slots[chosen]], torch.eye(fed, dtype=torch.bool, device=device)], dim=1
        )
        frontier_hidden = _feed(head, cache, frontier_hidden[slots[chosen]], level_tokens[chosen], ancestry,
                                committed, level)
        frontier_nodes, frontier_scores = level_nodes[chosen], cumulative[chosen]
    return torch.cat(tokens), torch.cat(parents), torch.cat(scores)


def _feed(head: DraftHead, cache, x: torch.Tensor, ids: torch.Tensor, ancestry: torch.Tensor,
          committed: int | torch.Tensor, level: int) -> torch.Tensor:
    """Run the head on a new frontier ([n, F] features, [n] tokens) at position
    committed + level - 1; row i sees the committed entries and the drafted entries
    that ancestry[i] marks (the last n are the rows themselves)."""
    n, device = ids.shape[0], x.device
    if isinstance(committed, int):
        positions = torch.full((1, n), committed + level - 1, device=device)
        return head(x[None], ids[None], positions, Attend(committed, ancestry), cache)[0]
    # Inside a graph: where the rows are written and what they see follow from the
    # committed length on the device. The cache's length stays `committed`.
    drafted = committed + torch.arange(ancestry.shape[1], device=device)  # slots of the drafted entries
    cache.write_at[:n] = drafted[-n:]
    mask = seen_on_device(cache.capacity, committed, drafted, ancestry)
    positions = (committed + level - 1).expand(1, n)
    return head.static_step(x[None], ids[None], positions, mask[None, None], cache)[0]


@torch.inference_mode()
def precompile_head(head: DraftHead, tree: TreeConfig) -> None:
    """Compile the head's static step for every shape family that sessions drafting `tree`
    run, through draft rounds that commit several pairs and one: the step sees the target's
    features then, and its own hidden states while drafting. Nothing to do uncompiled."""
    if head.static is None:
        return
    session = DraftSession(head, tree)
    try:
        if head.compiled is None:  # the session's cache made it, where the static path compiles
            return
        features = torch.zeros(2, head.feature_spec.dim(head.target_hidden_size), dtype=head.fc.weight.dtype)
        for pairs in (2, 2, 1):  # a fresh cache's first forward runs uncompiled (it allocates)
            session.draft(features[:pairs], [0] * pairs)
    finally:
        session.close()
