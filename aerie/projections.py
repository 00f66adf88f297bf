"""Projections that read the same input, run as one matrix multiply: an attention's query, key
and value projections, and an MLP's gate and up projections.

At batch 1 every projection is a matrix-vector product, a kernel of its own: seven per layer
where four would do. Each is bound by reading its weight, and the narrow ones (the key and
value projections of a grouped-query model) are too small to keep the memory system busy:
cuBLAS splits them along K and adds a reduction kernel. Stacked into one weight, the same
bytes are read by one kernel.

The stacked weight is made once per module (`stack_projections`), and the module's own
projections become views into it: no memory is added, and every other caller of the same
model (transformers' `generate`, the dynamic-cache path, a forward outside `fused`) computes
from the same storage as before. Only the Llama family's modules are stacked (Llama, Mistral,
Qwen2: plain `nn.Linear` projections, no per-head norms); any other keeps its own forward.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# The modules whose forward `attention_forward` / `mlp_forward` reproduce, by class name, and
# the projections of each that read the same input, in the order they are stacked.
ATTENTION_CLASSES = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention"})
MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP"})
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj")


def stacked_names(module: nn.Module) -> tuple[str, ...] | None:
    """The projections of `module` that can be stacked, or None where it is not a module of
    the Llama family with plain linear projections (all with a bias, or none)."""
    name = type(module).__name__
    names = ATTENTION_PROJECTIONS if name in ATTENTION_CLASSES else MLP_PROJECTIONS if name in MLP_CLASSES else None
    if names is None:
        return None
    linears = [getattr(module, n, None) for n in names]
    if not all(type(linear) is nn.Linear for linear in linears):  # e.g. a tensor-parallel wrapper
        return None
    if len({linear.bias is None for linear in linears}) != 1:
        return None
    if len({(linear.in_features, linear.weight.dtype, linear.weight.device) for linear in linears}) != 1:
        return None
    return names


def stackable(*models: nn.Module) -> list[nn.Module]:
    """The attention and MLP modules under `models` whose projections can be stacked."""
    return [m for model in models for m in model.modules() if stacked_names(m) is not None]


def stack_projections(module: nn.Module) -> None:
    """Make `module`'s projections views into one stacked weight (and bias), the buffers
    `stacked_weight` and `stacked_bias`; again if they no longer share its storage (the
    module was moved or cast since). Not while a CUDA graph is being captured: a stacking
    captured would copy the weights at every replay."""
    names = stacked_names(module)
    if names is None:
        raise ValueError(f"{type(module).__name__} has no projections to stack")
    linears = [getattr(module, n) for n in names]
    stacked = module._buffers.get("stacked_weight")
    if stacked is not None and all(_shares(linear.weight, stacked) for linear in linears):
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{type(module).__name__}'s projections changed storage during a CUDA graph capture: "
                           "stack them before capturing (aerie.fused.fusion_for does)")
    for attribute in ("weight", "bias"):
        parts = [getattr(linear, attribute) for linear in linears]
        if parts[0] is None:
            module.register_buffer(f"stacked_{attribute}", None, persistent=False)
            continue
        whole = torch.cat([p.detach() for p in parts])
        offset = 0
        for linear, part in zip(linears, parts):
            rows = part.shape[0]
            setattr(linear, attribute, nn.Parameter(whole[offset:offset + rows], requires_grad=part.requires_grad))
            offset += rows
        module.register_buffer(f"stacked_{attribute}", whole, persistent=False)
    module.stacked_sizes = tuple(linear.out_features for linear in linears)


def _shares(part: torch.Tensor, whole: torch.Tensor) -> bool:
    return part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()


def stacked_forward(module: nn.Module) -> Callable:
    """`module`'s forward with its projections stacked (stacking them first if need be). One
    function per module, made once: a compiled layer that traces it guards on its identity."""
    stack_projections(module)
    forward = module.__dict__.get("_stacked_forward")
    if forward is None:
        run = attention_forward if type(module).__name__ in ATTENTION_CLASSES else mlp_forward
        forward = module.__dict__["_stacked_forward"] = lambda *args, **kwargs: run(module, *args, **kwargs)
    return forward


def attention_forward(module: nn.Module, hidden_states: torch.Tensor,
                      position_embeddings: tuple[torch.Tensor, torch.Tensor],
                      attention_mask: torch.Tensor | None, past_key_values=None, **kwargs):
    """transformers' Llama-family attention forward (rotary embedding, cache update, the
    configured attention function, output projection) with one projection for q, k and v.
    Inference only: no attention dropout."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)
    q, k, v = F.linear(hidden_states, module.stacked_weight, module.stacked_bias).split(module.stacked_sizes, dim=-1)
    q, k, v = (x.view(hidden_shape).transpose(1, 2) for x in (q, k, v))
    cos, sin = position_embeddings
    # The model's own module-level functions: `aerie.fused`'s rotary dispatch applies.
    source = sys.modules[type(module).__module__]
    q, k = source.apply_rotary_pos_emb(q, k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, module.layer_idx)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, source.eager_attention_forward)
    sliding_window = getattr(module, "sliding_window", getattr(module.config, "sliding_window", None))
    out, weights = attend(module, q, k, v, attention_mask, dropout=0.0, scaling=module.scaling,
                          sliding_window=sliding_window, **kwargs)
    return module.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def mlp_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The Llama-family MLP, down(act(gate(x)) * up(x)), with one projection for gate and up."""
    gate, up = F.linear(x, module.stacked_weight, module.stacked_bias).split(module.stacked_sizes, dim=-1)
    return module.down_proj(module.act_fn(gate) * up)
