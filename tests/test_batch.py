"""Batched verification across sessions, on tiny targets on the CPU: outputs equal each
session's own (plain decoding greedy, the single-session eagle path sampled) while sessions of
different prompt lengths join and leave; the batched cache's per-row writes, compaction and
row moves against a brute-force reference; one row's forward against the unbatched tree
forward; a bad tree in one session is refused without disturbing the others."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from aerie.batch.cache import BatchKVCache, RowCompaction
from aerie.batch.draft import BatchDrafter, rerank_rows
from aerie.batch.engine import BatchConfig, BatchEngine
from aerie.batch.inputs import batch_inputs, pack_rows, tree_geometry
from aerie.batch.model import ForwardShape
from aerie.batch.trees import TreeBatch
from aerie.batch.verify import BatchVerifier, NewSession
from aerie.engine import Engine
from aerie.errors import InputError
from aerie.sampling import SamplingParams
from aerie.tree import CandidatePool, DraftTree, TreeConfig, ancestor_closure, ancestor_mask, node_depths, rerank
from aerie.verifier import StopCriteria, sample_token, sample_tokens
from tests.test_engine import PROMPTS, OracleDrafter
from tests.tiny import VOCAB, tiny_head, tiny_target

# Ragged: 1 to 20 prompt tokens, so rows differ in length and join at different times.
BATCH_PROMPTS = PROMPTS + [[5, 6, 7, 8], [9] * 20, [11], [30, 31, 32, 33, 34, 35, 36]]
TREE = TreeConfig(depth=4, top_k=3, total_tokens=9)


@pytest.fixture(scope="module", params=["eagle3", "eagle1"])
def pair(request):
    target = tiny_target(request.param)
    return target, tiny_head(target, request.param, 48 if request.param == "eagle3" else None)


@pytest.mark.parametrize("concurrency", [1, 3, 16])
def test_batched_greedy_equals_plain_decoding(pair, concurrency):
    """Sessions of different prompt lengths, stopping at different rounds (eagle), leave
    the running batch and queued ones take their rows."""
    target, head = pair
    stop = StopCriteria(26)
    want = [Engine(target, None, TREE).generate(p, SamplingParams(), stop, "vanilla").token_ids for p in BATCH_PROMPTS]
    # Joins split over forwards; then joins that wait for rows to free.
    for config in (BatchConfig(prefill_tokens=40), BatchConfig(prefill_tokens=40, join_rows=2)):
        engine = BatchEngine(target, head, TREE, config)
        for mode in ("vanilla", "eagle"):
            run = engine.generate_many(BATCH_PROMPTS, SamplingParams(), stop, mode, concurrency)
            assert [r.token_ids for r in run.results] == want
            assert run.new_tokens == 26 * len(BATCH_PROMPTS)


def test_sessions_join_once_enough_rows_are_free(pair, monkeypatch):
    target, _ = pair
    join = BatchVerifier.join
    stop = StopCriteria(30, frozenset({9, 21, 52}))  # sessions end at different rounds

    def joins(join_rows: int) -> list[int]:
        joined = []
        monkeypatch.setattr(BatchVerifier, "join", lambda self, new: joined.append(len(new)) or join(self, new))
        engine = BatchEngine(target, None, TREE, BatchConfig(join_rows=join_rows))
        engine.generate_many(BATCH_PROMPTS, SamplingParams(), stop, "vanilla", 3)
        assert sum(joined) == len(BATCH_PROMPTS) and joined[0] == 3
        return joined

    assert 1 in joins(1)[1:-1]  # one at a time, as rows free
    waited = joins(2)
    assert all(n >= 2 for n in waited[:-1]) and len(waited) > 2


def test_generation_keeps_no_autograd_state(pair):
    """Every model call runs without autograd: a prefill recorded for backward would chain
    its activations to the KV storage it writes, and they would pile up with every session
    that joins (on a GPU, until memory runs out)."""
    target, head = pair
    engine = BatchEngine(target, head, TREE)
    with torch.enable_grad():  # as a caller's default mode may be
        for mode in ("vanilla", "eagle"):
            engine.generate_many(BATCH_PROMPTS, SamplingParams(), StopCriteria(6), mode, 3)
    for name, cache in engine._caches.items():
        assert cache.storage.grad_fn is None and not cache.storage.requires_grad, name
    verifier = BatchVerifier(target, BatchKVCache(target.config.num_hidden_layers, 2, 64, target.device, False))
    with torch.enable_grad():
        prefilled = verifier.join([NewSession("a", tuple(BATCH_PROMPTS[0]), SamplingParams(), StopCriteria(4))])
    assert not prefilled[0].features.requires_grad and verifier.cache.storage.grad_fn is None


@pytest.mark.parametrize("tree", [TREE, TreeConfig.chain(3), TreeConfig.eagle1_static()], ids=lambda t: t.kind)
def test_batched_sampling_equals_the_single_session_path(pair, tree):
    """Same seeds, same trees (the batched drafter drafts what DraftSession drafts), same
    random numbers per position: the same tokens and the same acceptances, round by round."""
    target, head = pair
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(len(BATCH_PROMPTS))]
    params[2] = SamplingParams()  # greedy and sampled sessions mix in one batch
    params[3] = SamplingParams(0.7, 0.9, 20, 11)
    stop = StopCriteria(24)
    single = Engine(target, head, tree)
    want = [single.generate(p, s, stop, "eagle") for p, s in zip(BATCH_PROMPTS, params)]
    run = BatchEngine(target, head, tree).generate_many(BATCH_PROMPTS, params, stop, "eagle", concurrency=4)
    assert [r.token_ids for r in run.results] == [w.token_ids for w in want]
    assert [r.accepted for r in run.results] == [[x.accepted for x in w.rounds] for w in want]
    assert run.results[0].tau == pytest.approx(want[0].tau)


def test_batched_sampler_draws_what_sample_token_draws_row_by_row():
    """Rows of mixed settings (greedy, temperatures, top-k, top-p; rows sharing a setting
    but not a seed) at their own positions, from a strided view as a forward's output is: the
    tokens of `sample_token` row by row."""
    gen = torch.Generator().manual_seed(5)
    settings = [SamplingParams(), SamplingParams(1.0), SamplingParams(0.6), SamplingParams(1.3, top_k=7),
                SamplingParams(0.9, top_p=0.8), SamplingParams(1.1, 0.9, 40)]
    rows, vocab = 60, 500
    params = [replace(settings[r % len(settings)], seed=1000 + r) for r in range(rows)]
    positions = torch.randint(1, 4000, (rows,), generator=gen).tolist()
    logits = (torch.randn(rows + 4, 2, vocab, generator=gen) * 3)[:rows, 0]
    want = [sample_token(logits[r], positions[r], params[r]) for r in range(rows)]
    assert sample_tokens(logits, positions, params) == want
    assert sample_tokens(logits, [p + 1 for p in positions], params) != want  # the draws are the positions'
    assert sample_tokens(logits, positions, [settings[0]] * rows) == logits.argmax(-1).tolist()


def test_stop_tokens_end_sessions_like_plain_decoding(pair):
    target, head = pair
    engine = Engine(target, None, TREE)
    free = [engine.generate(p, SamplingParams(), StopCriteria(30), "vanilla").token_ids for p in BATCH_PROMPTS]
    stop = StopCriteria(30, frozenset({free[0][6], free[4][2]}))
    want = [engine.generate(p, SamplingParams(), stop, "vanilla").token_ids for p in BATCH_PROMPTS]
    assert len(want[0]) <= 7 and len(want[4]) <= 3
    for mode in ("vanilla", "eagle"):
        run = BatchEngine(target, head, TREE).generate_many(BATCH_PROMPTS, SamplingParams(), stop, mode, 4)
        assert [r.token_ids for r in run.results] == want


def test_oracle_trees_accept_long_paths_in_every_row():
    """Trees that are mostly right (and ragged: depths 6, 3 and 1) make compaction move
    entries in several rows at once; the output is still each session's plain decoding."""
    target = tiny_target("eagle3")
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    max_new = 40
    refs = [Engine(target, None, TREE).generate(p, SamplingParams(), StopCriteria(max_new), "vanilla").token_ids
            for p in prompts]
    oracles = [OracleDrafter(len(p), r + [0] * 10, depth=d, error_every=e, vocab=64)
               for p, r, d, e in zip(prompts, refs, (6, 3, 1), (1000, 4, 1000))]
    verifier = BatchVerifier(target, BatchKVCache(6, 4, 16, torch.device("cpu")))
    prefilled = verifier.join([NewSession(i, tuple(p), SamplingParams(), StopCriteria(max_new))
                               for i, p in enumerate(prompts)])
    pending = [(p.features, list(prompt[1:]) + [p.token]) for p, prompt in zip(prefilled, prompts)]
    accepted = []
    while not all(r.done for r in verifier.rows):
        trees = [o.draft(f, t) if not r.done else _root(r.generated[-1]) for o, (f, t), r in
                 zip(oracles, pending, verifier.rows)]
        live = [not r.done for r in verifier.rows]
        if not all(live):  # finished rows leave; this test keeps rows fixed, so stop there
            break
        results = verifier.verify(trees)
        accepted += [r.accepted_draft for r in results]
        pending = [(r.features, r.new_tokens) for r in results]
    for row, ref in zip(verifier.rows, refs):
        assert row.generated == ref[: len(row.generated)]
    assert max(accepted) >= 5 and verifier.cache.capacity > 16  # long paths; the cache grew


def _root(token: int) -> DraftTree:
    return DraftTree(torch.tensor([token]), torch.tensor([-1]), torch.zeros(1))


def test_bad_tree_in_one_session_is_refused_and_the_others_go_on(pair):
    target, _ = pair
    stop = StopCriteria(12)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    want = [Engine(target, None, TREE).generate(p, SamplingParams(), stop, "vanilla").token_ids for p in prompts]
    verifier = BatchVerifier(target, BatchKVCache(target.config.num_hidden_layers, 4, 64, torch.device("cpu")))
    verifier.join([NewSession(f"s{i}", tuple(p), SamplingParams(), stop) for i, p in enumerate(prompts)])

    def chains(bad_row=None):
        trees = []
        for i, row in enumerate(verifier.rows):
            tokens = torch.tensor([row.generated[-1], 1, 2, 3])
            parents = torch.tensor([-1, 0, 1, 5 if i == bad_row else 2])
            trees.append(DraftTree(tokens, parents, torch.zeros(4)))
        return trees

    before = ([list(r.generated) for r in verifier.rows], list(verifier.cache.lengths))
    with pytest.raises(InputError, match="session s1: node 3 has parent 5"):
        verifier.verify(chains(bad_row=1))
    assert ([list(r.generated) for r in verifier.rows], list(verifier.cache.lengths)) == before
    bad_root = chains()
    bad_root[2] = DraftTree(torch.tensor([63, 1]), torch.tensor([-1, 0]), torch.zeros(2))
    with pytest.raises(InputError, match="session s2: tree root 63"):
        verifier.verify(bad_root)
    while not verifier.rows[0].done:
        verifier.verify(chains())
    assert [r.generated for r in verifier.rows] == want
    with pytest.raises(InputError, match="session x: prompt is empty"):
        verifier.join([NewSession("x", (), SamplingParams(), stop)])
    assert verifier.cache.in_use == 3


def test_rows_without_a_tree_sit_the_round_out_and_resumed_sessions_continue(pair):
    """The verify service batches only the sessions with a round pending: the others are
    padding (None) and stay as they were. A session joining with resumed tokens continues
    exactly where plain decoding was."""
    target, _ = pair
    stop = StopCriteria(12)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    want = [Engine(target, None, TREE).generate(p, SamplingParams(), stop, "vanilla").token_ids for p in prompts]
    verifier = BatchVerifier(target, BatchKVCache(target.config.num_hidden_layers, 4, 64, torch.device("cpu")))
    verifier.join([NewSession(f"s{i}", tuple(p), SamplingParams(), stop) for i, p in enumerate(prompts[:2])])
    (resumed,) = verifier.join([NewSession("s2", tuple(prompts[2]), SamplingParams(), stop, tuple(want[2][:4]))])
    assert resumed.token == want[2][3] and resumed.features.shape[0] == len(prompts[2]) + 3
    assert verifier.rows[2].generated == want[2][:4]

    def chain(row: int) -> DraftTree:  # the right next token, then a wrong one
        g = verifier.rows[row].generated
        nxt = want[row][len(g)]
        return DraftTree(torch.tensor([g[-1], nxt, (nxt + 1) % VOCAB]), torch.tensor([-1, 0, 1]), torch.zeros(3))

    for pattern in ([0, 2], [1], [2], [0, 1, 2], [0]):
        before = {i: (list(verifier.rows[i].generated), verifier.cache.lengths[i]) for i in range(3) if i not in pattern}
        results = verifier.verify([chain(i) if i in pattern else None for i in range(3)])
        assert [r is not None for r in results] == [i in pattern for i in range(3)]
        assert all(r.accepted_draft == 1 for r in results if r is not None)
        assert {i: (list(verifier.rows[i].generated), verifier.cache.lengths[i]) for i in before} == before
    for row, w in zip(verifier.rows, want):
        assert row.generated == w[: len(row.generated)]
    with pytest.raises(InputError, match="cannot resume after 12 tokens"):
        verifier.join([NewSession("late", (1,), SamplingParams(), stop, tuple(want[0]))])
    with pytest.raises(InputError, match="3 of 4 rows are in use"):
        verifier.join([NewSession(f"n{i}", (1,), SamplingParams(), stop) for i in range(2)])


def test_a_session_joins_after_a_round_grew_the_cache():
    """A verify round (inference mode) that grows the storage, then a join (outside it) that
    writes into the grown storage: both sessions still decode as plain decoding does."""
    target = tiny_target("eagle3")
    stop = StopCriteria(10)
    want = [Engine(target, None, TREE).generate(p, SamplingParams(), stop, "vanilla").token_ids
            for p in (PROMPTS[0], PROMPTS[1])]
    verifier = BatchVerifier(target, BatchKVCache(6, 2, 8, torch.device("cpu")))
    verifier.join([NewSession("a", tuple(PROMPTS[0]), SamplingParams(), stop)])
    g = verifier.rows[0].generated
    verifier.verify([DraftTree(torch.tensor([g[-1], *want[0][1:4]]), torch.tensor([-1, 0, 1, 2]), torch.zeros(4))])
    assert verifier.cache.capacity > 8
    verifier.join([NewSession("b", tuple(PROMPTS[1]), SamplingParams(), stop)])
    while not any(r.done for r in verifier.rows):
        verifier.step_plain()
    for row, w in zip(verifier.rows, want):
        assert row.generated == w[: len(row.generated)] and len(row.generated) >= 6


def test_each_row_of_a_batched_tree_forward_equals_the_unbatched_forward():
    """Ragged trees over rows of different lengths, padded in both dimensions: every real
    node's logits and features equal Target.forward's on that session alone."""
    target = tiny_target("eagle3")
    prompts = [PROMPTS[2], PROMPTS[1], PROMPTS[0]]
    trees = [([7, 4, 5, 6, 7, 8, 10], [-1, 0, 0, 1, 1, 3, 2]), ([9], [-1]), ([3, 2, 2], [-1, 0, 1])]
    verifier = BatchVerifier(target, BatchKVCache(6, 4, 32, torch.device("cpu")))
    verifier.join([NewSession(i, tuple(p), SamplingParams(), StopCriteria(8)) for i, p in enumerate(prompts)])
    with torch.inference_mode():  # as verify() runs it
        batch = TreeBatch.from_trees([DraftTree(torch.tensor(t), torch.tensor(p), torch.zeros(len(t))) for t, p in trees])
        logits, feats = verifier.batch_model.forward(batch, argmax=False)
    assert logits.shape[:2] == (4, 8)  # 3 sessions -> 4 rows, 7 nodes -> 8 columns
    for r, (prompt, (tokens, parents)) in enumerate(zip(prompts, trees)):
        cache = target.new_cache()
        target.forward(cache, torch.tensor(prompt))
        want = target.forward(cache, torch.tensor(tokens), tree_parents=torch.tensor(parents))
        n = len(tokens)
        torch.testing.assert_close(logits[r, :n], want.logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(feats[r, :n], want.features, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(logits).all() and torch.isfinite(feats).all()  # padding rows too


def test_graphed_prefills_equal_each_prompt_alone_and_touch_no_other_row():
    """Joins replayed as graphs (the CPU stand-in): prompts padded to a [batch, width] bucket,
    the padding rows' tokens sent to a scratch slot. Each joining row's logits, features and
    cache entries equal the prompt's own forward, the rows already in use keep theirs, and a
    later join of the same bucket replays the graph without touching an earlier join's outputs."""
    from aerie.bench.host_work import Census, stand_in_graphs

    target = tiny_target("eagle3")
    with stand_in_graphs(Census()):
        cache = BatchKVCache(6, 8, 128, torch.device("cpu"))
    model = target.batch_model(cache)
    joins = [[PROMPTS[0], [9] * 40], [[5, 6, 7], [3] * 33, [11]], [[30, 31], [8] * 50]]
    assert [model.prefill_shape(len(j), max(map(len, j))) for j in joins] == [(2, 64, True), (4, 64, True), (2, 64, True)]

    outputs, rows = [], []
    for join in joins:
        before = cache.storage.clone() if cache.storage is not None else None
        first = cache.in_use
        logits, feats = model.prefill(join)
        outputs.append((join, logits, feats, logits.clone(), feats.clone()))
        rows += [(first + i, p) for i, p in enumerate(join)]
        if before is not None:  # every entry of the rows in use before the join is as it was
            for row in range(first):
                n = cache.lengths[row]
                assert torch.equal(cache.storage[:, :, row, :, :n], before[:, :, row, :, :n])
    assert cache.graphs.captures == 2  # the third join replayed the first one's graph

    for join, logits, feats, logits_then, feats_then in outputs:
        assert torch.equal(logits, logits_then) and torch.equal(feats, feats_then)
        for r, prompt in enumerate(join):
            want = target.forward(target.new_cache(), torch.tensor(prompt))
            torch.testing.assert_close(logits[r], want.logits[-1], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(feats[r, : len(prompt)], want.features, rtol=1e-4, atol=1e-4)
    # The entries themselves: a plain forward over each row's cache continues as the prompt's own.
    with torch.inference_mode():
        batch = TreeBatch.of_tokens([4] * cache.in_use)
        logits, _ = model.forward(batch, argmax=False)
    for row, prompt in rows:
        want = target.forward(target.new_cache(), torch.tensor([*prompt, 4]))
        torch.testing.assert_close(logits[row, 0], want.logits[-1], rtol=1e-4, atol=1e-4)


def test_graphed_head_joins_equal_eager_joins(pair):
    """The head's join replayed as a graph (the CPU stand-in), padded to its bucket: every
    joining row's root and cache entries equal an eager join's, the rows in use keep theirs,
    and the trees drafted next are the same."""
    from aerie.bench.host_work import Census, stand_in_graphs

    target, head = pair
    with stand_in_graphs(Census()):
        graphed = BatchDrafter(head, TREE, BatchKVCache(1, 8, 128, torch.device("cpu")))
    eager = BatchDrafter(head, TREE, BatchKVCache(1, 8, 128, torch.device("cpu"), cuda_graphs=False))
    for join in [[PROMPTS[0], [9] * 40], [[5, 6, 7], [3] * 33, [11]], [[30, 31], [8] * 50]]:
        features = [target.forward(target.new_cache(), torch.tensor(p)).features for p in join]
        pairs = [[*p[1:], 4] for p in join]
        first = graphed.cache.in_use
        before = None if graphed.cache.storage is None else graphed.cache.storage.clone()
        for drafter in (graphed, eager):
            drafter.join(features, pairs)
        for row in range(first):
            n = graphed.cache.lengths[row]
            assert torch.equal(graphed.cache.storage[:, :, row, :, :n], before[:, :, row, :, :n])
    assert graphed.cache.graphs.captures == 2  # the third join replayed the first one's graph

    n = eager.cache.in_use
    assert graphed.cache.lengths[:n] == eager.cache.lengths[:n] and graphed.root_tokens[:n] == eager.root_tokens[:n]
    torch.testing.assert_close(graphed.root_hidden[:n], eager.root_hidden[:n], rtol=1e-4, atol=1e-4)
    for row in range(n):
        length = eager.cache.lengths[row]
        torch.testing.assert_close(graphed.cache.storage[:, :, row, :, :length], eager.cache.storage[:, :, row, :, :length],
                                   rtol=1e-4, atol=1e-4)
    trees = [d.draft([None] * n, [[]] * n) for d in (graphed, eager)]
    assert torch.equal(trees[0].tokens, trees[1].tokens) and torch.equal(trees[0].parents, trees[1].parents)


def test_prefills_past_the_graph_budget_or_the_cache_run_eagerly():
    from aerie.bench.host_work import Census, stand_in_graphs

    target = tiny_target("eagle3")
    with stand_in_graphs(Census()):
        model = target.batch_model(BatchKVCache(6, 8, 128, torch.device("cpu")), prefill_graph_tokens=256)
    assert model.prefill_shape(3, 5) == (4, 32, True)
    assert model.prefill_shape(4, 64) == (4, 64, True)
    assert model.prefill_shape(5, 64) == (5, 64, False)  # 8 x 64 tokens: past the budget
    assert model.prefill_shape(1, 128) == (1, 128, False)  # no scratch slot left in the cache
    eager = target.batch_model(BatchKVCache(6, 8, 128, torch.device("cpu")))
    assert eager.prefill_shape(3, 5) == (3, 5, False)  # no graphs


def test_plain_decoding_of_any_row_count_is_graphed():
    """`largest_graph` bounds a forward's width (tokens per row), not its rows: plain decoding
    of 300 sessions is one 1-wide forward over the 512-row bucket, replayed as a graph."""
    target = tiny_target("eagle3")
    model = BatchVerifier(target, BatchKVCache(6, 512, 8, torch.device("cpu"))).batch_model
    plain = TreeBatch.of_tokens([1] * 300)
    assert model.shape_for(plain, argmax=False) == ForwardShape(batch=512, width=1, graphed=True, argmax=False)
    wide = DraftTree(torch.ones(129, dtype=torch.long), torch.arange(-1, 128), torch.zeros(129))
    assert not model.shape_for(TreeBatch.from_trees([wide]), argmax=False).graphed


def test_pack_rows_places_ragged_rows_and_padding():
    packed = pack_rows([[4, 5, 6], [], [7]], width=4, batch=4, fill=-1)
    assert packed.tolist() == [[4, 5, 6, -1], [-1, -1, -1, -1], [7, -1, -1, -1], [-1, -1, -1, -1]]
    assert pack_rows([], width=2, batch=1, fill=0).tolist() == [[0, 0]]


def test_batch_inputs_masks_and_positions():
    trees = [[-1, 0, 0, 1, 1, 3, 2], [-1], [-1, 0, 1]]
    out = batch_inputs([[1] * 7, [2], [3] * 3], trees, lengths=[5, 2, 0, 0], width=8, batch=4, capacity=16, first_row=0)
    positions, mask = tree_geometry(out.parents, out.lengths, 16)
    for r, parents in enumerate(trees):
        n, length = len(parents), [5, 2, 0][r]
        p = torch.tensor(parents)
        assert positions[r, :n].tolist() == (length + node_depths(p)).tolist()
        assert out.slots[r].tolist() == list(range(length, length + 8))
        m = mask[r, 0]
        assert m[:n, :length].all() and torch.equal(m[:n, length : length + n], ancestor_mask(p))
        assert not m[:n, length + n :].any()
        pad = torch.arange(n, 8)
        assert m[pad].sum(-1).tolist() == [length + 1] * len(pad) and m[pad, length + pad].all()
    assert mask[3, 0].sum(-1).tolist() == [1] * 8  # a free row: its own slot only
    assert out.rows[:, 0].tolist() == [0, 1, 2, 3]
    chain = batch_inputs([[4, 5, 6], [7]], None, lengths=[1, 3], width=4, batch=2, capacity=8, first_row=2)
    positions, mask = tree_geometry(chain.parents, chain.lengths, 8)
    assert positions.tolist() == [[1, 2, 3, 1], [3, 3, 3, 3]] and chain.rows[:, 0].tolist() == [2, 3]
    assert mask[0, 0, :3, :4].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert mask[0, 0, 3].tolist() == [1, 0, 0, 0, 1, 0, 0, 0]  # padding: the committed entry and its own slot
    with pytest.raises(ValueError, match="slots"):
        batch_inputs([[1]], None, lengths=[15], width=2, batch=1, capacity=16)


def test_ancestor_closure_matches_tree_ancestor_mask():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 33):
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
        got = ancestor_closure(torch.tensor([parents]))[0]
        assert torch.equal(got, ancestor_mask(torch.tensor(parents)))


def _reference_writes(storage: torch.Tensor, rows, slots, keys, values, layer: int) -> None:
    for i in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            storage[layer, 0, rows[i, j], :, slots[i, j]] = keys[i, :, j]
            storage[layer, 1, rows[i, j], :, slots[i, j]] = values[i, :, j]


def test_cache_writes_compaction_and_row_moves_against_brute_force():
    gen = torch.Generator().manual_seed(3)
    cache = BatchKVCache(num_layers=2, rows=4, capacity=8, device=torch.device("cpu"))
    ref = torch.zeros(2, 2, 4, 2, 8, 3)
    cache.add_rows(3)
    rows = torch.tensor([[0, 0, 0], [1, 1, 1], [2, 2, 2]])
    slots = torch.tensor([[0, 1, 2], [4, 5, 6], [1, 2, 3]])
    cache.write_rows, cache.write_slots, cache.window = rows, slots, (0, 3)
    for layer in range(2):
        k, v = torch.randn(3, 2, 3, 3, generator=gen), torch.randn(3, 2, 3, 3, generator=gen)
        keys, values = cache.layers[layer].update(k, v)
        assert keys.shape == (3, 2, 8, 3)  # the window's rows, every slot
        _reference_writes(ref, rows, slots, k, v, layer)
    assert torch.equal(cache.storage, ref)
    # Row 0 keeps nodes 0, 2 after 0 committed; row 1 keeps 1, 2 after 4; row 2 keeps 0, 1.
    cache.compact([RowCompaction(0, 0, (0, 2)), RowCompaction(1, 4, (1, 2)), RowCompaction(2, 1, (0, 1))])
    for row, committed, keep in ((0, 0, (0, 2)), (1, 4, (1, 2)), (2, 1, (0, 1))):
        moved = ref[:, :, row, :, [committed + k for k in keep]].clone()
        ref[:, :, row, :, committed : committed + len(keep)] = moved
    assert cache.lengths[:3] == [2, 6, 3]
    assert torch.equal(cache.storage, ref)
    # Row 0 leaves: row 2 (the last) moves into it; a new session then gets row 2, empty.
    assert cache.remove_row(0) == 2 and cache.in_use == 2 and cache.lengths[:3] == [3, 6, 0]
    assert torch.equal(cache.storage[:, :, 0, :, :3], ref[:, :, 2, :, :3])
    assert cache.add_rows(1) == range(2, 3) and cache.lengths[2] == 0
    cache.reserve(20)
    assert cache.capacity == 32 and torch.equal(cache.storage[:, :, 1, :, :8], ref[:, :, 1])
    with pytest.raises(ValueError, match="rows"):
        cache.add_rows(2)


def test_rerank_rows_equals_rerank_per_row():
    gen = torch.Generator().manual_seed(7)
    b, k, depth = 5, 3, 4
    parents, dep = [-1], [0]
    frontier = [0]
    for level in range(1, depth + 1):  # the dynamic pool's shape: k, then k * k per level
        new = [p for p in frontier for _ in range(k)]
        parents += new
        dep += [level] * len(new)
        frontier = list(range(len(parents) - k, len(parents)))
    n = len(parents)
    par = torch.tensor(parents).expand(b, n)
    tokens = torch.randint(0, 50, (b, n), generator=gen)
    # Path scores decrease down each path; rows 3 and 4 tie on purpose.
    step = -torch.rand(b, n, generator=gen)
    step[3:] = -0.5
    sc = torch.zeros(b, n)
    for i in range(1, n):
        sc[:, i] = sc[:, parents[i]] + step[:, i]
    for total in (1, 9, n - 1, None):
        got = rerank_rows(tokens, par, sc, torch.tensor(dep), total)
        for r in range(b):
            pool = CandidatePool(tokens[r].tolist(), parents, sc[r].tolist())
            want = rerank(pool, total if total is not None else n)
            assert got.tree(r).tokens.tolist() == want.tokens.tolist()
            assert got.tree(r).parents.tolist() == want.parents.tolist()
            assert torch.allclose(got.tree(r).logprobs, want.logprobs)


def test_results_are_told_as_sessions_leave_and_admission_can_stop(pair):
    target, _ = pair
    engine = BatchEngine(target, None, TREE)
    stop = StopCriteria(20, frozenset({9, 21, 52}))  # sessions end at different rounds
    told = []
    run = engine.generate_many(BATCH_PROMPTS, SamplingParams(), stop, "vanilla", 3,
                               on_result=lambda i, r: told.append((i, r)))
    assert sorted(i for i, _ in told) == list(range(len(BATCH_PROMPTS)))
    assert all(run.results[i] is r for i, r in told)
    assert [i for i, _ in told] != sorted(i for i, _ in told)  # told as each leaves, not in prompt order

    admits = iter([True])  # the first join only
    first = engine.generate_many(BATCH_PROMPTS, SamplingParams(), stop, "vanilla", 3,
                                 admit=lambda: next(admits, False))
    assert [r.token_ids for r in first.results[:3]] == [r.token_ids for r in run.results[:3]]
    assert first.results[3:] == [None] * (len(BATCH_PROMPTS) - 3)
    assert first.new_tokens == sum(len(r.token_ids) for r in run.results[:3])


def test_generate_many_refuses_bad_settings(pair):
    target, head = pair
    engine = BatchEngine(target, None, TREE)
    with pytest.raises(InputError, match="draft head"):
        engine.generate_many([[1]], SamplingParams(), StopCriteria(4), "eagle")
    with pytest.raises(InputError, match="concurrency"):
        engine.generate_many([[1]], SamplingParams(), StopCriteria(4), "vanilla", concurrency=0)
    with pytest.raises(InputError, match="2 sampling settings for 1 prompts"):
        engine.generate_many([[1]], [SamplingParams()] * 2, StopCriteria(4), "vanilla")
    assert engine.generate_many([], SamplingParams(), StopCriteria(4), "vanilla").results == []


def test_bench_batch_reports_every_mode_and_concurrency(pair):
    from aerie.bench.batch import BatchBenchSetup, format_batch_table, run_bench_batch

    target, head = pair
    setup = BatchBenchSetup(target, head, TREE, BATCH_PROMPTS[:5], [f"p{i}" for i in range(5)], frozenset(), "tiny")
    result = run_bench_batch(setup, ["eagle", "vanilla", "eagle-d2-k2-n3"], [1, 4], 10, SamplingParams(), "cpu")
    runs = [(r["mode"], r["concurrency"]) for r in result["runs"]]
    assert runs == [("vanilla", 1), ("vanilla", 4), ("eagle", 1), ("eagle", 4), ("eagle-d2-k2-n3", 1),
                    ("eagle-d2-k2-n3", 4)]
    assert all(r["new_tokens"] == 50 and r["tokens_per_s"] > 0 for r in result["runs"])
    assert result["summary"]["all_identical"] is True
    assert set(result["summary"]["eagle_vs_vanilla"]) == {"1", "4"}
    assert "| eagle | 4 |" in format_batch_table(result)
    with pytest.raises(InputError, match="bench-batch mode"):
        run_bench_batch(setup, ["eagle-x"], [1], 4, SamplingParams(), "cpu")


def test_bench_batch_captures_every_graph_before_the_timed_runs(pair):
    """A graph captured inside a timed run puts its capture in the run's seconds: the warm-up
    sizes the caches for the longest prompt and the full answer, and visits every batch the
    run shrinks through as its last sessions finish."""
    from aerie.bench.batch import BatchBenchSetup, run_bench_batch
    from aerie.bench.host_work import Census, stand_in_graphs

    target, head = pair
    # Prompts of 1 to 40 tokens: joins of one prompt at a time and of several, in two widths.
    prompts = BATCH_PROMPTS[:6] + [[9] * 40]
    with stand_in_graphs(Census()):
        setup = BatchBenchSetup(target, head, TREE, prompts, [f"p{i}" for i in range(7)], frozenset(), "tiny")
        result = run_bench_batch(setup, ["eagle", "vanilla"], [1, 4], 24, SamplingParams(), "cpu")
        assert [r["graph_captures"] for r in result["runs"]] == [0, 0, 0, 0]
        assert result["summary"]["all_identical"] is True

        # Without the warm-up's sizing, the run that follows a short one captures again.
        engine = BatchEngine(target, head, TREE)
        engine.generate_many(prompts[:4], SamplingParams(), StopCriteria(4), "eagle", 4)
        before = engine.graph_captures
        engine.generate_many(prompts, SamplingParams(), StopCriteria(24), "eagle", 4)
        assert before > 0 and engine.graph_captures > before
