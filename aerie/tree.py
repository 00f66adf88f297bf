"""Draft trees: shapes, EAGLE-2 expansion and reranking, masks, positions and paths.

A tree is stored flat in topological order: node 0 is the root (the last committed token,
not yet seen by the target), and every node's parent comes before it. Everything here is a
pure function over small tensors, so the verifier can check a tree that arrives over the
network with the same code that the drafter used to build it.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Literal

import torch

from aerie import row_top_k

TreeKind = Literal["dynamic", "chain", "static"]

# Score rows wider than this are searched for their best k in two stages (`top_k_in_chunks`).
TOP_K_CHUNK = 1024

# EAGLE-1's static tree (`mc_sim_7b_63`): each entry is a path of sibling ranks from the root.
EAGLE1_STATIC_TREE: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (2,), (3,),
    (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1),
)


@dataclass(frozen=True)
class TreeConfig:
    """Shape of the draft tree. `depth` counts draft levels below the root, so one round can
    commit at most depth + 1 tokens (the bonus token included). `total_tokens` counts draft
    nodes, the root excluded."""

    kind: TreeKind = "dynamic"
    depth: int = 6
    top_k: int = 8
    total_tokens: int = 24

    def __post_init__(self) -> None:
        if self.kind not in ("dynamic", "chain", "static"):
            raise ValueError(f"tree kind must be dynamic, chain or static, got {self.kind!r}")
        if self.depth < 1 or self.top_k < 1 or self.total_tokens < 1:
            raise ValueError("tree depth, top_k and total_tokens must all be >= 1")

    @staticmethod
    def chain(depth: int) -> TreeConfig:
        return TreeConfig(kind="chain", depth=depth, top_k=1, total_tokens=depth)

    @staticmethod
    def eagle1_static() -> TreeConfig:
        depth = max(len(p) for p in EAGLE1_STATIC_TREE)
        top_k = 1 + max(max(p) for p in EAGLE1_STATIC_TREE)
        return TreeConfig(kind="static", depth=depth, top_k=top_k, total_tokens=len(EAGLE1_STATIC_TREE))


@dataclass
class DraftTree:
    """A candidate tree. tokens/parents/logprobs are 1-D of the same length n (root at 0,
    parent -1). logprobs[i] is the cumulative draft log-probability of node i's path (0 at the
    root); it orders siblings and feeds the acceptance statistics."""

    tokens: torch.Tensor  # int64 [n]
    parents: torch.Tensor  # int64 [n]
    logprobs: torch.Tensor  # float32 [n]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def depths(self) -> torch.Tensor:
        return node_depths(self.parents)


def validate_tree(tokens: torch.Tensor, parents: torch.Tensor, vocab_size: int, max_nodes: int) -> None:
    """Raise ValueError with a precise message unless this is a well-formed tree."""
    if tokens.dim() != 1 or parents.dim() != 1:
        raise ValueError("tree tokens and parents must be 1-D")
    n = tokens.shape[0]
    if n != parents.shape[0]:
        raise ValueError(f"tree has {n} tokens but {parents.shape[0]} parents")
    if n < 1:
        raise ValueError("tree must hold at least the root")
    if n > max_nodes:
        raise ValueError(f"tree has {n} nodes, more than the limit of {max_nodes}")
    # Plain lists: this runs on the host every round, where per-element tensor ops cost
    # microseconds each.
    par = parents.tolist()
    if par[0] != -1:
        raise ValueError("node 0 is the root and must have parent -1")
    for i in range(1, n):
        if not 0 <= par[i] < i:
            raise ValueError(
                f"node {i} has parent {par[i]}: each parent must be an earlier node "
                "(parents out of range or cycles are not allowed)"
            )
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size:
        raise ValueError(f"tree tokens must be in [0, {vocab_size})")


def node_depths(parents: torch.Tensor) -> torch.Tensor:
    # Plain lists: these run on the host every round, where per-element tensor ops cost
    # microseconds each.
    p = parents.tolist()
    depths = [0] * len(p)
    for i in range(1, len(p)):
        depths[i] = depths[p[i]] + 1
    return torch.tensor(depths, dtype=parents.dtype, device=parents.device)


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """mask[i, j] is True when node j is node i or one of its ancestors: tree attention."""
    par = parents.tolist()
    chains: list[list[int]] = []  # each node's ancestors, root first, then itself
    rows: list[int] = []
    for i, parent in enumerate(par):
        chain = (chains[parent] if i else []) + [i]
        chains.append(chain)
        rows += [i] * len(chain)
    mask = torch.zeros(len(par), len(par), dtype=torch.bool)
    mask[rows, [j for chain in chains for j in chain]] = True
    return mask.to(parents.device)


def ancestor_closure(parents: torch.Tensor) -> torch.Tensor:
    """[b, w] parents (-1 for roots) -> [b, w, w] bool, [r, i, j] True when node j is node i
    or one of its ancestors. Repeated squaring of the parent relation: log2(w) batched matrix
    products instead of a Python walk per node."""
    b, w = parents.shape
    eye = torch.eye(w, dtype=torch.bool, device=parents.device).expand(b, w, w)
    reach = eye | (torch.arange(w, device=parents.device)[None, None, :] == parents[:, :, None])
    steps = 1
    while steps < w:
        r = reach.float()
        reach = torch.bmm(r, r) > 0
        steps *= 2
    return reach


def retrieve_paths(parents: torch.Tensor) -> torch.Tensor:
    """One row per leaf: node indices from the root down to the leaf, padded with -1."""
    n = parents.shape[0]
    is_parent = torch.zeros(n, dtype=torch.bool)
    is_parent[parents[1:]] = True
    leaves = [i for i in range(n) if not is_parent[i]]
    depths = node_depths(parents)
    paths = torch.full((len(leaves), int(depths.max()) + 1), -1, dtype=torch.long)
    for row, leaf in enumerate(leaves):
        node = leaf
        while node >= 0:
            paths[row, depths[node]] = node
            node = int(parents[node])
    return paths


def children_table(parents: torch.Tensor) -> torch.Tensor:
    """children[i, j] is the j-th child of node i in tree order, -1 where there is none."""
    n = parents.shape[0]
    counts = torch.bincount(parents[1:], minlength=n) if n > 1 else torch.zeros(n, dtype=torch.long)
    width = max(int(counts.max()), 1) if n > 1 else 1
    table = torch.full((n, width), -1, dtype=torch.long)
    fill = [0] * n
    for i in range(1, n):
        p = int(parents[i])
        table[p, fill[p]] = i
        fill[p] += 1
    return table


# --- building: the drafter proposes candidates level by level, these functions choose -----


@dataclass
class CandidatePool:
    """Every node drafted during one round, before reranking. Index 0 is the root."""

    tokens: list[int]
    parents: list[int]
    logprobs: list[float]


def expand_level(
    frontier_logprobs: torch.Tensor, child_logprobs: torch.Tensor, config: TreeConfig, level: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose the candidates of one level and the next frontier among them.

    frontier_logprobs: [f] cumulative log-probs of the frontier nodes.
    child_logprobs: [f, V] the draft's next-token log-probs at each frontier node.
    level: the depth of the children being chosen (1 for the root's children).
    Returns (parent_slot [c], tokens [c], cumulative [c], next_frontier [m]): candidates as
    indices into the frontier, and which candidates get expanded at the next level.
    """
    f = frontier_logprobs.shape[0]
    if config.kind == "static":
        return _expand_static(frontier_logprobs, child_logprobs, level)
    k = config.top_k
    top_lp, top_tok = top_k(child_logprobs, k)  # [f, k]
    cumulative = (frontier_logprobs[:, None] + top_lp).reshape(-1)
    # expand, not repeat_interleave: no output size to compute, so nothing syncs under capture
    parent_slot = torch.arange(f, device=child_logprobs.device)[:, None].expand(f, k).reshape(-1)
    tokens = top_tok.reshape(-1)
    # EAGLE-2: the next frontier is the best top_k candidates of this level by path score.
    next_frontier = _stable_top(cumulative, min(k, cumulative.shape[0]))
    return parent_slot, tokens, cumulative, next_frontier


def _expand_static(
    frontier_logprobs: torch.Tensor, child_logprobs: torch.Tensor, level: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    slots, ranks, width = static_level_index(level, child_logprobs.device)
    top_lp, top_tok = top_k(child_logprobs, width)
    cumulative = frontier_logprobs[slots] + top_lp[slots, ranks]
    return slots, top_tok[slots, ranks], cumulative, torch.arange(slots.shape[0], device=slots.device)


@functools.lru_cache(maxsize=None)
def static_level_index(level: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The static tree's level `level` as (parent slot, sibling rank) per node, and how many
    top tokens a frontier node needs. Frontier slot s holds the s-th static path of length
    level - 1 (sorted order). Built once per device: a captured expansion reads them as
    constants and copies nothing from the host."""
    parents_level = _static_paths(level - 1)
    paths = _static_paths(level)
    slots = torch.tensor([parents_level.index(p[:-1]) for p in paths], device=device)
    ranks = torch.tensor([p[-1] for p in paths], device=device)
    return slots, ranks, 1 + max(p[-1] for p in paths)


def _static_paths(length: int) -> list[tuple[int, ...]]:
    if length == 0:
        return [()]
    return sorted(p for p in EAGLE1_STATIC_TREE if len(p) == length)


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(scores, k, dim=-1) over [rows, V]: the best k of each row, best first, as
    (values, indices); among equal scores the indices may differ. By `aerie.row_top_k`'s
    kernels where they run (a GPU), else `top_k_in_chunks`."""
    if row_top_k.available(scores, k):
        return row_top_k.row_top_k(scores, k)
    return top_k_in_chunks(scores, k)


def top_k_in_chunks(scores: torch.Tensor, k: int, chunk: int = TOP_K_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """`top_k` by PyTorch's top-k. A row that splits evenly into chunks wider than k is
    searched in two stages: the best k of every chunk, then the best k among those. PyTorch's
    top-k gives a short batch of rows one thread block each, which walks the whole draft
    vocabulary (8,192 to 49,152 wide) in radix passes; chunks spread each row over many
    blocks. The values are torch.topk's; among equal scores the indices may differ."""
    rows, width = scores.shape
    if chunk <= k or width <= chunk or width % chunk:
        return torch.topk(scores, k, dim=-1)
    values, index = torch.topk(scores.view(rows, width // chunk, chunk), k, dim=-1)
    index = index + torch.arange(0, width, chunk, device=scores.device)[:, None]
    best, where = torch.topk(values.reshape(rows, -1), k, dim=-1)
    return best, index.reshape(rows, -1).gather(1, where)


def _stable_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best scores, ties broken by lower index (so parents beat children)."""
    if row_top_k.available(scores[None], k):
        return row_top_k.row_top_k(scores[None], k)[1][0]
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]


def rerank(pool: CandidatePool, total_tokens: int) -> DraftTree:
    """EAGLE-2 rerank: keep the best `total_tokens` drafted nodes by cumulative log-prob.

    A node's path score never exceeds its parent's, and a stable sort puts an earlier-drafted
    parent before an equal-scoring child, so the kept set is closed under ancestors; the loop
    below re-adds ancestors anyway so that the invariant does not rest on float behaviour.
    The result is in topological order (by depth, then score) with the root at 0.
    """
    n = len(pool.tokens)
    scores = torch.tensor(pool.logprobs[1:], dtype=torch.float64)
    keep = set((_stable_top(scores, min(total_tokens, n - 1)) + 1).tolist())
    for node in list(keep):
        parent = pool.parents[node]
        while parent > 0 and parent not in keep:
            keep.add(parent)
            parent = pool.parents[parent]
    return _subtree(pool, sorted(keep))


def full_tree(pool: CandidatePool) -> DraftTree:
    return _subtree(pool, list(range(1, len(pool.tokens))))


def _subtree(pool: CandidatePool, nodes: list[int]) -> DraftTree:
    depth = [0] * len(pool.tokens)
    for i in range(1, len(pool.tokens)):
        depth[i] = depth[pool.parents[i]] + 1
    nodes = sorted(nodes, key=lambda i: (depth[i], -pool.logprobs[i], i))
    new_index = {0: 0}
    for j, node in enumerate(nodes, start=1):
        new_index[node] = j
    tokens = [pool.tokens[0]] + [pool.tokens[i] for i in nodes]
    parents = [-1] + [new_index[pool.parents[i]] for i in nodes]
    logprobs = [0.0] + [pool.logprobs[i] for i in nodes]
    return DraftTree(
        tokens=torch.tensor(tokens, dtype=torch.long),
        parents=torch.tensor(parents, dtype=torch.long),
        logprobs=torch.tensor(logprobs, dtype=torch.float32),
    )
