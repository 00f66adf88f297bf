"""Rounds on the device (aerie.device_round), greedy and sampled, run eagerly on the CPU: the
tree they select against the host's rerank, and whole generations against the split rounds
(and, greedy, plain decoding), through stop tokens, length limits and cache growth."""

from __future__ import annotations

import random

import pytest
import torch

from aerie.budget import explored_round
from aerie.device_round import DeviceRounds, PlainSteps, candidate_count, select_tree, warp_key
from aerie.drafter import DraftSession, grow_candidates
from aerie.engine import Engine
from aerie.kvcache import SlotCache
from aerie.params import MAX_SEED
from aerie.sampling import SamplingParams
from aerie.target import StaticKV, Target
from aerie.tree import CandidatePool, TreeConfig, rerank
from aerie.verifier import StopCriteria, VerifySession
from tests.capture import SimulatedGraphCache, simulate_graphs
from tests.test_engine import PROMPTS
from tests.tiny import tiny_head, tiny_target

# A capacity of 16 makes the caches grow inside generations.
STATIC = StaticKV(cuda_graphs=True, largest_graph=16, initial_capacity=16, pooled=2)
TREES = [TreeConfig(depth=4, top_k=3, total_tokens=9), TreeConfig(depth=1, top_k=4, total_tokens=2),
         TreeConfig(depth=3, top_k=1, total_tokens=3), TreeConfig(depth=2, top_k=2, total_tokens=50)]


def random_expansion(tree: TreeConfig, rng: random.Random, ties: bool,
                     best_first: bool = False) -> tuple[torch.Tensor, ...]:
    """Candidates shaped like `grow_candidates`' output: top_k children per frontier node,
    a frontier of the top_k best of each level, path scores that never rise along a path;
    with `best_first`, each node's children in descending score as `torch.topk` drafts them."""
    tokens, parents, scores = [], [], []
    frontier, size = [(0, 0.0)], 1
    for _ in range(tree.depth):
        level = []
        for node, score in frontier:
            steps = [0.0 if ties and rng.random() < 0.3 else -rng.choice([0.5, 1.0, rng.random()])
                     for _ in range(tree.top_k)]
            for step in sorted(steps, reverse=True) if best_first else steps:
                tokens.append(rng.randrange(1000))
                parents.append(node)
                scores.append(score + step)
                level.append((size, score + step))
                size += 1
        frontier = sorted(level, key=lambda c: -c[1])[: tree.top_k]
    return torch.tensor(tokens), torch.tensor(parents), torch.tensor(scores, dtype=torch.float32)


def as_paths(tokens: list[int], parents: list[int], scores: list[float]) -> set[tuple]:
    """A tree as the set of its root-to-node token paths with their scores: equal for equal
    trees in any order."""
    paths: list[tuple[int, ...]] = []
    for token, parent in zip(tokens, parents):
        paths.append((token,) if parent < 0 else paths[parent] + (token,))
    return {(path, round(score, 4)) for path, score in zip(paths, scores)}


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("tree", TREES, ids=lambda t: f"d{t.depth}-k{t.top_k}-n{t.total_tokens}")
def test_select_tree_keeps_the_nodes_rerank_keeps(tree, ties):
    rng = random.Random(7)
    for _ in range(20):
        tokens, parents, scores = random_expansion(tree, rng, ties)
        assert tokens.shape[0] == candidate_count(tree)
        got_tokens, got_parents, got_scores = select_tree(torch.tensor(99), tokens, parents, scores, tree.total_tokens)
        want = rerank(CandidatePool([99] + tokens.tolist(), [-1] + parents.tolist(),
                                    [0.0] + scores.double().tolist()), tree.total_tokens)
        # Parents come before their children, and the trees are the same, with the same scores.
        assert all(p < i for i, p in enumerate(got_parents.tolist()) if i)
        assert len(got_tokens) == len(want)
        assert as_paths(got_tokens.tolist(), got_parents.tolist(), got_scores.tolist()) == \
            as_paths(want.tokens.tolist(), want.parents.tolist(), want.logprobs.tolist())


def sibling_order(tokens: list[int], parents: list[int], scores: list[float]) -> dict[tuple, list[tuple]]:
    """Each node's children, as (token, score), in the tree's node order, keyed by the node's
    root path: equal when two trees order every node's siblings alike."""
    paths: list[tuple] = []
    children: dict[tuple, list[tuple]] = {}
    for token, parent, score in zip(tokens, parents, scores):
        node = (token, round(score, 4))
        paths.append((node,) if parent < 0 else paths[parent] + (node,))
        if parent >= 0:
            children.setdefault(paths[parent], []).append(node)
    return children


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("tree", TREES, ids=lambda t: f"d{t.depth}-k{t.top_k}-n{t.total_tokens}")
def test_select_tree_orders_siblings_as_rerank_does(tree, ties):
    """A sampled round tests a node's children in the tree's order and hands each the number
    of its rank among them (`aerie.verifier.TreeDraws`): the device's tree (drafting order)
    and the split round's (`rerank`: by depth, then score) must rank siblings alike. They do
    because the expansion drafts each node's children best first, as `torch.topk` returns them."""
    rng = random.Random(8)
    for _ in range(20):
        tokens, parents, scores = random_expansion(tree, rng, ties, best_first=True)
        got = select_tree(torch.tensor(99), tokens, parents, scores, tree.total_tokens)
        want = rerank(CandidatePool([99] + tokens.tolist(), [-1] + parents.tolist(),
                                    [0.0] + scores.double().tolist()), tree.total_tokens)
        assert sibling_order(*(t.tolist() for t in got)) == \
            sibling_order(want.tokens.tolist(), want.parents.tolist(), want.logprobs.tolist())


def test_candidate_count_is_what_the_expansion_drafts():
    target = Target(tiny_target("eagle3").model, tiny_target("eagle3").features, static=STATIC)
    head = tiny_head(target, "eagle3", 48)
    for tree in TREES:
        cache = head.new_cache()
        with torch.inference_mode():
            head(torch.zeros(1, 3, head.feature_spec.dim(target.hidden_size)), torch.tensor([[1, 2, 3]]),
                 torch.arange(3)[None], None, cache)
            tokens, parents, scores = grow_candidates(head, cache, tree, torch.randn(1, head.hidden_size),
                                                      torch.tensor(3))
        assert tokens.shape[0] == candidate_count(tree)
        # Each node's children come best first, which `select_tree`'s sibling order rests on.
        for parent in parents.unique().tolist():
            siblings = scores[parents == parent]
            assert (siblings[1:] <= siblings[:-1]).all()


def count_chained_launches(monkeypatch, launches: list) -> None:
    """Record in `launches` each device round launched chained to the one before (before the
    host read that one)."""
    launch = DeviceRounds.launch

    def counting(self, *args, **kwargs):
        if not args and kwargs.get("features") is None:
            launches.append(1)
        return launch(self, *args, **kwargs)

    monkeypatch.setattr(DeviceRounds, "launch", counting)


@pytest.fixture(scope="module", params=["eagle3", "eagle1"])
def static_pair(request):
    dynamic = tiny_target(request.param)
    target = Target(dynamic.model, dynamic.features, static=STATIC)
    return target, tiny_head(target, request.param, 48 if request.param == "eagle3" else None)


def test_device_rounds_generate_what_the_split_rounds_do(static_pair, monkeypatch):
    target, head = static_pair
    steps = []
    count_chained_launches(monkeypatch, steps)
    for tree in TREES:
        for prompt in PROMPTS:
            stop = StopCriteria(40)
            got = Engine(target, head, tree).generate(prompt, SamplingParams(), stop)
            want = Engine(target, head, tree, device_rounds=False).generate(prompt, SamplingParams(), stop)
            plain = Engine(target, None, tree).generate(prompt, SamplingParams(), stop, "vanilla")
            assert got.token_ids == want.token_ids == plain.token_ids
            assert [r.accepted for r in got.rounds] == [r.accepted for r in want.rounds]
            assert [r.tree_size for r in got.rounds] == [r.tree_size for r in want.rounds]
    assert len(steps) > 100  # every generation but its first round ran on the device, one ahead of the host


SAMPLED = [SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=0.7, top_p=0.9, seed=2**40 + 7),
           SamplingParams(temperature=1.3, top_p=0.8, top_k=10, seed=MAX_SEED)]


@pytest.mark.parametrize("params", SAMPLED, ids=lambda p: f"t{p.temperature}-p{p.top_p}-k{p.top_k}")
def test_sampled_device_rounds_generate_what_the_split_rounds_do(static_pair, params, monkeypatch):
    """The same seed gives the same tokens, round for round, on the device as in the split
    rounds: the same trees, tested with the same numbers in the same order."""
    target, head = static_pair
    steps = []
    count_chained_launches(monkeypatch, steps)
    accepted = []
    for tree in TREES + [TreeConfig(depth=4, top_k=8, total_tokens=20)]:
        for prompt in PROMPTS:
            stop = StopCriteria(40)
            got = Engine(target, head, tree).generate(prompt, params, stop)
            want = Engine(target, head, tree, device_rounds=False).generate(prompt, params, stop)
            assert got.token_ids == want.token_ids
            assert [r.accepted for r in got.rounds] == [r.accepted for r in want.rounds]
            assert [r.tree_size for r in got.rounds] == [r.tree_size for r in want.rounds]
            accepted += [r.accepted for r in got.rounds]
    assert len(steps) > 100
    assert sum(accepted) > 0  # drafts were accepted, not only bonus tokens drawn


def test_sampled_device_rounds_stop_where_the_split_rounds_stop(static_pair):
    target, head = static_pair
    tree, params = TREES[0], SAMPLED[0]
    free = Engine(target, head, tree, device_rounds=False).generate(PROMPTS[1], params, StopCriteria(30)).token_ids
    for stop in (StopCriteria(30, frozenset({free[9]})), StopCriteria(13)):
        got = Engine(target, head, tree).generate(PROMPTS[1], params, stop)
        want = Engine(target, head, tree, device_rounds=False).generate(PROMPTS[1], params, stop)
        assert got.token_ids == want.token_ids == free[: len(want.token_ids)]
        assert len(got.token_ids) == (free.index(free[9]) + 1 if stop.stop_token_ids else 13)


def test_device_rounds_stop_where_plain_decoding_stops(static_pair):
    target, head = static_pair
    tree = TREES[0]
    free = Engine(target, None, tree).generate(PROMPTS[1], SamplingParams(), StopCriteria(30), "vanilla").token_ids
    for stop, length in ((StopCriteria(30, frozenset({free[9]})), free.index(free[9]) + 1), (StopCriteria(13), 13)):
        got = Engine(target, head, tree).generate(PROMPTS[1], SamplingParams(), stop)
        assert got.token_ids == free[:length]


@pytest.mark.parametrize("params", [SamplingParams()] + SAMPLED[:2], ids=["greedy", "sampled", "top-p"])
def test_device_rounds_leave_the_sessions_as_the_split_round_does(static_pair, params):
    """Round by round, a device round and a split round from the same state leave both
    caches alike (the same entries in use, the same keys and values there), return the same
    tokens and features, and tell `--tree-budget auto` the same."""
    target, head = static_pair
    tree = TREES[0]
    prompt = PROMPTS[0]
    sessions = []
    for _ in range(2):
        verifier = VerifySession(target, params, StopCriteria(30), list(prompt))
        drafter = DraftSession(head, tree)
        features, first = verifier.prefill()
        result = verifier.verify(drafter.draft(features, list(prompt[1:]) + [first]))
        sessions.append((verifier, drafter, result))
    (v1, d1, r1), (v2, d2, r2) = sessions
    rounds = DeviceRounds(v1, d1)
    for _ in range(8):
        if v1.done:
            break
        r1 = rounds.step(r1.features, r1.new_tokens, explore=True)
        split_tree = d2.draft(r2.features, r2.new_tokens)
        r2 = v2.verify(split_tree)
        assert v1.generated == v2.generated and r1.new_tokens == r2.new_tokens
        assert v1.committed == v2.committed and d1.length == d2.length
        torch.testing.assert_close(r1.features, r2.features)
        for c1, c2, n in ((v1.cache, v2.cache, v1.committed), (d1.cache, d2.cache, d1.length)):
            torch.testing.assert_close(c1.storage[..., :n, :], c2.storage[..., :n, :])
        got = rounds.explored(r1.accepted_draft)
        want = explored_round(split_tree, d2.candidates(), r2.new_tokens[: r2.accepted_draft])
        torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-5)  # float32 scores
        assert torch.equal(got.depths, want.depths)
        assert got.path_depths == want.path_depths
        assert got.path_scores == pytest.approx(want.path_scores, rel=1e-5)
    for v, d, _ in sessions:
        v.close()
        d.close()


@pytest.mark.parametrize("params", [SamplingParams()] + SAMPLED[:2], ids=["greedy", "sampled", "top-p"])
def test_plain_steps_on_the_device_decode_what_the_host_loop_does(static_pair, params, monkeypatch):
    """Plain decoding one step ahead of the host gives the host loop's tokens, through stop
    tokens and length limits (a step launched past the end is dropped), generation after
    generation on the same pooled caches."""
    target, _ = static_pair
    chained = []
    launch = PlainSteps.launch
    monkeypatch.setattr(PlainSteps, "launch", lambda self: chained.append(self.in_flight == 1) or launch(self))
    for prompt in PROMPTS:
        free = Engine(target, None, TREES[0], device_rounds=False).generate(prompt, params, StopCriteria(30), "vanilla")
        stops = (StopCriteria(30), StopCriteria(30, frozenset({free.token_ids[9]})), StopCriteria(13), StopCriteria(1))
        for stop in stops:
            got = Engine(target, None, TREES[0]).generate(prompt, params, stop, "vanilla")
            want = Engine(target, None, TREES[0], device_rounds=False).generate(prompt, params, stop, "vanilla")
            assert got.token_ids == want.token_ids == free.token_ids[: len(want.token_ids)]
        resumed = Engine(target, None, TREES[0]).generate(prompt, params, StopCriteria(30), "vanilla",
                                                          resume_tokens=free.token_ids[:7])
        assert resumed.token_ids == free.token_ids[7:]  # the same positions, the same numbers
    assert sum(chained) > 100  # launched before the step before them was read


@pytest.mark.parametrize("mode", ["eagle", "vanilla"])
def test_a_stream_left_with_a_round_in_flight_harms_no_later_generation(static_pair, mode):
    """A consumer that stops reading (a client gone) leaves a round or step launched and
    unread: the caches go back to the pool, and the next generations there are exact."""
    target, head = static_pair
    engine, params = Engine(target, head, TREES[0]), SAMPLED[0]
    want = [Engine(target, head, TREES[0], device_rounds=False).generate(p, params, StopCriteria(30), mode).token_ids
            for p in PROMPTS]
    for left_after in (2, 4):
        stream = engine.stream(PROMPTS[0], params, StopCriteria(30), mode)
        for _ in range(left_after):  # the prefill, then rounds: the last one read had another launched after it
            next(stream)
        stream.close()
        assert [engine.generate(p, params, StopCriteria(30), mode).token_ids for p in PROMPTS] == want


def test_rounds_committing_other_pair_counts_keep_their_own_graphs(monkeypatch):
    """Engines whose deepest trees differ (a fixed tree, `--tree-budget auto`) share the pooled
    caches and may draft the same tree, but a round commits up to deepest + 1 pairs: each
    keeps a graph of its own, and taking turns recaptures neither."""
    simulate_graphs(monkeypatch)
    dynamic = tiny_target("eagle3")
    target = Target(dynamic.model, dynamic.features, static=STATIC)
    head = tiny_head(target, "eagle3", 48)
    tree, prompt = TREES[0], PROMPTS[0]
    verifier = VerifySession(target, SamplingParams(), StopCriteria(40), list(prompt))
    drafter = DraftSession(head, tree)
    features, first = verifier.prefill()
    result = verifier.verify(drafter.draft(features, list(prompt[1:]) + [first]))
    own_depth, deeper = DeviceRounds(verifier, drafter), DeviceRounds(verifier, drafter, deepest=tree.depth + 2)
    for rounds in (own_depth, deeper):  # sized for the generation: no cache grows below
        rounds.reserve(len(prompt), 40)
    captures = []
    for i in range(8):
        if verifier.done:
            break
        result = (own_depth, deeper)[i % 2].step(result.features, result.new_tokens)
        captures.append(SimulatedGraphCache.total_captures)
    assert len(captures) >= 4 and captures[1] == captures[-1]  # each captured its first round only
    verifier.close()
    drafter.close()


def test_sampled_rounds_fed_from_the_host_or_chained_run_one_graph(monkeypatch):
    """A generation's first device round is fed from the host, the rest are chained to the
    round before; sampled, both draw the same window of numbers and run one graph. With a
    graph each, `--tree-budget auto` captured mid-serving whenever a first round drew a tree
    no first round had drawn (3 captures at T=1 on an H100, 2026-12-07)."""
    simulate_graphs(monkeypatch)
    dynamic = tiny_target("eagle3")
    target = Target(dynamic.model, dynamic.features, static=STATIC)
    head = tiny_head(target, "eagle3", 48)
    tree, prompt = TREES[0], PROMPTS[0]
    verifier = VerifySession(target, SAMPLED[0], StopCriteria(40), list(prompt))
    drafter = DraftSession(head, tree)
    features, first = verifier.prefill()
    result = verifier.verify(drafter.draft(features, list(prompt[1:]) + [first]))
    rounds = DeviceRounds(verifier, drafter)
    rounds.reserve(len(prompt), 40)  # sized for the generation: no cache grows below
    before = SimulatedGraphCache.total_captures
    rounds.launch(result.features, result.new_tokens)
    for _ in range(4):
        rounds.launch()
        rounds.collect()
    assert SimulatedGraphCache.total_captures == before + 1
    rounds.discard()
    verifier.close()
    drafter.close()


def test_device_rounds_refuse_what_they_cannot_run(static_pair):
    target, head = static_pair
    sampled = VerifySession(target, SamplingParams(temperature=1.0, seed=1), StopCriteria(8), [1, 2, 3])
    greedy = VerifySession(target, SamplingParams(), StopCriteria(8), [1, 2, 3])
    assert isinstance(greedy.cache, SlotCache)
    assert DeviceRounds.supports(sampled, DraftSession(head, TREES[0]))
    assert not DeviceRounds.supports(greedy, DraftSession(head, TreeConfig.eagle1_static()))
    assert not DeviceRounds.supports(sampled, DraftSession(head, TreeConfig.eagle1_static()))
    with pytest.raises(ValueError, match="dynamic tree"):
        DeviceRounds(sampled, DraftSession(head, TreeConfig.eagle1_static()))
    rounds = DeviceRounds(greedy, DraftSession(head, TREES[0]))
    with pytest.raises(ValueError, match="commits 1 to 5 pairs"):
        rounds.step(torch.zeros(6, head.feature_spec.dim(target.hidden_size)), [1] * 6)
    with pytest.raises(ValueError, match="follows exactly one round in flight"):
        rounds.launch()


def test_a_round_graph_bakes_in_the_warp_not_the_seed():
    """The warp's settings are constants of a captured round, so they name its graph; the
    seed only changes the numbers the round is handed."""
    assert warp_key(SamplingParams()) is None
    assert warp_key(SamplingParams(temperature=0.7, seed=1)) == warp_key(SamplingParams(temperature=0.7, seed=2))
    keys = {warp_key(p) for p in (SamplingParams(temperature=0.7), SamplingParams(temperature=0.8),
                                  SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=0.7, top_k=5))}
    assert len(keys) == 4 and None not in keys
