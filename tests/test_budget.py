"""`--tree-budget auto`: the counterfactual acceptance of smaller trees against rebuilding
them, the choice against brute force on synthetic cost curves, and lossless generation."""

from __future__ import annotations

import math
import random

import pytest
import torch

from aerie.budget import CostModel, ExploredRound, TreeBudget, acceptance_table, accepted_if, path_nodes
from aerie.engine import Engine
from aerie.device_round import DeviceRounds
from aerie.graphs import GraphCache, bucket_for
from aerie.sampling import SamplingParams
from aerie.target import StaticKV, Target
from aerie.tree import CandidatePool, DraftTree, TreeConfig, expand_level, rerank
from aerie.verifier import StopCriteria
from tests.tiny import tiny_head, tiny_target

DEPTH, TOP_K = 5, 4


def random_pool(seed: int) -> CandidatePool:
    """Candidates as the drafter expands them level by level, each with a unique token."""
    gen = torch.Generator().manual_seed(seed)
    config = TreeConfig("dynamic", DEPTH, TOP_K, 10)
    pool = CandidatePool(tokens=[0], parents=[-1], logprobs=[0.0])
    frontier, frontier_lp = [0], torch.zeros(1)
    for level in range(1, DEPTH + 1):
        child_lp = torch.log_softmax(2 * torch.randn(len(frontier), 50, generator=gen), dim=-1)
        slots, _, cumulative, nxt = expand_level(frontier_lp, child_lp, config, level)
        start = len(pool.tokens)
        nodes = list(range(start, start + len(slots)))
        pool.tokens += nodes
        pool.parents += torch.tensor(frontier)[slots].tolist()
        pool.logprobs += cumulative.tolist()
        frontier, frontier_lp = [nodes[i] for i in nxt.tolist()], cumulative[nxt]
    return pool


def depths_of(pool: CandidatePool) -> list[int]:
    depths = [0] * len(pool.parents)
    for i in range(1, len(pool.parents)):
        depths[i] = depths[pool.parents[i]] + 1
    return depths


def rebuilt_acceptance(pool: CandidatePool, path: list[int], total: int, depth: int) -> int:
    """Brute force: rebuild the tree of `total` nodes and `depth` levels, then accept the
    longest prefix of the true continuation that it contains."""
    keep = [i for i, d in enumerate(depths_of(pool)) if d <= depth]  # levels are added in order
    sub = CandidatePool(pool.tokens[: len(keep)], pool.parents[: len(keep)], pool.logprobs[: len(keep)])
    in_tree = set(rerank(sub, total).tokens.tolist())
    accepted = 0
    for node in path:
        if pool.tokens[node] not in in_tree:
            break
        accepted += 1
    return accepted


@pytest.mark.parametrize("seed", range(6))
def test_accepted_if_equals_rebuilding_the_smaller_tree(seed):
    pool = random_pool(seed)
    depths = depths_of(pool)
    rng = random.Random(seed)
    leaf = rng.choice([i for i, d in enumerate(depths) if d == DEPTH])
    path = []
    while leaf > 0:
        path.append(leaf)
        leaf = pool.parents[leaf]
    path.reverse()
    cut = rng.randrange(1, len(path) + 1)  # where the target stops agreeing
    path = path[:cut]
    round_ = ExploredRound(
        scores=torch.tensor(pool.logprobs[1:], dtype=torch.float64), depths=torch.tensor(depths[1:]),
        path_scores=tuple(pool.logprobs[i] for i in path), path_depths=tuple(depths[i] for i in path),
    )
    sizes = [1, 3, 7, 15, 31, len(pool.tokens) - 1]
    table = acceptance_table(round_, sizes, DEPTH)
    for i, total in enumerate(sizes):
        for depth in range(1, DEPTH + 1):
            assert accepted_if(round_, total, depth) == rebuilt_acceptance(pool, path, total, depth), (total, depth)
            assert table[i, depth - 1] == accepted_if(round_, total, depth), (total, depth)


def test_acceptance_table_of_a_rejected_root_and_of_tied_scores():
    tied = ExploredRound(scores=torch.tensor([-1.0, -1.0, -1.0, -2.0], dtype=torch.float64),
                         depths=torch.tensor([1, 1, 2, 2]), path_scores=(-1.0, -2.0), path_depths=(1, 2))
    nothing = ExploredRound(tied.scores, tied.depths, (), ())
    sizes = [1, 2, 3, 4]
    assert acceptance_table(nothing, sizes, 2).sum() == 0
    table = acceptance_table(tied, sizes, 2)
    for i, n in enumerate(sizes):
        for d in (1, 2):
            assert table[i, d - 1] == accepted_if(tied, n, d), (n, d)


def test_path_nodes_follows_the_accepted_tokens():
    tree = DraftTree(torch.tensor([9, 4, 5, 6, 7]), torch.tensor([-1, 0, 0, 2, 2]), torch.zeros(5))
    assert path_nodes(tree, [5, 7]) == [2, 4]
    assert path_nodes(tree, [4]) == [1]
    assert path_nodes(tree, []) == []


def tokens_per_round(rounds: list[ExploredRound], n: int, d: int, frame: tuple[int, int] = (63, DEPTH)) -> float:
    """Brute force of `TreeBudget.expected_tokens` for rounds of equal weight explored while
    `frame` ran: the tokens the frame's rounds commit over the rounds (n, d) would take."""
    covered = [accepted_if(r, *frame) + 1 for r in rounds]
    return sum(covered) / sum(c / (accepted_if(r, n, d) + 1) for c, r in zip(covered, rounds))


def synthetic_budget(verify_ms, draft_ms_per_level: float) -> TreeBudget:
    """A budget fed 200 explored rounds of random pools and a cost curve."""
    budget = TreeBudget(TreeConfig("dynamic", DEPTH, TOP_K, 63), largest_graph=64)
    rng = random.Random(0)
    for seed in range(40):
        pool = random_pool(100 + seed)
        depths = depths_of(pool)
        for _ in range(5):
            node, path = 0, []
            while depths[node] < DEPTH and rng.random() < 0.75:  # follow the best child mostly
                children = [c for c in range(1, len(depths)) if pool.parents[c] == node]
                if not children:  # not on the expanded frontier
                    break
                children.sort(key=lambda c: -pool.logprobs[c])
                node = children[0] if rng.random() < 0.7 or len(children) == 1 else children[1]
                path.append(node)
            budget.add_explored(ExploredRound(
                torch.tensor(pool.logprobs[1:], dtype=torch.float64), torch.tensor(depths[1:]),
                tuple(pool.logprobs[i] for i in path), tuple(depths[i] for i in path)))
    for bucket in (2, 4, 8, 16, 32, 64):
        budget.costs.verify_ms[bucket] = verify_ms(bucket)
    for depth in range(1, DEPTH + 1):
        budget.costs.draft_ms[depth] = draft_ms_per_level * depth
    return budget


@pytest.mark.parametrize("name,verify_ms", [
    ("gpu-like, flat", lambda tokens: 4.0 + 0.004 * tokens),
    ("cpu-like, steep", lambda tokens: 2.0 + 0.9 * tokens),
])
def test_choice_is_the_brute_force_best(name, verify_ms):
    budget = synthetic_budget(verify_ms, draft_ms_per_level=0.3)
    rates = {}
    for n in (1, 3, 7, 15, 31, 63):
        for d in range(1, DEPTH + 1):
            rates[(n, d)] = tokens_per_round(budget.log, n, d) / (0.3 * d + verify_ms(n + 1))
    assert budget.choice() == max(rates, key=rates.get)


def test_costlier_verification_chooses_smaller_trees():
    flat = synthetic_budget(lambda t: 4.0 + 0.004 * t, 0.3).choice()
    steep = synthetic_budget(lambda t: 2.0 + 0.9 * t, 0.3).choice()
    assert steep[0] < flat[0]


@pytest.mark.parametrize("device_rounds", [True, False], ids=["device-rounds", "split-rounds"])
def test_auto_budget_generation_is_lossless_and_learns(device_rounds, monkeypatch):
    target = tiny_target("eagle3")
    static = Target(target.model, target.features, static=StaticKV(largest_graph=16, initial_capacity=32))
    head = tiny_head(static, "eagle3", 48)
    budget = TreeBudget(TreeConfig("dynamic", 4, 3, 15), largest_graph=16, explore_every=4, warmup_measurements=1)
    engine = Engine(static, head, budget.largest, budget=budget, device_rounds=device_rounds)
    prompt = [3, 14, 15, 9, 26, 5]
    eagle = engine.generate(prompt, SamplingParams(), StopCriteria(40))
    plain = Engine(target, None, TreeConfig()).generate(prompt, SamplingParams(), StopCriteria(40), "vanilla")
    assert eagle.token_ids == plain.token_ids
    # With device rounds, a generation's first round (split) drafts the largest tree, whose
    # split graphs exist from the first generation on; the rest follow the choice.
    for _ in range(4):  # through the warm-up: every (size, depth) pair measured
        again = engine.generate(prompt, SamplingParams(), StopCriteria(40))
        assert again.token_ids == plain.token_ids
    if device_rounds:
        assert again.rounds[0].tree_size == budget.largest.total_tokens
        # The rest follow the choice (which one wins here depends on this machine's timings),
        # exploring with the largest tree now and then.
        monkeypatch.setattr(budget, "choice", lambda: (3, 2))
        chosen = engine.generate(prompt, SamplingParams(), StopCriteria(40))
        assert chosen.token_ids == plain.token_ids
        sizes = [r.tree_size for r in chosen.rounds[1:]]
        assert 3 in sizes and set(sizes) <= {3, budget.largest.total_tokens}
    assert len(budget.log) >= 2
    costs = budget.costs
    assert budget.pairs() == [(1, 1), (3, 1), (3, 2), (3, 3), (7, 2), (7, 3), (7, 4), (15, 3), (15, 4)]
    if device_rounds:
        # Every pair the choice weighs ran whole in warm-up and was measured: none is left to
        # capture its graph later, and none is priced by an estimate.
        assert set(costs.whole_ms) == {(bucket_for(n + 1, 16), d) for n, d in budget.pairs()}
    else:
        assert set(costs.verify_ms) >= {2, 4, 8, 16}  # every size was measured in warm-up
        assert set(costs.draft_ms) == {1, 2, 3, 4}  # and every depth: none is left to capture later
    assert budget.warmup_rounds == 0
    assert {r.tree_size for r in eagle.rounds} >= {1, 3, 7, 15}


def test_rounds_that_capture_graphs_are_not_measured(monkeypatch):
    target = tiny_target("eagle3")
    static = Target(target.model, target.features, static=StaticKV(largest_graph=16, initial_capacity=32))
    head = tiny_head(static, "eagle3", 48)
    budget = TreeBudget(TreeConfig("dynamic", 4, 3, 15), largest_graph=16, explore_every=4, warmup_measurements=1)
    launch = DeviceRounds.launch

    def capturing(self, *args, **kwargs):  # as if every device round captured its graph
        GraphCache.total_captures += 1
        return launch(self, *args, **kwargs)

    monkeypatch.setattr(DeviceRounds, "launch", capturing)
    Engine(static, head, budget.largest, budget=budget).generate([3, 14, 15, 9, 26, 5], SamplingParams(),
                                                                 StopCriteria(40))
    assert budget.costs.whole_ms == {}  # every device round captured: none is a measurement
    assert len(budget.log) >= 2  # while what they accepted still counts


def test_costs_are_plain_means_of_their_first_measurements_then_running_means():
    costs = CostModel(reference_depth=DEPTH, smoothing=0.25)
    samples = [4.0, 2.0, 3.0, 7.0]  # the first 1 / smoothing: their plain mean
    for ms in [99.0, *samples]:  # 99: the round that captured, not a measurement
        costs.observe_whole(8, DEPTH, ms)
    assert costs.whole(8, DEPTH) == pytest.approx(sum(samples) / len(samples))
    costs.observe_whole(8, DEPTH, 10.0)  # then each new one weighs `smoothing`
    assert costs.whole(8, DEPTH) == pytest.approx(0.75 * 4.0 + 0.25 * 10.0)
    for ms in (5.0, 1.0):
        costs.observe(16, 2, verify_ms=ms, draft_ms=2 * ms, rtt_ms=ms, host_ms=ms)
    assert (costs.verify_ms, costs.draft_ms) == ({16: 1.0}, {2: 2.0})  # the first was a capture
    assert costs.rtt_ms == pytest.approx(3.0) and costs.host_ms == pytest.approx(3.0)


def test_whole_rounds_are_measured_or_additive():
    """Rounds timed whole: a measured (bucket, depth) is its own mean; another is the
    reference depth's time at its bucket plus what its depth costs over the reference
    elsewhere; and the choice is the brute-force best of those costs."""
    whole = lambda bucket, depth: 3.0 + 0.01 * bucket + 0.4 * depth  # noqa: E731
    budget = synthetic_budget(lambda t: 0.0, 0.0)
    budget.costs = costs = CostModel(reference_depth=DEPTH)
    measured = [(b, DEPTH) for b in (2, 4, 8, 16, 32, 64)] + [(2, d) for d in range(1, DEPTH)] + [(16, 2)]
    for bucket, depth in measured:
        costs.observe_whole(bucket, depth, 99.0)  # the first round captures: not a measurement
        costs.observe_whole(bucket, depth, whole(bucket, depth))
    assert costs.whole(16, 2) == pytest.approx(whole(16, 2))
    assert costs.whole(8, 3) == pytest.approx(whole(8, 3))  # additive from (8, DEPTH), (2, 3), (2, DEPTH)
    assert CostModel(reference_depth=DEPTH).whole(8, 3) == math.inf  # nothing measured
    rates = {}
    for n in budget.sizes:
        for d in range(1, DEPTH + 1):
            rates[(n, d)] = tokens_per_round(budget.log, n, d) / whole(bucket_for(n + 1, 64), d)
    assert budget.choice() == max(rates, key=rates.get)


def test_exploration_thins_out_once_the_estimate_has_samples():
    budget = TreeBudget(TreeConfig("dynamic", DEPTH, TOP_K, 63), largest_graph=64, explore_every=4,
                        settle_after=3, settled_explore_every=16)
    budget._warmup.clear()
    budget.costs.verify_ms = {b: 1.0 + b for b in (2, 4, 8, 16, 32, 64)}  # the largest tree is never the choice
    pool = random_pool(0)
    depths = depths_of(pool)
    explored = []
    for round_ in range(1, 101):
        if budget.next_tree() == budget.largest:
            explored.append(round_)
            budget.add_explored(ExploredRound(torch.tensor(pool.logprobs[1:], dtype=torch.float64),
                                              torch.tensor(depths[1:]), (pool.logprobs[1],), (1,)))
    assert explored[:4] == [1, 5, 9, 17]  # every 4th until 3 are logged, then every 16th
    assert explored[4:] == list(range(33, 101, 16))


def test_explored_rounds_stand_for_the_rounds_between_explorations():
    """The warm-up explores every other round; a settled budget every 16th. Each explored
    round is weighted by that interval (a forced one by 1), so that the estimate is the mean
    over the rounds served, not over the explored ones: the warm-up's dense samples of its
    first answers do not outweigh what came after."""
    budget = TreeBudget(TreeConfig("dynamic", DEPTH, TOP_K, 63), largest_graph=64, explore_every=4,
                        settle_after=3, settled_explore_every=16)
    pool = random_pool(0)
    depths = depths_of(pool)
    first_child = next(c for c in range(1, len(depths)) if pool.parents[c] == 0)
    path = ((pool.logprobs[first_child],), (depths[first_child],))
    easy = ExploredRound(torch.tensor(pool.logprobs[1:], dtype=torch.float64), torch.tensor(depths[1:]), *path)
    hard = ExploredRound(easy.scores, easy.depths, (), ())  # the root's first child rejected
    assert budget.explore_interval == 2
    for _ in range(12):  # warm-up: each stands for 2 rounds
        budget.add_explored(easy)
    budget._warmup.clear()
    assert budget.explore_interval == 16  # settled: 12 logged
    for _ in range(3):  # each stands for 16 rounds
        budget.add_explored(hard)
    budget.add_explored(easy, weight=1)  # a generation's first round, at the largest tree by rule
    served = 12 * 2 + 3 * 16 + 1
    want = (12 * 2 + 1) / served  # the easy rounds' one accepted draft, over every round served
    assert budget.expected_accepted(63, DEPTH) == pytest.approx(want)
    assert budget.expected_accepted(62, DEPTH) == pytest.approx(want)  # a size off the table: the slow path
    unweighted = 13 / 16
    assert abs(want - unweighted) > 0.4


def test_deep_trees_are_rated_by_the_rounds_they_would_take_not_by_round_starts():
    """Text alternates 40 easy positions (the draft is right up to the block's end) with 40
    hard ones (the first draft token is wrong). A depth-2 tree is in use, and rounds are
    explored where its rounds start. A depth-5 tree would cross the easy blocks in fewer,
    longer rounds, so the plain mean of what it would commit at those starts overrates it;
    the estimate matches what it commits per round on the same text."""
    budget = TreeBudget(TreeConfig("dynamic", DEPTH, TOP_K, 63), largest_graph=64, window=10_000)
    chain = (torch.tensor([-1.0 - i for i in range(DEPTH)], dtype=torch.float64), torch.arange(1, DEPTH + 1))

    def run_lengths(depth: int, length: int = 8000) -> list[int]:
        """The draft tokens the target agrees with at each round start of a depth-`depth` tree."""
        pos, runs = 0, []
        while pos < length:
            block = pos % 80
            runs.append(40 - block if block < 40 else 0)
            pos += min(runs[-1], depth) + 1
        return runs

    starts = run_lengths(2)
    for run in starts:
        budget.add_explored(ExploredRound(*chain, tuple(chain[0][: min(run, DEPTH)].tolist()),
                                          tuple(range(1, min(run, DEPTH) + 1))), weight=1, frame=(63, 2))
    for depth in (1, 2, 3, DEPTH):
        served = 8000 / len(run_lengths(depth))  # tokens per round, counted on the text
        assert budget.expected_tokens(63, depth) == pytest.approx(served, rel=0.03)
    plain_mean = sum(min(run, DEPTH) + 1 for run in starts) / len(starts)
    assert plain_mean > 1.2 * 8000 / len(run_lengths(DEPTH))
    assert budget.expected_tokens(63, 2) == pytest.approx(sum(min(r, 2) + 1 for r in starts) / len(starts))


def test_host_work_between_rounds_is_part_of_the_cost():
    """A fixed cost per round makes rounds that commit more worth more: with enough of it the
    choice moves to a larger tree than the same curve without it."""
    verify = lambda tokens: 1.0 + 0.05 * tokens  # noqa: E731
    lean = synthetic_budget(verify, draft_ms_per_level=0.3).choice()
    heavy = synthetic_budget(verify, draft_ms_per_level=0.3)
    heavy.costs.observe(2, 1, verify(2), 0.3, host_ms=20.0)
    assert heavy.costs.host_ms == 20.0
    got = heavy.choice()
    rates = {}
    for n in heavy.sizes:
        for d in range(1, DEPTH + 1):
            rates[(n, d)] = tokens_per_round(heavy.log, n, d) / (heavy.costs.draft(d) + verify(n + 1) + 20.0)
    assert got == max(rates, key=rates.get)
    assert (got[0], got[1]) != lean and got[0] * got[1] > lean[0] * lean[1]


def test_running_means_follow_the_window():
    budget = TreeBudget(TreeConfig("dynamic", DEPTH, TOP_K, 63), largest_graph=64, window=3)
    for seed in range(5):
        pool = random_pool(seed)
        depths = depths_of(pool)
        path = [1 + seed % 3]
        budget.add_explored(ExploredRound(
            torch.tensor(pool.logprobs[1:], dtype=torch.float64), torch.tensor(depths[1:]),
            tuple(pool.logprobs[i] for i in path), tuple(depths[i] for i in path)))
    assert len(budget.log) == 3
    for n, d in ((1, 1), (7, 3), (63, DEPTH)):
        assert budget.expected_tokens(n, d) == pytest.approx(tokens_per_round(budget.log, n, d))


def test_graph_capture_rounds_do_not_count_as_costs():
    """The first round at each size and depth captures graphs and is far slower: the choice
    must still be the brute-force best of the steady costs, and every size stays eligible."""
    verify = lambda tokens: 4.0 + 0.02 * tokens  # noqa: E731
    budget = synthetic_budget(verify, draft_ms_per_level=0.3)
    steady = budget.choice()
    budget.costs = CostModel()
    captured = set()
    for bucket in (2, 4, 8, 16, 32, 64):
        for depth in range(1, DEPTH + 1):
            verify_ms = verify(bucket) * (1.0 if ("verify", bucket) in captured else 50.0)
            draft_ms = 0.3 * depth * (1.0 if ("draft", depth) in captured else 50.0)
            captured |= {("verify", bucket), ("draft", depth)}
            budget.costs.observe(bucket, depth, verify_ms, draft_ms)
    assert budget.choice() == steady
    assert budget.costs.verify_ms[2] == pytest.approx(verify(2)) and budget.costs.draft_ms[1] == pytest.approx(0.3)
