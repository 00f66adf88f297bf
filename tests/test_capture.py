"""Everything that runs as a CUDA graph, captured and replayed by the CPU simulation of
tests/capture.py: no captured function reads the device from the host or brings host data in,
and outputs read after a replay (the capture-time tensors, overwritten in place) still give
each session what plain decoding gives it. Single-session static path and the batched engine,
both heads, every tree kind."""

from __future__ import annotations

import pytest
import torch

from aerie.batch.engine import BatchEngine
from aerie.engine import Engine
from aerie.sampling import SamplingParams
from aerie.target import StaticKV, Target
from aerie.tree import TreeConfig
from aerie.verifier import StopCriteria
from tests.capture import HostTrafficInCapture, SimulatedGraphCache, captured, simulate_graphs
from tests.test_batch import BATCH_PROMPTS
from tests.test_engine import PROMPTS
from tests.tiny import tiny_head, tiny_target

TREES = [TreeConfig(depth=4, top_k=3, total_tokens=9), TreeConfig.chain(3), TreeConfig.eagle1_static()]


@pytest.fixture(scope="module", params=["eagle3", "eagle1"])
def pair(request):
    target = tiny_target(request.param)
    return target, tiny_head(target, request.param, 48 if request.param == "eagle3" else None)


@pytest.mark.parametrize("host_traffic", [
    lambda x: x.tolist(),
    lambda x: int(x[0]),
    lambda x: x.sum().item(),
    lambda x: 1 if x[0] > 0 else 0,
    lambda x: x[x > 0],
    lambda x: x.nonzero(),
    lambda x: x + torch.tensor([1, 2, 3, 4]),
    lambda x: x.repeat_interleave(x),
    lambda x: x.cpu(),
], ids=["tolist", "int", "item", "if", "bool-mask", "nonzero", "host-tensor", "repeat-by-tensor", "cpu"])
def test_the_checks_catch_each_kind_of_host_traffic(host_traffic):
    x = torch.arange(4)
    host_traffic(x)  # fine outside a capture
    with pytest.raises(HostTrafficInCapture):
        captured(lambda: host_traffic(x))


def test_the_checks_let_device_work_through():
    x = torch.arange(12.0).reshape(3, 4)
    out = captured(lambda: (torch.topk(x, 2).indices.gather(1, torch.zeros(3, 1, dtype=torch.long))
                            + torch.arange(3)[:, None], torch.sort(x, stable=True).values.sum(-1)))
    assert out[0].shape == (3, 1)


@pytest.mark.parametrize("tree", TREES, ids=lambda t: t.kind)
def test_single_session_graphs_capture_and_replay(pair, tree, monkeypatch):
    simulate_graphs(monkeypatch)
    target, head = pair
    static = Target(target.model, target.features, static=StaticKV(cuda_graphs=True, largest_graph=16,
                                                                   initial_capacity=16, pooled=2))
    engine = Engine(static, head, tree)
    stop = StopCriteria(24)
    before = SimulatedGraphCache.total_captures
    for prompt in PROMPTS[:3]:
        want = Engine(target, None, tree).generate(prompt, SamplingParams(), stop, "vanilla").token_ids
        assert engine.generate(prompt, SamplingParams(), stop).token_ids == want
        assert engine.generate(prompt, SamplingParams(), stop, "vanilla").token_ids == want
    assert SimulatedGraphCache.total_captures > before
    sampled = SamplingParams(temperature=1.0, seed=3)
    want = Engine(target, head, tree).generate(PROMPTS[0], sampled, stop)
    got = engine.generate(PROMPTS[0], sampled, stop)
    assert got.token_ids == want.token_ids
    assert [r.accepted for r in got.rounds] == [r.accepted for r in want.rounds]


@pytest.mark.parametrize("tree", TREES, ids=lambda t: t.kind)
def test_batched_graphs_capture_and_replay(pair, tree, monkeypatch):
    simulate_graphs(monkeypatch)
    target, head = pair
    stop = StopCriteria(20)
    want = [Engine(target, None, tree).generate(p, SamplingParams(), stop, "vanilla").token_ids for p in BATCH_PROMPTS]
    engine = BatchEngine(target, head, tree)
    for mode in ("eagle", "vanilla"):
        run = engine.generate_many(BATCH_PROMPTS, SamplingParams(), stop, mode, concurrency=4)
        assert [r.token_ids for r in run.results] == want
    assert engine._caches["head"].graphs.captures > 0 and engine._caches["target"].graphs.captures > 0
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(len(BATCH_PROMPTS))]
    single = [Engine(target, head, tree).generate(p, s, stop) for p, s in zip(BATCH_PROMPTS, params)]
    run = engine.generate_many(BATCH_PROMPTS, params, stop, "eagle", concurrency=4)
    assert [r.token_ids for r in run.results] == [s.token_ids for s in single]
