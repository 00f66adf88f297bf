"""Official EAGLE-1 / EAGLE-3 checkpoint layouts load unchanged; misfits are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from aerie.errors import HeadError
from aerie.heads import Eagle1Head, Eagle3Head, build_draft_vocab, load_head, new_head, save_head
from tests.tiny import tiny_target

H, V, INTER, HEADS, KV = 64, 64, 128, 4, 2
HD = H // HEADS


def llama_config(**extra) -> dict:
    base = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": H, "intermediate_size": INTER, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "num_hidden_layers": 1, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512, "rope_theta": 10000.0, "rope_scaling": None,
        "vocab_size": V, "torch_dtype": "float16", "transformers_version": "4.28.1",
        "tie_word_embeddings": False, "pretraining_tp": 1,
    }
    base.update(extra)
    return base


def eagle1_state(bias: bool, with_embed: bool) -> dict[str, torch.Tensor]:
    """Key names and shapes of SafeAILab's EAGLE-1/2 releases (cnets1.py)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    state = {
        "fc.weight": r(H, 2 * H),
        "layers.0.self_attn.q_proj.weight": r(HEADS * HD, H),
        "layers.0.self_attn.k_proj.weight": r(KV * HD, H),
        "layers.0.self_attn.v_proj.weight": r(KV * HD, H),
        "layers.0.self_attn.o_proj.weight": r(H, HEADS * HD),
        "layers.0.mlp.gate_proj.weight": r(INTER, H),
        "layers.0.mlp.up_proj.weight": r(INTER, H),
        "layers.0.mlp.down_proj.weight": r(H, INTER),
        "layers.0.post_attention_layernorm.weight": 1 + r(H),
    }
    if bias:
        state["fc.bias"] = r(H)
    if with_embed:
        state["embed_tokens.weight"] = r(V, H)
    return state


def eagle3_state(draft_vocab: int, with_embed: bool) -> dict[str, torch.Tensor]:
    """Key names and shapes of SafeAILab's EAGLE-3 releases and SpecForge outputs."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    d2t, t2d = build_draft_vocab(torch.arange(V).float(), draft_vocab)
    state = {
        "fc.weight": r(H, 3 * H),
        "midlayer.hidden_norm.weight": 1 + r(H),
        "midlayer.input_layernorm.weight": 1 + r(H),
        "midlayer.post_attention_layernorm.weight": 1 + r(H),
        "midlayer.self_attn.q_proj.weight": r(HEADS * HD, 2 * H),
        "midlayer.self_attn.k_proj.weight": r(KV * HD, 2 * H),
        "midlayer.self_attn.v_proj.weight": r(KV * HD, 2 * H),
        "midlayer.self_attn.o_proj.weight": r(H, HEADS * HD),
        "midlayer.mlp.gate_proj.weight": r(INTER, H),
        "midlayer.mlp.up_proj.weight": r(INTER, H),
        "midlayer.mlp.down_proj.weight": r(H, INTER),
        "norm.weight": 1 + r(H),
        "lm_head.weight": r(draft_vocab, H),
        "d2t": d2t,
        "t2d": t2d,
    }
    if with_embed:
        state["embed_tokens.weight"] = r(V, H)
    return state


def write(path, config: dict, state: dict, fmt: str) -> None:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save(state, path / "pytorch_model.bin")
    else:
        save_file(state, str(path / "model.safetensors"))


def assert_loaded(head, state):
    loaded = head.state_dict()
    for key, value in state.items():
        if key == "embed_tokens.weight":
            assert key not in loaded
            continue
        torch.testing.assert_close(loaded[key].cpu(), value.to(loaded[key].dtype))


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("bias", [True, False])
def test_official_eagle1_layout_loads(tmp_path, fmt, bias):
    target = tiny_target("eagle1")
    state = eagle1_state(bias=bias, with_embed=True)
    config = llama_config() if bias else llama_config(bias=False)  # Vicuna heads vs LLaMA3 heads
    write(tmp_path / "h", config, state, fmt)
    head = load_head(tmp_path / "h", target)
    assert isinstance(head, Eagle1Head)
    assert (head.fc.bias is not None) == bias
    assert not hasattr(head.layers[0].input_layernorm, "weight")
    assert_loaded(head, state)
    hidden = head(torch.randn(1, 3, H), torch.tensor([[1, 2, 3]]), torch.arange(3)[None])
    assert head.draft_logprobs(hidden).shape == (1, 3, V)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_official_eagle3_layout_loads(tmp_path, fmt):
    target = tiny_target("eagle3")
    state = eagle3_state(draft_vocab=32, with_embed=(fmt == "safetensors"))
    config = llama_config(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=32)
    write(tmp_path / "h", config, state, fmt)
    head = load_head(tmp_path / "h", target)
    assert isinstance(head, Eagle3Head)
    assert_loaded(head, state)
    assert head.feature_layers == (2, 3, 3)  # default low/mid/high for 6 layers: 2, L//2, L-3
    # d2t maps every draft id onto the target id it stands for.
    chosen = torch.nonzero(state["t2d"]).flatten()
    assert torch.equal(head.to_target_ids(torch.arange(32)), chosen)
    hidden = head(torch.randn(1, 3, 3 * H), torch.tensor([[1, 2, 3]]), torch.arange(3)[None])
    assert head.draft_logprobs(hidden).shape == (1, 3, 32)


def test_eagle3_aux_layer_ids_follow_layer_output_convention(tmp_path):
    target = tiny_target("eagle3")
    config = llama_config(
        architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=32,
        eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 2, 4]},
    )
    write(tmp_path / "h", config, eagle3_state(32, False), "safetensors")
    assert load_head(tmp_path / "h", target).feature_layers == (1, 3, 5)


def test_save_and_reload_round_trip(tmp_path):
    target = tiny_target("eagle3")
    head = new_head(target, "eagle3", draft_vocab_size=40)
    d2t, t2d = build_draft_vocab(torch.rand(V), 40)
    head.d2t.copy_(d2t)
    head.t2d.copy_(t2d)
    save_head(head, tmp_path / "h", dtype=torch.float32)
    again = load_head(tmp_path / "h", target)
    for key, value in head.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["draft_vocab_size"] == 40 and config["architectures"] == ["LlamaForCausalLMEagle3"]


def test_d2t_t2d_round_trip():
    counts = torch.tensor([5, 0, 9, 1, 7, 3, 0, 8]).float()
    d2t, t2d = build_draft_vocab(counts, 4)
    target_ids = torch.arange(4) + d2t
    assert target_ids.tolist() == [0, 2, 4, 7]  # the four most frequent, ascending
    assert torch.nonzero(t2d).flatten().tolist() == target_ids.tolist()


def test_head_for_another_hidden_size_is_refused(tmp_path):
    target = tiny_target("eagle3")
    state = eagle3_state(32, False)
    state["fc.weight"] = torch.zeros(H, 3 * 48)
    write(tmp_path / "h", llama_config(draft_vocab_size=32), state, "safetensors")
    with pytest.raises(HeadError, match="hidden size is 64"):
        load_head(tmp_path / "h", target)


def test_head_for_another_vocabulary_is_refused(tmp_path):
    target = tiny_target("eagle1")
    write(tmp_path / "h", llama_config(vocab_size=V + 10), eagle1_state(True, False), "bin")
    with pytest.raises(HeadError, match="vocabulary"):
        load_head(tmp_path / "h", target)


def test_missing_head_directory_is_refused(tmp_path):
    with pytest.raises(HeadError, match="config.json"):
        load_head(tmp_path / "nope", tiny_target("eagle1"))


def test_a_head_names_its_gpu_tree_and_drafts_it_by_default_on_a_gpu(tmp_path):
    from aerie.stack import CPU_TREE, GPU_TREE, default_tree
    from aerie.train.trainer import initial_head
    from aerie.tree import TreeConfig
    from draft_service.config import DraftConfig

    target = tiny_target("eagle3")
    state = eagle3_state(32, False)
    write(tmp_path / "plain", llama_config(draft_vocab_size=32), state, "safetensors")
    write(tmp_path / "tuned", llama_config(draft_vocab_size=32, gpu_tree={"depth": 5, "top_k": 10, "total_tokens": 31}),
          state, "safetensors")
    plain, tuned = load_head(tmp_path / "plain", target), load_head(tmp_path / "tuned", target)
    assert plain.gpu_tree is None
    assert tuned.gpu_tree == TreeConfig("dynamic", 5, 10, 31)
    assert default_tree("cuda", tuned) == TreeConfig("dynamic", 5, 10, 31)
    assert default_tree("cuda", plain) == default_tree("cuda") == GPU_TREE
    assert default_tree("cpu", tuned) == CPU_TREE
    # Saved, the head keeps its tree; continued training (--init) starts without it, since
    # new weights have not been measured.
    save_head(tuned, tmp_path / "saved", dtype=torch.float32)
    assert load_head(tmp_path / "saved", target).gpu_tree == TreeConfig("dynamic", 5, 10, 31)
    assert initial_head(tmp_path / "saved", target, "eagle3", None).gpu_tree is None
    # The draft service drafts the same, and its flags still override the head's tree.
    assert DraftConfig(verifier=("x:1",), device="cuda").tree(tuned) == TreeConfig("dynamic", 5, 10, 31)
    assert DraftConfig(verifier=("x:1",), device="cuda", tree_depth=3).tree(tuned) == TreeConfig("dynamic", 3, 10, 31)


@pytest.mark.parametrize("shape", [{"depth": 5, "top_k": 10}, {"depth": 0, "top_k": 10, "total_tokens": 31},
                                   {"depth": 5.5, "top_k": 10, "total_tokens": 31}, [5, 10, 31]])
def test_a_malformed_gpu_tree_is_refused(tmp_path, shape):
    write(tmp_path / "h", llama_config(draft_vocab_size=32, gpu_tree=shape), eagle3_state(32, False), "safetensors")
    with pytest.raises(HeadError, match="gpu_tree"):
        load_head(tmp_path / "h", tiny_target("eagle3"))
