"""`TreeBatch`: one draft tree per session row, padded into [rows, width] tensors.

The batched drafter gives one and the batched verifier takes one, so that a round's trees
cross from one to the other, and are checked, as a few tensors rather than one object per
session: host work per round then stays flat as sessions are added. A verify service that
gathers trees from separate streams packs them with `TreeBatch.from_trees`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aerie.batch.inputs import pack_rows, real_nodes
from aerie.tree import DraftTree


@dataclass(frozen=True)
class TreeBatch:
    tokens: torch.Tensor  # [b, w] int64; 0 past a row's size
    parents: torch.Tensor  # [b, w] int64; -1 past a row's size
    logprobs: torch.Tensor  # [b, w] float32: each node's cumulative draft log-probability
    sizes: tuple[int, ...]  # nodes per row; 0 for a row that sits the round out

    @classmethod
    def from_trees(cls, trees: Sequence[DraftTree | None]) -> TreeBatch:
        sizes = tuple(len(t) if t is not None else 0 for t in trees)
        width, b = max(sizes, default=0), len(trees)
        present = [t for t in trees if t is not None]
        logprobs = torch.zeros(b, width)
        if present:
            logprobs[real_nodes(sizes, width)] = torch.cat([t.logprobs.float() for t in present])
        return cls(
            tokens=pack_rows([t.tokens.tolist() if t is not None else [] for t in trees], width, b, 0),
            parents=pack_rows([t.parents.tolist() if t is not None else [] for t in trees], width, b, -1),
            logprobs=logprobs,
            sizes=sizes,
        )

    @classmethod
    def of_tokens(cls, tokens: Sequence[int]) -> TreeBatch:
        """One-node trees: each row feeds one token (plain decoding)."""
        n = len(tokens)
        return cls(torch.tensor(list(tokens), dtype=torch.long)[:, None], torch.full((n, 1), -1), torch.zeros(n, 1),
                   (1,) * n)

    def first_rows(self, n: int) -> TreeBatch:
        return TreeBatch(self.tokens[:n], self.parents[:n], self.logprobs[:n], self.sizes[:n])

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def tree(self, row: int) -> DraftTree | None:
        n = self.sizes[row]
        if n == 0:
            return None
        return DraftTree(self.tokens[row, :n], self.parents[row, :n], self.logprobs[row, :n])

    def invalid_rows(self, vocab_size: int, max_nodes: int) -> torch.Tensor:
        """[b] bool: rows holding a tree that `aerie.tree.validate_tree` would refuse (each
        parent an earlier node, the root's -1, tokens in the vocabulary, at most max_nodes),
        checked for every row at once."""
        b, w = self.tokens.shape
        real = real_nodes(self.sizes, w)
        column = torch.arange(w)[None, :]
        parent_ok = torch.where(column == 0, self.parents == -1, (self.parents >= 0) & (self.parents < column))
        token_ok = (self.tokens >= 0) & (self.tokens < vocab_size)
        bad = (real & ~(parent_ok & token_ok)).any(dim=1)
        return bad | (torch.tensor(self.sizes) > max_nodes)
