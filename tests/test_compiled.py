"""The static path with the decoder layers compiled (aerie.fused.Compiled), as it runs on a
GPU, here on the CPU: the same tokens and acceptances as the uncompiled path, greedy and
sampled, with a handful of compiled graphs however many forwards and layers run."""

from __future__ import annotations

import torch

from aerie.device_round import commit_path, greedy_path, sampled_path, tree_to_verify
from aerie.drafter import expand_on_device
from aerie.engine import Engine
from aerie.fused import Compiled
from aerie.sampling import SamplingParams
from aerie.target import StaticKV, Target
from aerie.tree import TreeConfig
from aerie.verifier import StopCriteria
from tests.test_engine import PROMPTS
from tests.tiny import tiny_head, tiny_target


def test_compiled_forwards_generate_what_the_uncompiled_ones_do():
    torch._dynamo.reset()
    reference = tiny_target("eagle3")
    reference_head = tiny_head(reference, "eagle3", 48)
    # A small capacity and graph size: later prompts run past the largest graph and grow the
    # cache (its mask widens, its buffers move) between compiled calls.
    static = StaticKV(cuda_graphs=False, largest_graph=16, initial_capacity=16, compiled_forward="always")
    target = Target(reference.model, reference.features, static=static)
    head = tiny_head(target, "eagle3", 48)
    tree = TreeConfig(depth=4, top_k=3, total_tokens=9)
    engine = Engine(target, head, tree)
    stop = StopCriteria(40)
    engine.precompile()
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    long_prompt = [(7 * i + 3) % 64 for i in range(40)]
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=5)):
        for prompt in [*PROMPTS[:3], long_prompt]:
            want = Engine(reference, reference_head, tree).generate(prompt, params, stop)
            got = engine.generate(prompt, params, stop)
            assert got.token_ids == want.token_ids
            assert [r.accepted for r in got.rounds] == [r.accepted for r in want.rounds]
            plain = engine.generate(prompt, params, stop, "vanilla")
            assert plain.token_ids == Engine(reference, None, tree).generate(prompt, params, stop, "vanilla").token_ids
    # The compiled functions ran (none fell back to eager), compiled once per shape family
    # (one row or many; for the head also its two feature widths; a level's bookkeeping for
    # the root and for a wider frontier; a round's pieces), all in `precompile`, and
    # never again: not for a longer prompt, a grown cache or another session's cache.
    assert isinstance(target.compiled, Compiled) and not target.compiled.eager
    assert isinstance(head.compiled, Compiled) and not head.compiled.eager
    # A drafting level's bookkeeping on the device, and a device round's before and after its
    # target forward, greedy and sampled.
    parts = head.compiled_parts
    assert set(parts) == {expand_on_device, tree_to_verify, greedy_path, sampled_path, commit_path}
    assert all(isinstance(part, Compiled) and not part.eager for part in parts.values())
    assert 3 <= compiled <= 12, compiled
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled


def test_a_failing_compiler_falls_back_to_the_uncompiled_function(monkeypatch, capsys):
    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    double = Compiled(lambda x: 2 * x, "doubling")
    assert double(torch.tensor(3)).item() == 6
    assert double.eager
    assert "compiling doubling failed" in capsys.readouterr().err
    assert double(torch.tensor(4)).item() == 8


def test_compiled_forward_is_chosen_per_device():
    model = tiny_target("eagle3").model
    assert StaticKV().compile(model, torch.device("cpu")) is None
    assert isinstance(StaticKV().compile(model, torch.device("cuda")), Compiled)
    assert StaticKV(compiled_forward="never").compile(model, torch.device("cuda")) is None
    assert isinstance(StaticKV(compiled_forward="always").compile(model, torch.device("cpu")), Compiled)
