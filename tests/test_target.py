"""The target's tree forward and KV compaction against plain sequence forwards."""

from __future__ import annotations

import pytest
import torch

from aerie.target import FeatureSpec, Target, eagle3_default_layers
from tests.tiny import tiny_target


def path_to(parents: torch.Tensor, node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = int(parents[node])
    return list(reversed(path))


@pytest.mark.parametrize("kind", ["eagle3", "eagle1"])
def test_tree_forward_equals_each_path_run_alone(kind):
    target = tiny_target(kind)
    prompt = torch.tensor([5, 9, 1, 33, 7, 2])
    tokens = torch.tensor([4, 10, 11, 12, 13, 14, 15])
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3])
    cache = target.new_cache()
    target.forward(cache, prompt)
    tree_out = target.forward(cache, tokens, tree_parents=parents)
    for node in range(len(tokens)):
        seq = torch.cat([prompt, tokens[path_to(parents, node)]])
        ref = target.forward(target.new_cache(), seq)
        torch.testing.assert_close(tree_out.logits[node], ref.logits[-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(tree_out.features[node], ref.features[-1], atol=1e-4, rtol=1e-4)


def test_compaction_equals_fresh_prefill_of_accepted_sequence():
    target = tiny_target("eagle3")
    prompt = torch.tensor([5, 9, 1, 33, 7, 2])
    tokens = torch.tensor([4, 10, 11, 12, 13, 14, 15])
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 4])
    cache = target.new_cache()
    target.forward(cache, prompt)
    committed = cache.get_seq_length()
    target.forward(cache, tokens, tree_parents=parents)
    accepted = path_to(parents, 6)  # root -> 1 -> 4 -> 6
    Target.compact(cache, committed, accepted)
    fresh = target.new_cache()
    target.forward(fresh, torch.cat([prompt, tokens[accepted]]))
    assert cache.get_seq_length() == fresh.get_seq_length() == len(prompt) + len(accepted)
    for mine, ref in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(mine.keys, ref.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.values, ref.values, atol=1e-5, rtol=1e-5)
    # And decoding continues as if the accepted sequence had been fed plainly.
    nxt = torch.tensor([21])
    torch.testing.assert_close(
        target.forward(cache, nxt).logits, target.forward(fresh, nxt).logits, atol=1e-4, rtol=1e-4
    )


def test_eagle3_features_are_low_mid_high_hidden_states():
    target = tiny_target("eagle3", layers=8)
    assert target.features.layers == eagle3_default_layers(8) == (2, 4, 5)
    ids = torch.tensor([3, 4, 5])
    out = target.forward(target.new_cache(), ids)
    hs = target.model(ids[None], output_hidden_states=True).hidden_states
    torch.testing.assert_close(out.features, torch.cat([hs[2], hs[4], hs[5]], -1)[0])


@pytest.mark.parametrize("spec", [FeatureSpec("eagle3", (0, 3, 8)), FeatureSpec("eagle3", (7, 7, 1)),
                                  FeatureSpec("eagle1")], ids=str)
def test_features_and_logits_are_transformers_own(spec):
    """Our hooks record what transformers' `output_hidden_states` names: layer i's input, the
    last (normed) hidden state for i = the number of layers, in the order asked."""
    model = tiny_target("eagle3", layers=8).model
    ids = torch.tensor([3, 4, 5, 9])
    out = Target(model, spec).forward(Target(model, spec).new_cache(), ids)
    reference = model(ids[None], output_hidden_states=True)
    hs = reference.hidden_states
    want = hs[-1] if spec.kind == "eagle1" else torch.cat([hs[i] for i in spec.layers], -1)
    torch.testing.assert_close(out.features, want[0])
    torch.testing.assert_close(out.logits, reference.logits[0].float())
