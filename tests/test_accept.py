"""Acceptance against references: greedy against brute-force path search; sampling by exact
enumeration (fractions) and by chi-squared tests over 10^5 vectorised draws, on synthetic
distributions and on a real (tiny) target with a real drafted tree."""

from __future__ import annotations

import itertools
import random
from fractions import Fraction

import numpy as np

import pytest
import torch
from scipy.stats import chisquare

from aerie.accept import (
    accept_greedy,
    accept_greedy_rows,
    accept_point_mass_rows,
    accept_sampled_path,
    accept_sampling,
)
from aerie.drafter import DraftSession
from aerie.params import MAX_SEED
from aerie.sampling import SamplingParams, position_uniform, position_uniforms, warp_probs
from aerie.tree import TreeConfig, children_table, node_depths
from aerie.verifier import TreeDraws, round_uniforms
from tests.tiny import tiny_head, tiny_target

# A small tree: root -> (a=0, b=2, c=1); a -> (1, 3); b -> (0,); a.1 -> (2,)
TOKENS = [3, 0, 2, 1, 1, 3, 0, 2]
PARENTS = [-1, 0, 0, 0, 1, 1, 2, 4]
V = 4


def markov_rows(seed: int) -> list[list[Fraction]]:
    """Next-token distribution given the last token, as exact fractions."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(V):
        w = (torch.randint(1, 9, (V,), generator=gen)).tolist()
        w[int(torch.randint(0, V, (1,), generator=gen))] = 0  # some zeros: residual edge cases
        rows.append([Fraction(x, sum(w)) for x in w])
    return rows


def exact_emitted(node: int, p: list[Fraction], rows, depth_left: int) -> dict[tuple[int, ...], Fraction]:
    """Reference: the distribution of the tokens emitted from `node` on, by enumeration."""
    out: dict[tuple[int, ...], Fraction] = {}
    remaining = Fraction(1)
    p = list(p)
    for child in [c for c in range(len(TOKENS)) if PARENTS[c] == node]:
        x = TOKENS[child]
        accept = min(Fraction(1), p[x])  # point-mass proposal: q(x) = 1
        for seq, pr in exact_emitted(child, rows[x], rows, depth_left - 1).items():
            out[(x,) + seq] = out.get((x,) + seq, 0) + remaining * accept * pr
        remaining *= 1 - accept
        if remaining == 0:
            break
        p[x] = Fraction(0)
        total = sum(p)
        p = [v / total for v in p]
    for v in range(V):
        if p[v]:
            out[(v,)] = out.get((v,), 0) + remaining * p[v]
    return out


def first_two(dist: dict[tuple[int, ...], Fraction], rows) -> dict[tuple[int, int], Fraction]:
    """Joint of the first two emitted tokens; a round that emits one token is followed by the
    target's own next token (the next round's root row)."""
    joint: dict[tuple[int, int], Fraction] = {}
    for seq, pr in dist.items():
        if len(seq) >= 2:
            joint[seq[:2]] = joint.get(seq[:2], 0) + pr
        else:
            for b in range(V):
                joint[(seq[0], b)] = joint.get((seq[0], b), 0) + pr * rows[seq[0]][b]
    return joint


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_recursive_rejection_is_exact_by_enumeration(seed):
    rows = markov_rows(seed)
    dist = exact_emitted(0, rows[TOKENS[0]], rows, 4)
    assert sum(dist.values()) == 1
    joint = first_two(dist, rows)
    r = TOKENS[0]
    for a, b in itertools.product(range(V), range(V)):
        assert joint.get((a, b), 0) == rows[r][a] * rows[a][b]


def chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test; expected is rescaled to the observed total (float rounding)."""
    expected = expected.double() * observed.sum() / expected.double().sum()
    return float(chisquare(observed.numpy(), expected.numpy()).pvalue)


def run_vectorised(rows_f: torch.Tensor, draws: int, seed: int, proposals=None) -> torch.Tensor:
    tokens, parents = torch.tensor(TOKENS), torch.tensor(PARENTS)
    target = rows_f[tokens]  # each node's next-token distribution
    gen = torch.Generator().manual_seed(seed)
    depth = int(node_depths(parents).max())
    sibling_u = torch.rand(draws, len(TOKENS), generator=gen, dtype=torch.float64)
    bonus_u = torch.rand(draws, depth + 1, generator=gen, dtype=torch.float64)
    accepted, length, bonus = accept_sampling(tokens, parents, target, sibling_u, bonus_u, proposals)
    # First two emitted tokens per draw.
    first = torch.where(length >= 2, _nth_accepted(accepted, tokens, 1), bonus)
    second_in_round = torch.where(length >= 3, _nth_accepted(accepted, tokens, 2), bonus)
    next_round = torch.multinomial(rows_f[first].float(), 1, generator=gen).squeeze(1)
    second = torch.where(length >= 2, second_in_round, next_round)
    return first * V + second


def _nth_accepted(accepted: torch.Tensor, tokens: torch.Tensor, depth: int) -> torch.Tensor:
    depths = node_depths(torch.tensor(PARENTS))
    at_depth = accepted & (depths == depth)[None]
    idx = at_depth.float().argmax(dim=1)
    return tokens[idx]


@pytest.mark.parametrize("seed", [0, 1])
def test_sampling_acceptance_chi_squared(seed):
    rows = markov_rows(seed)
    rows_f = torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)
    cells = run_vectorised(rows_f, 200_000, seed=100 + seed)
    observed = torch.bincount(cells, minlength=V * V).double()
    r = TOKENS[0]
    expected = torch.tensor([float(rows[r][a] * rows[a][b]) for a in range(V) for b in range(V)]) * cells.numel()
    keep = expected > 0
    assert observed[~keep].sum() == 0  # impossible outcomes never happen
    assert chi2_pvalue(observed[keep], expected[keep]) > 0.01


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_host_walk_takes_the_same_decisions_as_the_vectorised_walk(seed):
    # Repeated sibling tokens included (node 4 and 3 both propose token 1), so a token
    # rejected once has no mass left for its twin.
    gen = torch.Generator().manual_seed(seed)
    tokens, parents = torch.tensor(TOKENS), torch.tensor(PARENTS)
    probs = torch.softmax(0.5 * torch.randn(len(TOKENS), V, generator=gen, dtype=torch.float64), -1)
    draws = 400
    sibling_u = torch.rand(draws, len(TOKENS), generator=gen, dtype=torch.float64)
    bonus_u = torch.rand(draws, int(node_depths(parents).max()) + 1, generator=gen, dtype=torch.float64)
    accepted, _, bonus = accept_sampling(tokens, parents, probs, sibling_u, bonus_u)
    paths = set()
    for d in range(draws):
        acc = accept_sampled_path(tokens, parents, probs, sibling_u[d].tolist(), bonus_u[d].tolist())
        assert acc.path == torch.nonzero(accepted[d]).flatten().tolist()
        assert acc.bonus_token == int(bonus[d])
        paths.add(tuple(acc.path))
    assert len(paths) >= 4  # the draws reach several branches, not one path


def test_each_position_decides_its_own_candidates():
    """accept_sampled hands each node the random numbers of its own sequence position (its
    rank among its siblings), as a reference built with the vectorised walk does."""
    from aerie.sampling import position_uniform
    from aerie.tree import DraftTree
    from aerie.verifier import accept_sampled

    params = SamplingParams(temperature=0.9, seed=4)
    tokens, parents = torch.tensor(TOKENS), torch.tensor(PARENTS)
    tree = DraftTree(tokens, parents, torch.zeros(len(TOKENS)))
    logits = torch.randn(len(TOKENS), V, generator=torch.Generator().manual_seed(1)) * 2
    depths, children = node_depths(parents), children_table(parents)
    outcomes = set()
    for committed in range(3, 60):
        sibling_u = torch.zeros(1, len(TOKENS), dtype=torch.float64)
        bonus_u = torch.zeros(1, int(depths.max()) + 1, dtype=torch.float64)
        for d in range(int(depths.max()) + 1):
            bonus_u[0, d] = position_uniform(params.seed, committed + d + 1, 0)
            for parent in (depths == d).nonzero().flatten().tolist():
                for rank, child in enumerate(children[parent].tolist()):
                    if child >= 0:
                        sibling_u[0, child] = position_uniform(params.seed, committed + d + 1, rank + 1)
        accepted, _, bonus = accept_sampling(tokens, parents, warp_probs(logits, params), sibling_u, bonus_u)
        want = (torch.nonzero(accepted[0]).flatten().tolist(), int(bonus[0]))
        got = accept_sampled(tree, logits, committed, params)
        assert got == want
        outcomes.add(tuple(got[0]))
    assert len(outcomes) >= 3


def test_sampled_proposals_recover_target():
    """With children drawn i.i.d. from a draft q, the residual rule max(p - q, 0) applies."""
    gen = torch.Generator().manual_seed(7)
    p = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    draws, k = 200_000, 2
    children_tokens = torch.multinomial(q.float(), draws * k, replacement=True, generator=gen).view(draws, k)
    out = torch.empty(draws, dtype=torch.long)
    parents = torch.tensor([-1, 0, 0])
    target = torch.stack([p, p, p])  # rows of the children are irrelevant here
    su = torch.rand(draws, 3, generator=gen, dtype=torch.float64)
    bu = torch.rand(draws, 2, generator=gen, dtype=torch.float64)
    # Group draws by their sampled children so that each call sees one concrete tree.
    for pair in itertools.product(range(4), repeat=2):
        sel = (children_tokens == torch.tensor(pair)).all(1)
        if not sel.any():
            continue
        tokens = torch.tensor([0, *pair])
        accepted, length, bonus = accept_sampling(tokens, parents, target, su[sel], bu[sel], torch.stack([q, q, q]))
        first = torch.where(accepted[:, 1], tokens[1], torch.where(accepted[:, 2], tokens[2], bonus))
        out[sel] = first
    observed = torch.bincount(out, minlength=4).double()
    assert observed[3] == 0
    assert chi2_pvalue(observed[:3], p[:3]) > 0.01


def test_greedy_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(2, 12, (1,), generator=gen))
        parents = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)])
        tokens = torch.randint(0, 3, (n,), generator=gen)
        argmax = torch.randint(0, 3, (n,), generator=gen)
        got = accept_greedy(tokens, parents, argmax)
        # Brute force: every root path whose tokens each equal the argmax at their parent.
        best = [0]
        for node in range(n):
            path, cur = [], node
            while cur >= 0:
                path.append(cur)
                cur = int(parents[cur])
            path.reverse()
            if all(int(tokens[c]) == int(argmax[p]) for p, c in zip(path, path[1:])) and len(path) > len(best):
                best = path
        assert len(got.path) == len(best)
        assert all(int(tokens[c]) == int(argmax[p]) for p, c in zip(got.path, got.path[1:]))
        assert got.bonus_token == int(argmax[got.path[-1]])


def test_greedy_rows_equal_greedy_row_by_row():
    """Ragged trees padded into one batch (padding nodes are roots of their own and match
    any argmax): the same path, tie-break included, and bonus as accept_greedy per row."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        rows, width = int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(1, 20, (1,), generator=gen))
        tokens = torch.zeros(rows, width, dtype=torch.long)  # padding's token 0 = the argmax often
        parents = torch.full((rows, width), -1)
        argmax = torch.randint(0, 3, (rows, width), generator=gen)
        sizes = torch.randint(1, width + 1, (rows,), generator=gen).tolist()
        for r, n in enumerate(sizes):
            parents[r, :n] = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)])
            tokens[r, :n] = torch.randint(0, 3, (n,), generator=gen)
        path, length, bonus = accept_greedy_rows(tokens, parents, argmax)
        for r, n in enumerate(sizes):
            want = accept_greedy(tokens[r, :n], parents[r, :n], argmax[r, :n])
            assert path[r, : int(length[r])].tolist() == want.path
            assert (path[r, int(length[r]):] == -1).all()
            assert int(bonus[r]) == want.bonus_token


# Probabilities and uniforms drawn from a few exact values collide often: u equal to a
# residual, zero mass, a whole row on one token.
EXACT_VALUES = [0.0, 0.25, 0.5, 0.75, 1.0, 1 / 3, 2 / 3]


def random_rows(rng: random.Random, rows: int, vocab: int) -> torch.Tensor:
    """[rows, vocab] distributions of every kind the walk meets: warped (temperature, top-k,
    top-p zeroing tokens), one-hot, all zero, exact fractions, unnormalised (mass over 1)."""
    kind = rng.choice(["warped", "one_hot", "exact", "exact_normalised", "uniform"])
    if kind == "warped":
        params = SamplingParams(temperature=rng.choice([0.3, 1.0, 2.5]), top_p=rng.choice([0.5, 0.9, 1.0]),
                                top_k=rng.choice([0, 1, 2]))
        logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
        return warp_probs(logits * 3, params)
    if kind == "one_hot":
        return torch.nn.functional.one_hot(torch.tensor([rng.randrange(vocab) for _ in range(rows)]), vocab).double()
    values = [[rng.choice(EXACT_VALUES) if rng.random() < 0.7 else rng.random() for _ in range(vocab)]
              for _ in range(rows)]
    out = torch.tensor(values, dtype=torch.float64)
    if kind == "exact_normalised":
        out = out / out.sum(-1, keepdim=True).clamp_min(1e-300)
    if kind == "uniform":
        out = torch.full((rows, vocab), 1 / vocab, dtype=torch.float64)
    return out


def host_walk(tokens: torch.Tensor, parents: torch.Tensor, probs: torch.Tensor, level_u: torch.Tensor,
              bonus_u: torch.Tensor):
    """The split round's acceptance of one tree (`accept_sampled_path`), each node tested with
    the number its (depth, sibling rank) names as `TreeDraws` ranks siblings."""
    draws = TreeDraws.of(parents.tolist(), committed=0, seed=0)
    sibling_u = [0.0] + [float(level_u[draws.depth[c] - 1, draws.rank[c]]) for c in range(1, len(parents))]
    return accept_sampled_path(tokens, parents, probs, sibling_u, bonus_u.tolist()), draws


def test_point_mass_rows_take_the_host_walks_decisions():
    """Brute force over random ragged batches of random trees (repeated sibling tokens
    included) and distributions of every kind: the same path, padding and bonus token as
    the host walk, bit for bit."""
    rng = random.Random(3)
    lengths, later_siblings, twins = set(), 0, 0
    for _ in range(1500):
        batch, width, vocab = rng.randint(1, 4), rng.randint(1, 12), rng.randint(1, 6)
        tokens = torch.zeros(batch, width, dtype=torch.long)
        parents = torch.full((batch, width), -1)
        probs = torch.stack([random_rows(rng, width, vocab) for _ in range(batch)])
        sizes = [rng.randint(1, width) for _ in range(batch)]
        for r, n in enumerate(sizes):
            parents[r, :n] = torch.tensor([-1] + [rng.randrange(max(0, i - 3), i) if rng.random() < 0.5
                                                  else rng.randrange(i) for i in range(1, n)])
            tokens[r, :n] = torch.tensor([rng.randrange(vocab) for _ in range(n)])
        levels = width  # deep and wide enough for any tree of `width` nodes
        level_u = torch.tensor([[[rng.choice(EXACT_VALUES[:-1]) if rng.random() < 0.5 else rng.random()
                                  for _ in range(width)] for _ in range(levels)] for _ in range(batch)],
                               dtype=torch.float64)
        bonus_u = torch.rand(batch, levels + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(_))
        path, length, bonus = accept_point_mass_rows(tokens, parents, probs, level_u, bonus_u)
        for r, n in enumerate(sizes):
            want, draws = host_walk(tokens[r, :n], parents[r, :n], probs[r, :n], level_u[r], bonus_u[r])
            k = int(length[r])
            assert path[r, :k].tolist() == want.path
            assert (path[r, k:] == -1).all()
            assert int(bonus[r]) == want.bonus_token
            lengths.add(k)
            later_siblings += any(draws.rank[c] > 0 for c in want.path)
            par, tok = parents[r, :n].tolist(), tokens[r, :n].tolist()
            twins += any(par[i] == par[j] and tok[i] == tok[j] for i in range(1, n) for j in range(1, i))
    # The walks went deep, through siblings after the first, and past repeated tokens.
    assert max(lengths) >= 5 and later_siblings > 100 and twins > 100


def test_point_mass_rows_when_the_removed_mass_rounds_to_one():
    """Siblings whose rejected mass sums to 1 in float64 though each test had room to pass:
    the host walk gives the next sibling no residual (however much mass it has and however
    small its number), and so must the tensor walk."""
    largest_u = 1 - 2.0**-53  # position_uniform's largest value
    first = 1 - 2.0**-10
    second = 2.0**-10 - 2.0**-55  # first + second rounds to 1.0, second / (1 - first) does not
    assert first < largest_u and first + second == 1.0 and second / (1 - first) < largest_u
    tokens = torch.tensor([[0, 1, 2, 3]])
    parents = torch.tensor([[-1, 0, 0, 0]])
    probs = torch.zeros(1, 4, 4, dtype=torch.float64)
    probs[0, 0] = torch.tensor([0.25, first, second, 0.5], dtype=torch.float64)  # node c proposes token c
    level_u = torch.tensor([[[largest_u, largest_u, 0.0]]], dtype=torch.float64)
    bonus_u = torch.tensor([[0.9, 0.0]], dtype=torch.float64)
    path, length, bonus = accept_point_mass_rows(tokens, parents, probs, level_u, bonus_u)
    want, _ = host_walk(tokens[0], parents[0], probs[0], level_u[0], bonus_u[0])
    assert want.path == [0] and want.bonus_token == 0  # every child rejected: the one token left
    assert path[0, : int(length[0])].tolist() == want.path and int(bonus[0]) == want.bonus_token


def test_point_mass_rows_sum_the_removed_mass_in_the_walks_order():
    """(0.1 + 0.2) + 0.3 is not 0.1 + (0.2 + 0.3) in float64: a fourth sibling whose number
    equals its residual after the walk's sum passes, and would fail after the other one."""
    masses = [0.1, 0.2, 0.3, 0.2]
    walked = (masses[0] + masses[1]) + masses[2]
    assert walked != masses[0] + (masses[1] + masses[2])
    threshold = masses[3] / (1.0 - walked)
    assert threshold > masses[3] / (1.0 - (masses[0] + (masses[1] + masses[2])))
    tokens = torch.tensor([[0, 1, 2, 3, 4]])
    parents = torch.tensor([[-1, 0, 0, 0, 0]])
    probs = torch.zeros(1, 5, 5, dtype=torch.float64)
    probs[0, 0, 1:] = torch.tensor(masses, dtype=torch.float64)
    level_u = torch.tensor([[[0.9, 0.9, 0.9, threshold]]], dtype=torch.float64)
    bonus_u = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    path, length, _ = accept_point_mass_rows(tokens, parents, probs, level_u, bonus_u)
    want, _ = host_walk(tokens[0], parents[0], probs[0], level_u[0], bonus_u[0])
    assert want.path == [0, 4] and path[0, : int(length[0])].tolist() == want.path


def test_position_uniforms_are_position_uniform_bit_for_bit():
    rng = random.Random(5)
    seeds = [0, 1, 2, MAX_SEED, MAX_SEED - 1, 2**62 + 12345] + [rng.randrange(MAX_SEED + 1) for _ in range(20)]
    for seed in seeds:
        positions = np.array([rng.choice([0, 1, rng.randrange(1 << 20), rng.randrange(1 << 62)]) for _ in range(200)])
        indices = np.array([rng.choice([0, 1, rng.randrange(64), rng.randrange(1 << 40)]) for _ in range(200)])
        got = position_uniforms(seed, positions, indices)
        assert got.dtype == np.float64
        assert got.tolist() == [position_uniform(seed, int(p), int(i)) for p, i in zip(positions, indices)]


def test_round_uniforms_hold_every_number_tree_draws_hands_out():
    """Each node of a tree no deeper than `depth`, with no more than `width` children a node,
    finds its test's number and each path length its bonus number where `round_uniforms`
    says, as `TreeDraws` draws them."""
    rng = random.Random(6)
    for _ in range(50):
        depth, width = rng.randint(1, 6), rng.randint(1, 5)
        seed, committed = rng.randrange(MAX_SEED + 1), rng.randrange(1 << 16)
        parents, depths, widths = [-1], [0], [0]
        for node in range(1, 30):
            open_ = [p for p in range(node) if depths[p] < depth and widths[p] < width]
            if not open_:
                break
            parent = rng.choice(open_)
            parents.append(parent)
            depths.append(depths[parent] + 1)
            widths.append(0)
            widths[parent] += 1
        table = round_uniforms(seed, committed, depth, width)
        assert table.shape == (depth + 1, width + 1)
        draws = TreeDraws.of(parents, committed, seed)
        for node in range(1, len(parents)):
            assert table[draws.depth[node] - 1, draws.rank[node] + 1] == draws.sibling(node)
        for length in range(1, depth + 2):
            assert table[length - 1, 0] == draws.bonus(length)


def test_chi_squared_on_tiny_target_with_drafted_tree():
    """A real target and a real EAGLE-3 draft tree: the first two emitted tokens follow the
    target's own distribution (T=1, top-p 0.9), 10^5 vectorised draws."""
    vocab = 16
    target = tiny_target("eagle3", vocab=vocab)
    with torch.no_grad():
        target.model.lm_head.weight.mul_(0.15)  # flatter: more outcomes to test
    head = tiny_head(target, "eagle3")
    params = SamplingParams(temperature=1.0, top_p=0.9)
    prompt = [1, 5, 9, 2, 7]
    cache = target.new_cache()
    out = target.forward(cache, torch.tensor(prompt))
    root = 3
    tree = DraftSession(head, TreeConfig(kind="dynamic", depth=3, top_k=3, total_tokens=8)).draft(
        out.features, prompt[1:] + [root]
    )
    committed = cache.get_seq_length()
    probs = warp_probs(target.forward(cache, tree.tokens, tree_parents=tree.parents).logits, params)
    # The target's distribution after each possible first token (for one-token rounds).
    after_first = []
    for a in range(vocab):
        c = target.new_cache()
        after_first.append(warp_probs(target.forward(c, torch.tensor(prompt + [root, a])).logits[-1], params))
    after_first = torch.stack(after_first)
    del committed

    draws = 100_000
    gen = torch.Generator().manual_seed(11)
    depth = int(node_depths(tree.parents).max())
    accepted, length, bonus = accept_sampling(
        tree.tokens, tree.parents, probs,
        torch.rand(draws, len(tree), generator=gen, dtype=torch.float64),
        torch.rand(draws, depth + 1, generator=gen, dtype=torch.float64),
    )
    depths = node_depths(tree.parents)

    def nth(d):
        return tree.tokens[(accepted & (depths == d)[None]).float().argmax(1)]

    first = torch.where(length >= 2, nth(1), bonus)
    second = torch.where(length >= 3, nth(2), bonus)
    follow = torch.multinomial(after_first[first].float(), 1, generator=gen).squeeze(1)
    second = torch.where(length >= 2, second, follow)
    observed = torch.bincount(first * vocab + second, minlength=vocab * vocab).double()
    expected = (probs[0][:, None] * after_first).flatten() * draws
    keep = expected > 5
    assert observed[expected == 0].sum() == 0
    assert chi2_pvalue(observed[keep], expected[keep]) > 0.01
    assert bool((length > 1).any())  # the tree was actually used
    assert children_table(tree.parents).shape[1] > 1  # with siblings
