"""The speculative loop on a tiny target: greedy output identical to plain decoding with
random heads, with every tree shape and with an oracle drafter that makes deliberate
mistakes; sampling repeatable and resumable from any round boundary."""

from __future__ import annotations

import pytest
import torch

from aerie.engine import Engine
from aerie.sampling import SamplingParams
from aerie.tree import DraftTree, TreeConfig
from aerie.verifier import StopCriteria
from tests.tiny import tiny_head, tiny_target

PROMPTS = [[3, 14, 15, 9, 26, 5], [1, 2, 3], [60, 61, 7, 8, 9, 10, 11, 12, 40, 41, 42]]
TREES = [TreeConfig(), TreeConfig.chain(4), TreeConfig.eagle1_static(), TreeConfig(depth=3, top_k=2, total_tokens=5)]


@pytest.fixture(scope="module", params=["eagle3", "eagle1"])
def engine_pair(request):
    target = tiny_target(request.param)
    head = tiny_head(target, request.param, draft_vocab=48 if request.param == "eagle3" else None)
    return target, head


@pytest.mark.parametrize("tree", TREES, ids=lambda t: f"{t.kind}-{t.depth}-{t.top_k}-{t.total_tokens}")
def test_greedy_identical_to_vanilla_with_random_heads(engine_pair, tree):
    target, head = engine_pair
    engine = Engine(target, head, tree)
    for prompt in PROMPTS:
        stop = StopCriteria(30)
        vanilla = engine.generate(prompt, SamplingParams(), stop, "vanilla")
        eagle = engine.generate(prompt, SamplingParams(), stop, "eagle")
        assert eagle.token_ids == vanilla.token_ids
        assert len(eagle.token_ids) == 30


class OracleDrafter:
    """Proposes the target's own continuation, wrong on purpose every `error_every` tokens,
    with a wrong first sibling so that acceptance must look past it."""

    def __init__(self, prompt_len: int, reference: list[int], depth: int, error_every: int, vocab: int):
        self.prompt_len, self.reference, self.depth = prompt_len, reference, depth
        self.error_every, self.vocab = error_every, vocab
        self.committed = 0

    def draft(self, features: torch.Tensor, next_tokens: list[int]) -> DraftTree:
        self.committed += len(next_tokens)
        k = self.committed - self.prompt_len  # index of the root in the generated tokens
        root = self.reference[k]
        chain = []
        for j, tok in enumerate(self.reference[k + 1 : k + 1 + self.depth], start=1):
            chain.append((tok + 1) % self.vocab if (k + j) % self.error_every == 0 else tok)
        decoy = ((chain[0] if chain else root) + 2) % self.vocab
        tokens = [root, decoy] + chain
        parents = [-1, 0] + [0] + list(range(2, 2 + len(chain) - 1))
        n = len(tokens)
        return DraftTree(torch.tensor(tokens), torch.tensor(parents[:n]), torch.zeros(n))


@pytest.mark.parametrize("error_every", [3, 7, 1000])
def test_greedy_identical_with_oracle_drafter(error_every):
    target = tiny_target("eagle3")
    prompt = PROMPTS[0]
    max_new = 60
    reference = Engine(target, None, TreeConfig()).generate(prompt, SamplingParams(), StopCriteria(max_new), "vanilla")
    ref = reference.token_ids + [0] * 10  # the drafter may look past the end
    engine = Engine(
        target, None, TreeConfig(),
        make_drafter=lambda: OracleDrafter(len(prompt), ref, depth=6, error_every=error_every, vocab=64),
    )
    eagle = engine.generate(prompt, SamplingParams(), StopCriteria(max_new), "eagle")
    assert eagle.token_ids == reference.token_ids
    accepted = [r.accepted for r in eagle.rounds]
    assert max(accepted) >= 2  # long acceptances happened
    if error_every < 1000:
        assert min(accepted) < 6  # and rejections
    else:
        assert eagle.tau > 5


def test_stop_token_ends_generation_like_vanilla():
    target = tiny_target("eagle3")
    head = tiny_head(target, "eagle3")
    engine = Engine(target, head, TreeConfig())
    free = engine.generate(PROMPTS[0], SamplingParams(), StopCriteria(30), "vanilla").token_ids
    stop_token = free[7]
    stop = StopCriteria(30, frozenset({stop_token}))
    vanilla = engine.generate(PROMPTS[0], SamplingParams(), stop, "vanilla").token_ids
    eagle = engine.generate(PROMPTS[0], SamplingParams(), stop, "eagle").token_ids
    assert eagle == vanilla == free[: free.index(stop_token) + 1]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, seed=5), SamplingParams(0.7, 0.9, 20, 11)])
def test_sampling_is_repeatable_and_resumable(engine_pair, params):
    target, head = engine_pair
    engine = Engine(target, head, TreeConfig())
    prompt = PROMPTS[0]
    stop = StopCriteria(40)
    first = engine.generate(prompt, params, stop, "eagle")
    again = engine.generate(prompt, params, stop, "eagle")
    assert first.token_ids == again.token_ids
    # Resume from the boundary after round 3: prefill prompt + what was committed so far.
    committed = 1 + sum(r.committed for r in first.rounds[:3])
    resumed = engine.generate(prompt, params, stop, "eagle", resume_tokens=first.token_ids[:committed])
    assert first.token_ids[committed:] == resumed.token_ids


def test_vanilla_sampling_uses_per_position_randomness():
    target = tiny_target("eagle3")
    engine = Engine(target, None, TreeConfig())
    params = SamplingParams(temperature=1.0, seed=3)
    full = engine.generate(PROMPTS[1], params, StopCriteria(20), "vanilla").token_ids
    tail = engine.generate(PROMPTS[1], params, StopCriteria(20), "vanilla", resume_tokens=full[:8]).token_ids
    assert tail == full[8:]
    other = engine.generate(PROMPTS[1], SamplingParams(temperature=1.0, seed=4), StopCriteria(20), "vanilla").token_ids
    assert other != full


def test_drafter_is_fed_the_accepted_path(engine_pair):
    """After each round the head gets the tokens that were really committed (the accepted
    branch of the tree and the bonus token), not the tree's first nodes: otherwise its context
    is wrong, acceptance drops, and at T > 0 a resumed run drafts other trees and samples
    other tokens."""
    from aerie.drafter import DraftSession

    target, head = engine_pair
    fed: list[int] = []

    class Recording(DraftSession):
        def draft(self, features, next_tokens):
            assert features.shape[0] == len(next_tokens)
            fed.extend(next_tokens)
            return super().draft(features, next_tokens)

    tree = TreeConfig()
    engine = Engine(target, head, tree, make_drafter=lambda: Recording(head, tree))
    prompt = PROMPTS[2]
    res = engine.generate(prompt, SamplingParams(temperature=1.0, seed=5), StopCriteria(60), "eagle")
    assert fed == (prompt + res.token_ids)[1 : len(fed) + 1]
    assert any(r.accepted for r in res.rounds)  # some rounds accepted draft tokens
