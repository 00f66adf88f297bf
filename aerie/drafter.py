"""The drafter side of one sequence: the head's KV cache and tree drafting.

Head position i holds the pair (feature_i, token_{i+1}): the target's feature at position i
and the token that follows it, which is EAGLE's one-step shift. Each round the drafter first
appends the pairs the verifier just committed, then grows a tree from the last committed
token with the head's own outputs as features, and finally drops the drafted entries again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aerie.heads import DraftHead
from aerie.target import truncate_cache
from aerie.tree import CandidatePool, DraftTree, TreeConfig, expand_level, full_tree, rerank


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
        depths = [0] * len(pool.parents)
        for i in range(1, len(pool.parents)):
            depths[i] = depths[pool.parents[i]] + 1
        return torch.tensor(pool.logprobs[1:], dtype=torch.float64), torch.tensor(depths[1:])

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
        ids = torch.tensor(next_tokens, device=device)[None]
        positions = torch.arange(start, start + len(next_tokens), device=device)[None]
        mask = _mask(start, torch.ones(len(next_tokens), len(next_tokens), dtype=torch.bool).tril())
        hidden = head(features.to(device, head.fc.weight.dtype)[None], ids, positions, mask, self.cache)[0]
        committed = self.length

        pool = CandidatePool.rooted_at(next_tokens[-1])
        frontier_nodes = [0]
        frontier_hidden = hidden[-1:]
        frontier_logprobs = torch.zeros(1, device=device)
        fed: list[int] = []  # pool node of each drafted entry in the head cache, in order
        for level in range(1, self.tree.depth + 1):
            logprobs = head.draft_logprobs(frontier_hidden)
            slots, draft_ids, cumulative, next_frontier = expand_level(frontier_logprobs, logprobs, self.tree, level)
            tokens = head.to_target_ids(draft_ids)
            parents = torch.tensor(frontier_nodes, device=device)[slots]
            nodes = pool.add(tokens.cpu(), parents.cpu(), cumulative.cpu())
            if level == self.tree.depth:
                break
            # Feed the next frontier: each node attends to the committed pairs and to the
            # drafted entries of its own ancestors.
            frontier_nodes = [nodes[i] for i in next_frontier.tolist()]
            parent_hidden = frontier_hidden[slots[next_frontier]]
            sub = _ancestry(pool, fed, frontier_nodes)
            fed += frontier_nodes
            positions = torch.full((1, len(frontier_nodes)), committed + level - 1, device=device)
            frontier_hidden = head(
                parent_hidden[None], tokens[next_frontier][None], positions, _mask(committed, sub), self.cache
            )[0]
            frontier_logprobs = cumulative[next_frontier]
        truncate_cache(self.cache, committed)
        self._pool = pool
        return rerank(pool, self.tree.total_tokens) if self.tree.kind == "dynamic" else full_tree(pool)


def _ancestry(pool: CandidatePool, fed: list[int], new_nodes: list[int]) -> torch.Tensor:
    """[new, fed + new] boolean: which drafted entries each new node may attend to."""
    slot = {node: i for i, node in enumerate(fed + new_nodes)}
    sub = torch.zeros(len(new_nodes), len(fed) + len(new_nodes), dtype=torch.bool)
    for row, node in enumerate(new_nodes):
        while node > 0:
            if node in slot:
                sub[row, slot[node]] = True
            node = pool.parents[node]
    return sub


def _mask(committed: int, sub: torch.Tensor) -> torch.Tensor:
    """4-D attention mask (on the CPU, where it is built): everything committed, then the
    given pattern over new entries."""
    rows, cols = sub.shape
    mask = torch.ones(1, 1, rows, committed + cols, dtype=torch.bool)
    mask[0, 0, :, committed:] = sub
    return mask
