"""Stacked projections (aerie.projections): the q/k/v and gate/up projections of the Llama
family as one matrix multiply each, checked against transformers' own forward."""

import pytest
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from aerie.fused import Fusion, fused, fusion_for
from aerie.projections import stack_projections, stackable, stacked_names
from aerie.target import FeatureSpec, StaticKV, Target
from tests.tiny import VOCAB, tiny_llama


def tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = Qwen2ForCausalLM(config).eval()
    for module in model.modules():  # biases of their own, so that a dropped one would show
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.normal_(0, 0.5)
    return model


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def count_linears(monkeypatch) -> list[tuple[int, ...]]:
    """Every F.linear call's weight shape, from now on."""
    calls = []
    real = torch.nn.functional.linear

    def counting(x, weight, *args, **kwargs):
        calls.append(tuple(weight.shape))
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    return calls


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2-with-biases"])
def test_stacked_projections_match_the_reference_with_one_multiply_each(make, monkeypatch):
    model = make()
    ids = torch.randint(0, VOCAB, (2, 9))
    reference = logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = sum(p.numel() for p in model.parameters())

    modules = stackable(model)
    layers = model.config.num_hidden_layers
    assert len(modules) == 2 * layers  # each layer's attention and MLP
    calls = count_linears(monkeypatch)
    with fused(Fusion(projections=tuple(modules))):
        stacked = logits(model, ids)
    torch.testing.assert_close(stacked, reference, rtol=1e-5, atol=1e-5)
    # q/k/v, o, gate/up and down per layer, and the output head: four multiplies, not seven.
    assert len(calls) == 4 * layers + 1
    c = model.config
    qkv_rows = (c.num_attention_heads + 2 * c.num_key_value_heads) * (c.hidden_size // c.num_attention_heads)
    assert calls.count((qkv_rows, c.hidden_size)) == layers
    assert calls.count((2 * c.intermediate_size, c.hidden_size)) == layers

    # The module's own projections are views into the stacked weight: nothing added, nothing
    # changed for any other caller, the saved state the same.
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert set(model.state_dict()) == set(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.stacked_weight.untyped_storage().data_ptr()
    assert "forward" not in attn.__dict__  # swapped back on leaving the block
    monkeypatch.undo()
    torch.testing.assert_close(logits(model, ids), reference, rtol=0, atol=0)


def test_projections_are_stacked_again_after_the_model_is_cast():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 6))
    fusion = fusion_for(model, torch.device("cpu"))
    model.to(torch.float64)  # new parameter tensors: the stacked weights are stale
    reference = logits(model, ids)
    with fused(fusion):
        stacked = logits(model, ids)
    assert stacked.dtype == torch.float64
    torch.testing.assert_close(stacked, reference, rtol=1e-10, atol=1e-10)
    attn = model.model.layers[0].self_attn
    assert attn.stacked_weight.dtype == torch.float64


def test_only_plain_llama_family_projections_are_stacked():
    model = tiny_llama()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert stacked_names(attn) == ("q_proj", "k_proj", "v_proj")
    assert stacked_names(mlp) == ("gate_proj", "up_proj")
    assert stacked_names(model.model.layers[0]) is None

    class Sharded(nn.Module):  # a projection wrapped (as tensor parallelism does) is left alone
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    attn.k_proj = Sharded(attn.k_proj)
    assert stacked_names(attn) is None
    mlp.up_proj = nn.Linear(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=True)  # bias on one only
    assert stacked_names(mlp) is None
    with pytest.raises(ValueError, match="no projections to stack"):
        stack_projections(model.model.layers[0])


def test_the_static_path_stacks_projections_unless_told_not_to(monkeypatch):
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (12,))
    parents = torch.tensor([-1, 0, 0, 1, 2])
    layers = model.config.num_hidden_layers
    outputs, counts = [], []
    for static in (StaticKV(cuda_graphs=False, compiled_forward="never"),
                   StaticKV(cuda_graphs=False, compiled_forward="never", stacked_projections=False), None):
        target = Target(model, FeatureSpec("eagle1"), static)
        cache = target.new_cache()
        target.forward(cache, ids[:7])
        calls = count_linears(monkeypatch)
        outputs.append(target.forward(cache, ids[7:], tree_parents=parents).logits)
        counts.append(len(calls))
        monkeypatch.undo()
    # The output head runs outside the model's base (+1).
    assert counts == [4 * layers + 1, 7 * layers + 1, 7 * layers + 1]
    torch.testing.assert_close(outputs[0], outputs[2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs[1], outputs[2], rtol=1e-4, atol=1e-4)
