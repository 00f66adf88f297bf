"""Greedy losslessness on the real SmolLM2-135M-Instruct target (float32, CPU): speculative
output is token-identical to plain decoding on MT-bench prompts, with a random EAGLE-3
head, a random EAGLE-1 head and an oracle drafter that makes deliberate mistakes; and
sampled rounds on the device token-identical to the split rounds from the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aerie.engine import Engine
from aerie.heads import build_draft_vocab, new_head
from aerie.sampling import SamplingParams
from aerie.stack import load_stack
from aerie.tree import TreeConfig
from aerie.verifier import StopCriteria
from tests.test_engine import OracleDrafter

MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "mt_bench_questions.jsonl"
N_PROMPTS, NEW_TOKENS = 8, 64


def mt_bench_prompts(n: int) -> list[str]:
    if not MT_BENCH.is_file():
        pytest.skip(f"{MT_BENCH} is not here")
    rows = [json.loads(line) for line in MT_BENCH.read_text().splitlines() if line.strip()]
    return [row["turns"][0] for row in rows[:n]]


@pytest.fixture(scope="module")
def stack(demo_model_dir):
    return load_stack(str(demo_model_dir), None, "cpu", "float32", need_head=False)


@pytest.fixture(scope="module")
def references(stack):
    """Plain decoding of each prompt: the output every other run must reproduce."""
    engine = Engine(stack.target, None, TreeConfig())
    stop = StopCriteria(NEW_TOKENS, stack.stop_token_ids())
    out = []
    for text in mt_bench_prompts(N_PROMPTS):
        ids = stack.encode_prompt(text)
        out.append((ids, engine.generate(ids, SamplingParams(), stop, "vanilla").token_ids))
    return out


@pytest.mark.parametrize("kind", ["eagle3", "eagle1"])
def test_random_head_is_lossless(stack, references, kind):
    torch.manual_seed(0)
    head = new_head(stack.target, kind, draft_vocab_size=8192 if kind == "eagle3" else None).eval()
    if kind == "eagle3":
        d2t, t2d = build_draft_vocab(torch.rand(stack.target.vocab_size), 8192)
        head.d2t.copy_(d2t)
        head.t2d.copy_(t2d)
    stack.target.features = head.feature_spec
    engine = Engine(stack.target, head, TreeConfig(depth=5, top_k=6, total_tokens=16))
    stop = StopCriteria(NEW_TOKENS, stack.stop_token_ids())
    for ids, reference in references:
        assert engine.generate(ids, SamplingParams(), stop, "eagle").token_ids == reference


def test_oracle_drafter_is_lossless(stack, references):
    stop = StopCriteria(NEW_TOKENS, stack.stop_token_ids())
    total_accepted = 0
    for i, (ids, reference) in enumerate(references):
        padded = reference + [0] * 16
        engine = Engine(
            stack.target, None, TreeConfig(),
            make_drafter=lambda: OracleDrafter(len(ids), padded, depth=6, error_every=5 + i, vocab=stack.target.vocab_size),
        )
        result = engine.generate(ids, SamplingParams(), stop, "eagle")
        assert result.token_ids == reference
        total_accepted += sum(r.accepted for r in result.rounds)
    assert total_accepted > N_PROMPTS * NEW_TOKENS // 2  # long acceptances were exercised


@pytest.mark.parametrize("name", ["smollm2-135m-eagle1", "smollm2-135m-eagle3"])
def test_shipped_head_is_lossless_and_accepts(stack, references, name):
    """The trained heads in heads/ load into the engine, keep greedy output identical and
    accept clearly more than a random head does (tau about 1.0)."""
    from aerie.heads import load_head
    from aerie.stack import SHIPPED_HEADS

    head = load_head(SHIPPED_HEADS / name, stack.target)
    stack.target.features = head.feature_spec
    engine = Engine(stack.target, head, TreeConfig(depth=5, top_k=6, total_tokens=16))
    stop = StopCriteria(NEW_TOKENS, stack.stop_token_ids())
    accepted = rounds = 0
    for ids, reference in references[:3]:
        result = engine.generate(ids, SamplingParams(), stop, "eagle")
        assert result.token_ids == reference
        accepted += sum(r.accepted for r in result.rounds)
        rounds += len(result.rounds)
    assert 1 + accepted / rounds > 1.5


def static_with_shipped_head(stack):
    """The demo target on static caches (run eagerly on the CPU) with the shipped EAGLE-3
    head, a tree that its long acceptances fill, and the generation's stop."""
    from aerie.heads import load_head
    from aerie.stack import SHIPPED_HEADS
    from aerie.target import StaticKV, Target

    target = Target(stack.target.model, stack.target.features, StaticKV(compiled_forward="never"))
    head = load_head(SHIPPED_HEADS / "smollm2-135m-eagle3", target)
    target.features = head.feature_spec
    return target, head, TreeConfig(depth=5, top_k=6, total_tokens=16), StopCriteria(NEW_TOKENS, stack.stop_token_ids())


def test_device_rounds_with_the_shipped_head_are_lossless(stack, references):
    """Static caches (run eagerly on the CPU) take greedy rounds whole on the device path
    (aerie.device_round); the shipped head's long acceptances move entries in both caches."""
    target, head, tree, stop = static_with_shipped_head(stack)
    accepted = []
    for ids, reference in references[:3]:
        result = Engine(target, head, tree).generate(ids, SamplingParams(), stop, "eagle")
        split = Engine(target, head, tree, device_rounds=False).generate(ids, SamplingParams(), stop, "eagle")
        assert result.token_ids == split.token_ids == reference
        assert [r.accepted for r in result.rounds] == [r.accepted for r in split.rounds]
        accepted += [r.accepted for r in result.rounds]
    assert max(accepted) >= 4 and 1 + sum(accepted) / len(accepted) > 1.5


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, top_p=0.9, seed=7),
                                    SamplingParams(temperature=1.0, top_k=50, seed=123456789)],
                         ids=["t0.7-p0.9", "t1.0-k50"])
def test_sampled_device_rounds_with_the_shipped_head_match_the_split_rounds(stack, params):
    """Sampled rounds whole on the device (aerie.device_round) draw the same tokens as the
    split rounds from the same seed, over a real vocabulary and the shipped head's long,
    branching acceptances."""
    target, head, tree, stop = static_with_shipped_head(stack)
    accepted = []
    for text in mt_bench_prompts(2):
        ids = stack.encode_prompt(text)
        result = Engine(target, head, tree).generate(ids, params, stop, "eagle")
        split = Engine(target, head, tree, device_rounds=False).generate(ids, params, stop, "eagle")
        assert result.token_ids == split.token_ids
        assert [r.accepted for r in result.rounds] == [r.accepted for r in split.rounds]
        accepted += [r.accepted for r in result.rounds]
    assert max(accepted) >= 3 and 1 + sum(accepted) / len(accepted) > 1.3
