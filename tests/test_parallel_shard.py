"""Sharding Llama-family layers, in one process: the all-reduce is simulated across threads,
one per rank. Qwen2 (biased q/k/v), Mistral and a Llama with attention and MLP biases shard
to the unsharded outputs over 2 and 4 ranks; the shards have the local shapes and together
are the model; KV head counts that do not split are refused with the sizes that would.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from aerie.errors import InputError
from aerie.parallel.shard import RowParallelLinear, drop_lm_head_, plan_shards, shard_llama_
from tests.tiny import tiny_llama

WORLD = 2
ATOL = 1e-5


class ThreadAllReduce:
    """An in-place sum across `world` threads, one per rank, in a fixed order."""

    def __init__(self, world: int):
        self.parts: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world, timeout=30)

    def for_rank(self, rank: int):
        def all_reduce(t: torch.Tensor) -> None:
            self.parts[rank] = t.clone()
            self.barrier.wait()
            total = torch.stack(self.parts).sum(0)
            self.barrier.wait()
            t.copy_(total)

        return all_reduce


def run_ranks_in_threads(model, world: int, ids: torch.Tensor) -> list[torch.Tensor]:
    reduce = ThreadAllReduce(world)
    shards = []
    for rank in range(world):
        shard = copy.deepcopy(model)
        shard_llama_(shard, rank, world, reduce.for_rank(rank))
        shards.append(shard)
    results: list = [None] * world

    def run(rank: int) -> None:
        with torch.inference_mode():
            results[rank] = shards[rank](ids[None], output_hidden_states=True)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def small(cls_config, cls_model, **kw):
    torch.manual_seed(0)
    config = cls_config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128, **kw)
    config._attn_implementation = "sdpa"
    model = cls_model(config).eval()
    with torch.no_grad():  # biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model


FAMILIES = {
    "qwen2": lambda: small(Qwen2Config, Qwen2ForCausalLM),
    "mistral": lambda: small(MistralConfig, MistralForCausalLM),
    "llama-biased": lambda: small(LlamaConfig, LlamaForCausalLM, attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("world", [2, 4])
def test_families_shard_to_the_same_outputs(family, world):
    model = FAMILIES[family]()
    ids = torch.tensor([3, 9, 27, 17, 51, 2])
    with torch.inference_mode():
        ref = model(ids[None], output_hidden_states=True)
    for out in run_ranks_in_threads(model, world, ids):
        torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=ATOL)
        for mine, want in zip(out.hidden_states, ref.hidden_states):
            torch.testing.assert_close(mine, want, atol=ATOL, rtol=ATOL)


# --- shapes and errors ------------------------------------------------------------------------


def test_shards_have_local_shapes_and_together_are_the_model():
    model = tiny_llama(layers=2, seed=0)
    shards = []
    for rank in range(WORLD):
        shard = copy.deepcopy(model)
        plan = shard_llama_(shard, rank, WORLD, lambda t: None)
        assert (plan.heads, plan.kv_heads, plan.intermediate, plan.head_dim) == (2, 1, 64, 16)
        shards.append(shard)
    for j, full in enumerate(model.model.layers):
        parts = [s.model.layers[j] for s in shards]
        for p in parts:
            attn, mlp = p.self_attn, p.mlp
            assert (attn.num_heads, attn.num_key_value_heads) == (2, 1)
            assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)
            assert attn.v_proj.weight.shape == (16, 64)
            assert isinstance(attn.o_proj, RowParallelLinear) and attn.o_proj.weight.shape == (64, 32)
            assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (64, 64)
            assert isinstance(mlp.down_proj, RowParallelLinear) and mlp.down_proj.weight.shape == (64, 64)
        for name in ("q_proj", "k_proj", "v_proj"):
            whole = torch.cat([getattr(p.self_attn, name).weight for p in parts], 0)
            assert torch.equal(whole, getattr(full.self_attn, name).weight)
        assert torch.equal(torch.cat([p.self_attn.o_proj.weight for p in parts], 1), full.self_attn.o_proj.weight)
        for name in ("gate_proj", "up_proj"):
            assert torch.equal(torch.cat([getattr(p.mlp, name).weight for p in parts], 0), getattr(full.mlp, name).weight)
        assert torch.equal(torch.cat([p.mlp.down_proj.weight for p in parts], 1), full.mlp.down_proj.weight)
    # The config still describes the whole model (the head layout of draft heads reads it).
    assert shards[0].config.num_attention_heads == 4 and shards[0].config.num_key_value_heads == 2


def test_row_parallel_bias_is_added_once_after_the_sum():
    weight, bias = torch.randn(3, 4), torch.randn(3)
    x = torch.randn(2, 4)
    partner = torch.nn.functional.linear(x[:, 2:], weight[:, 2:])

    def all_reduce(t: torch.Tensor) -> None:
        t.add_(partner)  # what rank 1 contributes

    layer = RowParallelLinear(weight[:, :2].clone(), bias, all_reduce)
    torch.testing.assert_close(layer(x[:, :2]), torch.nn.functional.linear(x, weight, bias))


@pytest.mark.parametrize("world", [3, 4, 8])
def test_kv_heads_that_do_not_split_are_refused_with_the_sizes_that_would(world):
    model = tiny_llama(layers=1)  # 2 key/value heads
    with pytest.raises(InputError, match=rf"--tensor-parallel {world} does not divide the model's 2 key/value heads: use one of 1, 2$"):
        shard_llama_(model, 0, world, lambda t: None)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)  # left whole


def test_intermediate_size_that_does_not_split_is_refused():
    config = LlamaConfig(hidden_size=64, intermediate_size=90, num_attention_heads=4, num_key_value_heads=4)
    plan_shards(config, 0, 2)
    with pytest.raises(InputError, match="does not divide the model's intermediate size 90"):
        plan_shards(config, 0, 4)


# --- loading only a rank's slices --------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_a_shard_read_from_the_checkpoint_equals_the_loaded_model_sharded(tmp_path, tied):
    from aerie.parallel.launch import ParallelGroup
    from aerie.parallel.load import load_shard

    model = tiny_llama(layers=3, seed=2)
    model.config.tie_word_embeddings = tied
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    ids = torch.tensor([[3, 14, 15, 9, 26]])
    for rank in range(2):
        group = ParallelGroup(rank, 2, torch.device("cpu"), None, None)
        group.all_reduce = lambda t: None  # one rank alone: each gives its partial sums
        shard, plan = load_shard(tmp_path, group, torch.float32)
        want = tiny_llama(layers=3, seed=2)
        if tied:
            want.lm_head.weight = want.model.embed_tokens.weight
        shard_llama_(want, rank, 2, lambda t: None)
        if rank > 0:
            drop_lm_head_(want)
        got_params, want_params = dict(shard.named_parameters()), dict(want.named_parameters())
        assert got_params.keys() == want_params.keys() and plan.kv_heads == 1
        for name, p in want_params.items():
            assert torch.equal(got_params[name], p), name
        assert (getattr(shard.lm_head, "weight", None) is shard.model.embed_tokens.weight) == (tied and rank == 0)
        with torch.no_grad():
            got, ref = shard(input_ids=ids).logits, want(input_ids=ids).logits
        torch.testing.assert_close(got, ref)


def test_a_checkpoint_without_a_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from aerie.errors import ModelError
    from aerie.parallel.launch import ParallelGroup
    from aerie.parallel.load import load_shard, shard_index

    tiny_llama(layers=2).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    group = ParallelGroup(0, 2, torch.device("cpu"), None, None)
    group.all_reduce = lambda t: None
    with pytest.raises(ModelError, match="lacks 1 weights, e.g. model.layers.1.mlp.up_proj.weight"):
        load_shard(tmp_path, group, torch.float32)
    assert shard_index((4, 8), (8, 8), 1) == (slice(4, 8), slice(None))
    with pytest.raises(ModelError, match="cannot come from"):
        shard_index((3, 8), (8, 8), 0)
