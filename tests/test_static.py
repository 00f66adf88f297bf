"""Static KV caches (the path CUDA graphs capture), run eagerly on the CPU: the same tokens,
logits and features as the DynamicCache path, through padding buckets, compaction, cache
growth and cache reuse."""

from __future__ import annotations

import pytest
import torch

from aerie.engine import Engine
from aerie.graphs import GraphCache, bucket_for
from aerie.kvcache import Attend, SlotCache, additive_mask, pad_rows
from aerie.sampling import SamplingParams
from aerie.target import StaticKV, Target
from aerie.tree import TreeConfig
from aerie.verifier import StopCriteria
from tests.test_engine import PROMPTS, OracleDrafter
from tests.tiny import tiny_head, tiny_target

# A tiny capacity and graph size, so that generations cross buckets, run eagerly past the
# largest one and grow the cache.
STATIC = StaticKV(cuda_graphs=True, largest_graph=16, initial_capacity=16, pooled=2)
TREES = [TreeConfig(depth=4, top_k=3, total_tokens=9), TreeConfig.chain(3), TreeConfig.eagle1_static()]


def static_twin(target: Target) -> Target:
    return Target(target.model, target.features, static=STATIC)


@pytest.fixture(scope="module", params=["eagle3", "eagle1"])
def pair(request):
    dynamic = tiny_target(request.param)
    static = static_twin(dynamic)
    vocab = 48 if request.param == "eagle3" else None
    return (dynamic, tiny_head(dynamic, request.param, vocab)), (static, tiny_head(static, request.param, vocab))


@pytest.mark.parametrize("tree", TREES, ids=lambda t: f"{t.kind}-{t.depth}-{t.total_tokens}")
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0, seed=5)], ids=["greedy", "T1"])
def test_static_generation_equals_dynamic(pair, tree, params):
    (dyn_target, dyn_head), (st_target, st_head) = pair
    assert isinstance(st_head.new_cache(), SlotCache)
    for prompt in PROMPTS:
        stop = StopCriteria(40)
        want = Engine(dyn_target, dyn_head, tree).generate(prompt, params, stop)
        got = Engine(st_target, st_head, tree).generate(prompt, params, stop)
        assert got.token_ids == want.token_ids
        assert [r.accepted for r in got.rounds] == [r.accepted for r in want.rounds]
        plain = Engine(st_target, None, tree).generate(prompt, params, stop, "vanilla")
        if params.greedy:
            assert plain.token_ids == want.token_ids


@pytest.mark.parametrize("error_every", [3, 1000])
def test_long_acceptances_compact_the_static_cache(error_every):
    """An oracle drafter makes most of each tree accepted, so compaction moves entries."""
    target = static_twin(tiny_target("eagle3"))
    prompt = PROMPTS[0]
    reference = Engine(tiny_target("eagle3"), None, TreeConfig()).generate(prompt, SamplingParams(), StopCriteria(60), "vanilla")
    ref = reference.token_ids + [0] * 10
    engine = Engine(target, None, TreeConfig(),
                    make_drafter=lambda: OracleDrafter(len(prompt), ref, depth=6, error_every=error_every, vocab=64))
    eagle = engine.generate(prompt, SamplingParams(), StopCriteria(60), "eagle")
    assert eagle.token_ids == reference.token_ids
    assert max(r.accepted for r in eagle.rounds) >= (5 if error_every == 1000 else 2)


def test_tree_forward_and_compaction_match_the_dynamic_cache():
    dynamic = tiny_target("eagle3")
    static = static_twin(dynamic)
    prompt = torch.tensor(PROMPTS[2])
    tokens = torch.tensor([9, 4, 5, 6, 7, 8, 10])
    parents = torch.tensor([-1, 0, 0, 1, 1, 3, 2])
    caches = [dynamic.new_cache(), static.new_cache()]
    outs = []
    for target, cache in zip((dynamic, static), caches):
        target.forward(cache, prompt)
        tree_out = target.forward(cache, tokens, tree_parents=parents)
        target.compact(cache, len(prompt), [0, 1, 3, 5])
        after = target.forward(cache, torch.tensor([11, 12]))
        outs.append((tree_out.logits.clone(), tree_out.features.clone(), after.logits.clone(), after.features.clone()))
        assert cache.get_seq_length() == len(prompt) + 4 + 2
    for want, got in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_released_caches_are_reused_and_start_empty():
    target = static_twin(tiny_target("eagle1"))
    engine = Engine(target, None, TreeConfig())
    first = engine.generate(PROMPTS[1], SamplingParams(), StopCriteria(20), "vanilla")
    cache = target.new_cache()
    assert cache.get_seq_length() == 0 and cache.capacity >= len(PROMPTS[1]) + 20
    target.release_cache(cache)
    again = engine.generate(PROMPTS[1], SamplingParams(), StopCriteria(20), "vanilla")
    assert again.token_ids == first.token_ids
    assert target.new_cache() is cache


def test_cache_growth_keeps_the_entries():
    cache = SlotCache(num_layers=1, capacity=4, device=torch.device("cpu"))
    layer = cache.layers[0]
    cache.set_write_slots(0, 3)
    layer.update(torch.arange(6.0).view(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    cache.length = 3
    cache.reserve(9)
    assert cache.capacity == 16 and layer.keys.shape[2] == 16
    assert torch.equal(layer.keys[0, 0, :3], torch.arange(6.0).view(3, 2))


def test_bucket_for():
    assert [bucket_for(n, 64) for n in (1, 2, 3, 5, 33, 64, 65)] == [1, 2, 4, 8, 64, 64, None]


def test_attend_padded_mask_has_no_empty_rows():
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    attend = Attend(2, tree)
    dense = attend.dense(3, past=2)[0, 0]
    assert dense[:, :2].all() and torch.equal(dense[:, 2:], tree)
    out = attend.padded(3, past=2, rows=4, capacity=8, device=torch.device("cpu"))[0, 0]
    assert out.shape == (4, 8)
    assert torch.equal(out[:3, :5], dense) and not out[:3, 5:].any()
    assert out[3].tolist() == [True, True, False, False, False, True, False, False]  # padding: past + own slot
    causal = Attend(0).padded(2, past=0, rows=2, capacity=4, device=torch.device("cpu"))[0, 0]
    assert causal.tolist() == [[True, False, False, False], [True, True, False, False]]


def test_attend_hides_drafted_entries_outside_the_pattern():
    # A draft level: 4 committed entries, 2 drafted ones in the cache, 2 new rows; row 0
    # descends from drafted entry 1 only, row 1 from entry 0 only.
    pattern = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    dense = Attend(4, pattern).dense(2, past=6)[0, 0]
    assert dense.tolist() == [[True] * 4 + [False, True, True, False], [True] * 4 + [True, False, False, True]]
    with pytest.raises(ValueError, match="does not fit"):
        Attend(4, pattern).dense(2, past=5)
    with pytest.raises(ValueError, match="causal"):
        Attend(3).dense(2, past=5)


def test_pad_rows_repeats_the_last_row():
    t = torch.tensor([[4, 7]])
    assert pad_rows(t, 4).tolist() == [[4, 7, 7, 7]]
    assert pad_rows(t, 2) is t


def test_graph_cache_falls_back_to_eager_without_cuda():
    calls = []
    graphs = GraphCache(enabled=True)
    out = graphs.run("k", lambda: calls.append(1) or (torch.ones(1),))
    assert calls == [1] and torch.equal(out[0], torch.ones(1))
    assert not graphs.enabled or torch.cuda.is_available()


def test_verify_cost_curve_and_floor_on_a_tiny_target():
    from aerie.bench.verify_cost import TREE_SIZES, format_verify_cost, measure_shape, random_tree, weight_bytes
    from tests.tiny import tiny_llama

    model = tiny_llama()
    result = measure_shape("tiny", model, torch.device("cpu"), bandwidth=1e9)
    assert [p["tree_size"] for p in result["curve"]] == list(TREE_SIZES)
    assert all(p["ms_p10"] <= p["ms_median"] <= p["ms_p90"] for p in result["curve"])
    assert result["bandwidth_floor_ms"] == pytest.approx(1e3 * weight_bytes(model) / 1e9)
    table = format_verify_cost({"shapes": [result]})
    assert "| tiny |" in table and "| tiny (plain decoding, per token) |" in table
    assert result["plain_decode_ms"] > 0
    assert result["plain_decode_vs_floor"] == pytest.approx(result["bandwidth_floor_ms"] / result["plain_decode_ms"])
    assert result["kernels"] == [] and all(p["device_ms"] is None for p in result["curve"])  # CUDA-only parts
    parents = random_tree(20, torch.Generator().manual_seed(1))
    assert parents[0] == -1 and all(0 <= int(p) < i for i, p in enumerate(parents.tolist()) if i)


def test_additive_mask_attends_as_the_boolean_one():
    gen = torch.Generator().manual_seed(0)
    mask = Attend(2, torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)).padded(
        3, past=2, rows=4, capacity=8, device=torch.device("cpu"))
    additive = additive_mask(mask, torch.float32)
    assert additive.dtype == torch.float32 and torch.equal(additive == 0, mask)
    assert torch.isneginf(additive[~mask]).all()
    q, k, v = (torch.randn(1, 2, n, 4, generator=gen) for n in (4, 8, 8))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=additive)
    assert torch.allclose(got, want, atol=1e-6)


def test_graph_cache_drops_the_least_recently_used_graph(monkeypatch):
    """Past MAX_GRAPHS_PER_CACHE graphs, the one unused longest goes, not the oldest capture:
    a graph replayed every round (the tree shape `--tree-budget auto` settled on, captured
    first while it warmed up) stays however many other shapes come and go."""
    from tests.capture import SimulatedGraphCache

    monkeypatch.setattr("aerie.graphs.MAX_GRAPHS_PER_CACHE", 3)
    graphs = SimulatedGraphCache()
    for key in ("hot", "a", "b", "hot", "c", "hot", "d", "hot", "e"):
        graphs.run(key, lambda: (torch.ones(1),))
    assert graphs.captures == 6  # hot once, then a to e
    assert list(graphs.graphs) == ["d", "hot", "e"]


def test_bench_rows_name_the_graphs_they_captured(monkeypatch):
    from aerie.bench.harness import _captured_since

    monkeypatch.setattr(GraphCache, "recent_keys", type(GraphCache.recent_keys)(maxlen=4))
    monkeypatch.setattr(GraphCache, "total_captures", 10)
    before = GraphCache.total_captures
    assert _captured_since(before) == []
    for key in [("target", 8), ("round", TreeConfig(depth=4, top_k=3, total_tokens=9), None, None, 5, 7)]:
        GraphCache.recent_keys.append(key)
        GraphCache.total_captures += 1
    assert _captured_since(before) == ["('target', 8)", "round d4 k3 n9 commits 5 storage 7"]
    assert _captured_since(before + 1) == ["round d4 k3 n9 commits 5 storage 7"]
