"""Acceptance of a verified draft tree: which path the target keeps, and its bonus token.

Pure functions over tensors. Node 0 is the root; `target_probs[i]` is the target's (warped)
distribution of the token that follows node i, so the children of node i are judged against
row i, and the bonus token is drawn from the row of the last accepted node.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from aerie.sampling import sample_from
from aerie.tree import ancestor_closure, children_table, node_depths


@dataclass(frozen=True)
class Acceptance:
    path: list[int]  # accepted node indices, root first (len >= 1)
    bonus_token: int  # drawn from the target at the last accepted node


def accept_greedy(tokens: torch.Tensor, parents: torch.Tensor, target_argmax: torch.Tensor) -> Acceptance:
    """Longest root path on which every token equals the target's argmax at its parent.

    Ties (only possible when siblings repeat a token) go to the earliest node.
    """
    # Plain lists on the host: reading the target's argmax is the round's one sync, and the
    # walk over a few dozen nodes is cheaper in Python than as per-element tensor ops.
    tok, par, best = tokens.tolist(), parents.tolist(), target_argmax.tolist()
    n = len(tok)
    on_path = [True] + [False] * (n - 1)
    depth = [0] * n
    for i in range(1, n):  # parents precede children, so one pass suffices
        depth[i] = depth[par[i]] + 1
        on_path[i] = on_path[par[i]] and tok[i] == best[par[i]]
    deepest = max((i for i in range(n) if on_path[i]), key=lambda i: (depth[i], -i))
    path = []
    node = deepest
    while node >= 0:
        path.append(node)
        node = par[node]
    path.reverse()
    return Acceptance(path=path, bonus_token=best[deepest])


def accept_greedy_rows(
    tokens: torch.Tensor, parents: torch.Tensor, target_argmax: torch.Tensor, reach: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`accept_greedy` for a batch of trees at once, as tensor ops (no per-node Python).

    tokens, parents, target_argmax: [b, w], one tree per row padded to w nodes; padding
    nodes are roots of their own (parent -1) and are never accepted. Returns (path [b, w]:
    each row's accepted node indices root first, padded with -1; length [b]: nodes on the
    path; bonus [b]: the target's argmax at the path's last node). A node is on the path when
    it and every ancestor below the root carry the target's argmax at their parents; the
    deepest such node wins, ties to the earliest. `reach` is `ancestor_closure(parents)` where
    the caller has it already. Device work only: it runs inside a CUDA graph.
    """
    w = parents.shape[1]
    index = torch.arange(w, device=parents.device)
    if reach is None:
        reach = ancestor_closure(parents)  # [b, w, w]: node i's ancestors, itself included
    matches = tokens == target_argmax.gather(1, parents.clamp_min(0))
    matches = (matches & (parents >= 0)) | (index == 0)  # the root always, padding never
    path, length, deepest = _deepest_chain(matches, reach)
    return path, length, target_argmax.gather(1, deepest)[:, 0]


def _deepest_chain(matches: torch.Tensor, reach: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The accepted path of each tree of a batch: the deepest node (ties to the earliest)
    whose ancestors below the root and itself all have `matches` ([b, w] bool, the root's
    True). Returns (path [b, w], root first, padded with -1; length [b]; that node [b, 1])."""
    b, w = matches.shape
    index = torch.arange(w, device=matches.device)
    on_path = ~(reach & ~matches[:, None, :]).any(-1)
    depth = reach.sum(-1) - 1
    rank = torch.where(on_path, depth * w + (w - 1 - index), -1)  # deepest, then earliest
    deepest = rank.argmax(-1, keepdim=True)  # [b, 1]
    on_chain = reach.gather(1, deepest[:, :, None].expand(b, 1, w))[:, 0]  # [b, w]
    # Ancestors precede descendants, so the path in index order runs root first.
    path = torch.sort(torch.where(on_chain, index, w + index), dim=1).values
    length = on_chain.sum(-1)
    path = torch.where(index[None, :] < length[:, None], path, -1)
    return path, length, deepest


def accept_point_mass_rows(
    tokens: torch.Tensor,
    parents: torch.Tensor,
    target_probs: torch.Tensor,
    level_u: torch.Tensor,
    bonus_u: torch.Tensor,
    reach: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`walk_point_mass` and the bonus draw of `accept_sampled_path` (a top-k tree's
    sampled acceptance) for a batch of trees at once, as tensor ops: device work only, no
    sync and no data-dependent shape, so it runs inside a CUDA graph. The same decisions on
    the same numbers, bit for bit.

    tokens, parents: [b, w], one tree per row padded to w nodes (padding nodes are roots of
    their own, parent -1, and are never accepted); target_probs: [b, w, V] float64, row i the
    (warped) target distribution after node i. A node of depth d that is the r-th child of
    its parent (in index order) is tested with level_u[:, d - 1, r] ([b, D, R]: D at least
    the trees' depth, R at least their most children); the bonus token after a path of k
    nodes is drawn with bonus_u[:, k - 1] ([b, D + 1]). Returns (path [b, w]: the accepted
    node indices root first, padded with -1; length [b]; bonus [b]) as `accept_greedy_rows`.

    The walk's test of a child depends only on its parent's row and its earlier siblings
    (the rejected tokens reset whenever the walk moves down), so every node's test is
    decided at once, and the accepted path follows each accepted node's first passing child.
    """
    b, w = parents.shape
    vocab = target_probs.shape[-1]
    levels, ranks = level_u.shape[1:]
    device = parents.device
    index = torch.arange(w, device=device)
    if reach is None:
        reach = ancestor_closure(parents)
    depth = reach.sum(-1) - 1
    is_node = parents >= 0  # padding and the root are tested by nobody
    earlier = index[None, :] < index[:, None]  # [c, j]: j comes before c
    siblings = (parents[:, :, None] == parents[:, None, :]) & earlier & is_node[:, :, None]  # [b, c, j]
    rank = siblings.sum(-1)
    # A token an earlier sibling proposed was rejected with it: it has no mass left.
    twin = (siblings & (tokens[:, :, None] == tokens[:, None, :])).any(-1)
    flat_probs = target_probs.reshape(b, w * vocab)
    p_token = flat_probs.gather(1, parents.clamp_min(0) * vocab + tokens.clamp(0, vocab - 1))
    mass = torch.where(is_node & ~twin, p_token, 0.0)
    # The mass the earlier siblings removed, summed one rank after the other as the walk
    # adds it, so that the float64 result is the walk's own: each step adds the one sibling
    # of that rank (a sum of it and exact zeros), or nothing past the node's own rank.
    sibling_mass = torch.where(siblings, mass[:, None, :], 0.0)
    removed = torch.zeros_like(mass)
    for r in range(ranks - 1):
        removed = removed + torch.where(rank[:, None, :] == r, sibling_mass, 0.0).sum(-1)
    residual = torch.where(removed < 1.0, mass / (1.0 - removed), 0.0)
    slot = (depth - 1).clamp(0, levels - 1) * ranks + rank.clamp_max(ranks - 1)
    u = level_u.reshape(b, levels * ranks).gather(1, slot)
    passes = is_node & (residual > 0) & (u <= residual)
    first = passes & ~(siblings & passes[:, None, :]).any(-1)  # the walk stops at the first that passes
    path, length, deepest = _deepest_chain(first | (index == 0), reach)
    # The bonus token: from the last node's row, less every child token it rejected (all of
    # its children: none passed), drawn with the number of the path's length.
    row = target_probs.gather(1, deepest[:, :, None].expand(b, 1, vocab))[:, 0]
    rejected = torch.where(parents == deepest, tokens, vocab)  # vocab: a spare column
    row = torch.cat([row, row.new_zeros(b, 1)], 1).scatter(1, rejected, 0.0)[:, :vocab]
    bonus = sample_from(row, bonus_u.gather(1, (length - 1)[:, None])[:, 0])
    return path, length, bonus


def accept_sampling(
    tokens: torch.Tensor,
    parents: torch.Tensor,
    target_probs: torch.Tensor,
    sibling_u: torch.Tensor,
    bonus_u: torch.Tensor,
    proposal_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recursive rejection sampling down the tree, vectorised over a batch of draws.

    At the current node the children are tried in tree order. Child c with token x and
    proposal distribution q_c is accepted when u * q_c(x) <= p(x), i.e. with probability
    min(1, p(x) / q_c(x)); on rejection the target distribution becomes the residual
    norm(max(p - q_c, 0)) and the next sibling is tried. When no child is accepted, the bonus
    token is drawn from the current (residual) distribution. This leaves the emitted tokens
    distributed exactly as the target's (SpecInfer, EAGLE).

    proposal_probs=None means each child is a deterministic proposal (q_c is the point mass on
    its token), which is how top-k trees are drafted: a child is then accepted with
    probability p(x) and rejection zeroes x out of p. Given [n, V], q_c = proposal_probs[c],
    valid when each child was sampled from q_c.

    tokens, parents: [n]; target_probs: [n, V]; sibling_u: [B, n], the uniform deciding each
    node's test; bonus_u: [B, depth + 1], the uniform of the bonus token when the accepted
    path holds 1, 2, ... nodes (each belongs to a different sequence position).
    Returns (accepted [B, n] bool, path length [B], bonus [B]).
    """
    n, vocab = target_probs.shape
    batch = bonus_u.shape[0]
    device = target_probs.device
    target_probs = target_probs.to(torch.float64)
    children = children_table(parents.cpu()).to(device)
    depth_max = int(node_depths(parents.cpu()).max())
    tokens = tokens.to(device)
    sibling_u = sibling_u.to(device)
    rows = torch.arange(batch, device=device)

    current = torch.zeros(batch, dtype=torch.long, device=device)
    residual = target_probs[0].expand(batch, vocab).clone()
    open_ = torch.ones(batch, dtype=torch.bool, device=device)  # still walking down
    accepted = torch.zeros(batch, n, dtype=torch.bool, device=device)
    accepted[:, 0] = True
    length = torch.ones(batch, dtype=torch.long, device=device)

    for _ in range(depth_max):
        moved = torch.zeros(batch, dtype=torch.bool, device=device)
        for j in range(children.shape[1]):
            child = children[current, j]  # [B]
            trying = open_ & ~moved & (child >= 0)
            if not bool(trying.any()):
                continue
            c = child.clamp_min(0)
            x = tokens[c]
            p_x = residual[rows, x]
            if proposal_probs is None:
                q = torch.nn.functional.one_hot(x, vocab).to(torch.float64)
            else:
                q = proposal_probs.to(device, torch.float64)[c]
            q_x = q[rows, x]
            ok = trying & (sibling_u[rows, c].to(torch.float64) * q_x <= p_x) & (p_x > 0)
            rejected = trying & ~ok
            # Accepted: move to the child, whose own target row becomes the distribution.
            current = torch.where(ok, c, current)
            residual = torch.where(ok[:, None], target_probs[c], residual)
            accepted[rows[ok], c[ok]] = True
            length = length + ok.long()
            moved |= ok
            # Rejected: residual <- norm(max(p - q, 0)).
            if bool(rejected.any()):
                res = (residual - q).clamp_min(0.0)
                total = res.sum(-1, keepdim=True)
                # A zero residual means p == q: nothing can follow, keep p (never sampled).
                res = torch.where(total > 0, res / total.clamp_min(1e-300), residual)
                residual = torch.where(rejected[:, None], res, residual)
        open_ &= moved

    bonus_u = bonus_u.to(device).gather(1, (length - 1)[:, None]).squeeze(1)
    bonus = sample_from(residual, bonus_u)
    return accepted, length, bonus


def accept_sampled_path(
    tokens: torch.Tensor,
    parents: torch.Tensor,
    target_probs: torch.Tensor,
    sibling_u: list[float],
    bonus_u: list[float],
) -> Acceptance:
    """`accept_sampling` for one draw of a top-k tree (deterministic proposals), walked on
    the host: the same tests on the same random numbers, with two reads from the device in
    all instead of one per child tried.

    With point-mass proposals, rejecting x only zeroes x out of the distribution, so the
    residual probability of a sibling's token is p(x) / (1 - the mass rejected so far): the
    walk needs each node's p(token) under its parent, read once, and touches the full row
    only to draw the bonus token."""
    tok, par = tokens.tolist(), parents.tolist()
    n = len(tok)
    device = target_probs.device
    rows = torch.tensor(par[1:], device=device)
    p_token = [0.0] + target_probs[rows, torch.tensor(tok[1:], device=device)].tolist() if n > 1 else [0.0]
    path, rejected = walk_point_mass(tok, par, p_token, sibling_u.__getitem__)
    row = target_probs[path[-1]].clone()
    if rejected:
        row[torch.tensor(rejected, device=device)] = 0.0
    bonus = int(sample_from(row, torch.tensor(bonus_u[len(path) - 1], device=device)))
    return Acceptance(path=path, bonus_token=bonus)


def walk_point_mass(
    tokens: Sequence[int], parents: Sequence[int], p_token: Sequence[float], sibling_u: Callable[[int], float]
) -> tuple[list[int], list[int]]:
    """The walk of `accept_sampled_path` over plain lists: node c (parent parents[c], token
    tokens[c]) has p_token[c], the target's probability of its token under its parent, and is
    tested with sibling_u(c), asked only for the nodes tested. Returns (accepted path, root
    first; the tokens rejected at its last node, which the bonus token's distribution leaves
    out)."""
    children: list[list[int]] = [[] for _ in tokens]
    for i in range(1, len(tokens)):
        children[parents[i]].append(i)
    path, rejected = [0], []
    while True:
        removed, moved = 0.0, False
        for c in children[path[-1]]:
            mass = 0.0 if tokens[c] in rejected else p_token[c]
            residual = mass / (1.0 - removed) if removed < 1.0 else 0.0
            if residual > 0 and sibling_u(c) <= residual:
                path.append(c)
                rejected, moved = [], True
                break
            rejected.append(tokens[c])
            removed += mass
        if not moved:
            return path, rejected


def path_from_mask(accepted_row: torch.Tensor) -> list[int]:
    """Accepted node indices of one draw, in root-to-leaf (= topological) order."""
    return torch.nonzero(accepted_row, as_tuple=False).flatten().tolist()
