"""The drafter side of one sequence: the head's KV cache and tree drafting.

Head position i holds the pair (feature_i, token_{i+1}): the target's feature at position i
and the token that follows it, which is EAGLE's one-step shift. Each round the drafter first
appends the pairs the verifier just committed, then grows a tree from the last committed
token with the head's own outputs as features, and finally drops the drafted entries again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from aerie.fused import fused
from aerie.heads import DraftHead
from aerie.kvcache import Attend, SlotCache, additive_mask, pinned_tensor, seen_on_device
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


class Frontier(NamedTuple):
    """The nodes one drafting level expands: their candidate indices (the root is 0), the
    features the head reads at them, their path scores, and which drafted entries each
    sees ([f, drafted], the last f being the nodes themselves)."""

    nodes: torch.Tensor  # [f] long
    hidden: torch.Tensor  # [f, h]
    scores: torch.Tensor  # [f] float32
    ancestry: torch.Tensor  # [f, drafted] bool

    @staticmethod
    def root(hidden: torch.Tensor) -> Frontier:
        device = hidden.device
        return Frontier(torch.zeros(1, dtype=torch.long, device=device), hidden, torch.zeros(1, device=device),
                        torch.zeros(1, 0, dtype=torch.bool, device=device))


class Level(NamedTuple):
    """One level's candidates, in drafting order: target token ids, parent candidate indices
    and path scores, each [c]."""

    tokens: torch.Tensor
    parents: torch.Tensor
    scores: torch.Tensor


class Feed(NamedTuple):
    """The candidates chosen to be the next frontier, as the head is fed them: their
    parents' features and their own tokens; with their candidate indices, path scores and
    ancestry (the next `Frontier` but for the features the head gives them)."""

    hidden: torch.Tensor  # [m, h]
    ids: torch.Tensor  # [m]
    nodes: torch.Tensor  # [m]
    scores: torch.Tensor  # [m]
    ancestry: torch.Tensor  # [m, drafted + m]

    def frontier(self, hidden: torch.Tensor) -> Frontier:
        return Frontier(self.nodes, hidden, self.scores, self.ancestry)


def expand_frontier(head: DraftHead, config: TreeConfig, frontier: Frontier, size: int,
                    level: int) -> tuple[Level, Feed]:
    """Draft level `level` below `frontier` (the tree so far holds `size` nodes, root
    included): its candidates, and the ones chosen to be fed back through the head."""
    slots, draft_ids, cumulative, chosen = expand_level(frontier.scores, head.draft_logprobs(frontier.hidden),
                                                        config, level)
    tokens = head.to_target_ids(draft_ids)
    nodes = torch.arange(size, size + slots.shape[0], device=tokens.device)
    fed = slots[chosen]
    ancestry = torch.cat([frontier.ancestry[fed],
                          torch.eye(chosen.shape[0], dtype=torch.bool, device=tokens.device)], dim=1)
    return (Level(tokens, frontier.nodes[slots], cumulative),
            Feed(frontier.hidden[fed], tokens[chosen], nodes[chosen], cumulative[chosen], ancestry))


def expand_on_device(head: DraftHead, config: TreeConfig, frontier: Frontier, size: int, level: int,
                     committed: torch.Tensor, capacity: int) -> tuple[Level, Feed, torch.Tensor, ...]:
    """`expand_frontier` inside a graph, which does not know the committed length: also the
    fed rows' cache slots and positions, and the additive mask of what they see (the
    committed entries and their drafted ancestors, which follow them in the cache). One
    function, so that the static path compiles a level's bookkeeping into a few kernels
    instead of the thirty-odd small ones it is op by op."""
    level_candidates, feed = expand_frontier(head, config, frontier, size, level)
    n, drafted = feed.ancestry.shape
    slots = committed + torch.arange(drafted, device=committed.device)  # of the drafted entries
    seen = seen_on_device(capacity, committed, slots, feed.ancestry)
    positions = (committed + level - 1).expand(n)
    return level_candidates, feed, slots[-n:], positions, additive_mask(seen, feed.hidden.dtype)


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
    levels: list[Level] = []
    frontier, size = Frontier.root(root_hidden), 1
    on_device = not isinstance(committed, int)
    expand = head.compiled_part(expand_on_device) if on_device else None
    for level in range(1, config.depth + 1):
        if level == config.depth:
            levels.append(expand_frontier(head, config, frontier, size, level)[0])
            break
        if on_device:
            # Where the rows are written and what they see follow from the committed length
            # on the device. The cache's length stays `committed`.
            candidates, feed, slots, positions, mask = expand(head, config, frontier, size, level, committed,
                                                              cache.capacity)
            cache.write_at[: slots.shape[0]] = slots
            hidden = head.static_step(feed.hidden[None], feed.ids[None], positions[None], mask[None, None], cache)[0]
        else:
            candidates, feed = expand_frontier(head, config, frontier, size, level)
            positions = torch.full((1, feed.ids.shape[0]), committed + level - 1, device=root_hidden.device)
            hidden = head(feed.hidden[None], feed.ids[None], positions, Attend(committed, feed.ancestry), cache)[0]
        levels.append(candidates)
        frontier, size = feed.frontier(hidden), size + candidates.tokens.shape[0]
    return tuple(torch.cat(parts) for parts in zip(*levels))


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
