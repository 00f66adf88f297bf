"""Megatron-style tensor parallelism for Llama-family decoders, applied in place to a loaded
transformers model (Llama, Qwen2, Mistral share the layout).

Per decoder layer, q/k/v and gate/up are column-parallel: each rank keeps a contiguous block of
heads (of intermediate channels), so attention and the MLP's elementwise product run on local
data with no communication. o_proj and down_proj are row-parallel: each rank multiplies its
block of input channels and an all-reduce sums the partial outputs, so the residual stream,
the norms and the hidden states (the EAGLE features) are whole and identical on every rank.
Two all-reduces per layer, nothing else.

Embeddings and the LM head stay whole. Sharding them over the vocabulary would save their
memory (about 2 GB each for a 128k-token bf16 70B) at the price of one more collective per
forward and a logits gather; the LM head is instead dropped on ranks > 0 (`drop_lm_head_`),
because only rank 0 reads logits, which recovers most of that memory with no communication.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from aerie.errors import InputError
from aerie.models import SUPPORTED_MODEL_TYPES

AllReduce = Callable[[torch.Tensor], object]  # sums a tensor in place over the ranks


@dataclass(frozen=True)
class ShardPlan:
    """What one rank holds: blocks [rank * n, (rank + 1) * n) of each sharded dimension."""

    rank: int
    world: int
    heads: int  # local query heads
    kv_heads: int  # local key/value heads
    intermediate: int  # local MLP channels
    head_dim: int


def plan_shards(config, rank: int, world: int) -> ShardPlan:
    """The local sizes for `rank` of `world`, or an error naming the sizes that would work."""
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"rank {rank} is not within a tensor-parallel world of {world}")
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
    intermediate = int(config.intermediate_size)
    # Each rank must own whole KV heads together with the query heads that read them; splitting
    # a KV head (or replicating it, as some servers do when N exceeds the KV heads) is not done.
    if kv_heads % world:
        valid = [n for n in range(1, kv_heads + 1) if kv_heads % n == 0 and intermediate % n == 0]
        raise InputError(
            f"--tensor-parallel {world} does not divide the model's {kv_heads} key/value heads: "
            f"use one of {', '.join(map(str, valid))}"
        )
    if intermediate % world:
        raise InputError(f"--tensor-parallel {world} does not divide the model's intermediate size {intermediate}")
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return ShardPlan(rank, world, heads // world, kv_heads // world, intermediate // world, head_dim)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b: the input channels are split over the ranks.

    The bias is added after the sum so that it counts once, not once per rank.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, all_reduce: AllReduce):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.all_reduce = all_reduce
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        self.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} (local), out_features={self.out_features}, bias={self.bias is not None}"


class NoLogits(nn.Module):
    """Stands in for the LM head on ranks that never read logits: a zero-width output."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_empty(*hidden.shape[:-1], 0)


def shard_llama_(model: nn.Module, rank: int, world: int, all_reduce: AllReduce) -> ShardPlan:
    """Keep only rank `rank`'s shard of every decoder layer of `model`, in place.

    `all_reduce` sums a tensor in place over the `world` ranks (e.g. `dist.all_reduce` bound
    to the group); every rank must shard the same weights and then run the same forwards.
    The model's config is left whole (it still describes the full model); the local head
    counts are on each attention module (`num_heads`, `num_key_value_heads`).
    """
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"tensor parallelism supports {', '.join(SUPPORTED_MODEL_TYPES)} models, not {config.model_type}")
    plan = plan_shards(config, rank, world)
    if world == 1:
        return plan
    q_rows = _block(rank, plan.heads * plan.head_dim)
    kv_rows = _block(rank, plan.kv_heads * plan.head_dim)
    mlp_rows = _block(rank, plan.intermediate)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = _column(attn.q_proj, q_rows)
        attn.k_proj = _column(attn.k_proj, kv_rows)
        attn.v_proj = _column(attn.v_proj, kv_rows)
        attn.o_proj = _row(attn.o_proj, q_rows, all_reduce)
        # transformers reshapes with -1 heads and repeats KV by num_key_value_groups, which
        # the even split leaves unchanged; the counts are set for code that reads them.
        attn.num_heads, attn.num_key_value_heads = plan.heads, plan.kv_heads
        mlp.gate_proj = _column(mlp.gate_proj, mlp_rows)
        mlp.up_proj = _column(mlp.up_proj, mlp_rows)
        mlp.down_proj = _row(mlp.down_proj, mlp_rows, all_reduce)
        mlp.intermediate_size = plan.intermediate
    return plan


def drop_lm_head_(model: nn.Module) -> None:
    """Replace the LM head by a zero-width one (for ranks > 0, which never read logits)."""
    model.lm_head = NoLogits()


def _block(rank: int, size: int) -> slice:
    return slice(rank * size, (rank + 1) * size)


def _column(linear: nn.Linear, rows: slice) -> nn.Linear:
    # clone(): a slice would keep the whole weight alive through its storage.
    weight = linear.weight.detach()[rows].clone()
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach()[rows].clone(), requires_grad=False)
    return out


def _row(linear: nn.Linear, cols: slice, all_reduce: AllReduce) -> RowParallelLinear:
    weight = linear.weight.detach()[:, cols].clone()
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return RowParallelLinear(weight, bias, all_reduce)
