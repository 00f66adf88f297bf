"""Fused kernels for the graphed GPU path: the decoder layers compiled, or RMSNorm and the
rotary embedding alone; and grouped-query attention that reads each KV head once.

At batch 1 a forward of a small target is bound by kernel launches, even replayed as a CUDA
graph, and two pieces of transformers' Llama-family layers are most of its small kernels:

- RMSNorm is seven elementwise kernels (upcast, square, mean, add, rsqrt, multiply,
  downcast-and-scale); `F.rms_norm` does the same in one.
- The rotary embedding is ten (for the queries and the keys: two multiplies, a negation, a
  concatenation and an add each); compiled (`torch.compile`, shapes dynamic, so compiled once
  or twice per process) it is one or two.

Both round once where the reference rounds at every step in half precision, so they are used
only inside `fused`, around the forwards that our own static path runs: plain and speculative
decoding both go through it, and the same model called from anywhere else (transformers'
`generate`, the dynamic-cache path, training) keeps the reference kernels.

Beyond those two, every layer still runs its residual adds, SiLU-and-multiply and casts as
kernels of their own. Compiling a decoder layer (`Compiled`: `torch.compile` with dynamic
shapes, one graph, the matrix multiplies left to cuBLAS) fuses each chain of elementwise work
into one kernel, the norms and the rotary embedding included. The single-session static path
runs every layer through that one compiled layer where the machine can compile it
(`aerie.target.compiled_layers`, `StaticKV.compiled_forward`); the head's step is compiled
whole. Inside `fused` the projections that read one input run as one matrix multiply
(`aerie.projections`), on every device.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx.experimental._config
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import AttentionInterface

from aerie import split_kv as split_kv_kernels
from aerie.projections import stack_projections, stackable, stacked_forward


@dataclass(frozen=True)
class Fusion:
    """What `fused` swaps in for one model: its RMSNorm modules, whether the rotary embedding
    runs compiled (see `install_rotary_dispatch`), and the attention and MLP modules whose
    projections run stacked (`aerie.projections`)."""

    norms: tuple[nn.Module, ...] = ()
    rotary: bool = False
    projections: tuple[nn.Module, ...] = ()


def rms_norms(*models: nn.Module) -> list[nn.Module]:
    """transformers' RMSNorm modules under `models` (LlamaRMSNorm, Qwen2RMSNorm, ...): a
    `weight` scaled by the inverse root mean square, with `variance_epsilon`."""
    return [m for model in models for m in model.modules()
            if type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor)
            and hasattr(m, "variance_epsilon")]


def fusion_for(model: nn.Module, device: torch.device, norms: bool = True, rotary: bool = True,
               projections: bool = True) -> Fusion:
    """The fusions worth making for `model` on `device` (each unless turned off): stacked
    projections everywhere (one matrix multiply in place of three is fewer on any device);
    on CUDA also the norms and the rotary embedding (on the CPU `F.rms_norm` is the same
    sequence of kernels, and there are no launches to save). Stacks the projections now, so
    that no CUDA graph captures it."""
    stacked = tuple(stackable(model)) if projections else ()
    for module in stacked:
        stack_projections(module)
    if device.type != "cuda":
        return Fusion(projections=stacked)
    return Fusion(tuple(rms_norms(model)) if norms else (), rotary and install_rotary_dispatch(model), stacked)


@contextmanager
def fused(fusion: Fusion) -> Iterator[None]:
    """Within the block, `fusion`'s norms run as `F.rms_norm`, its attention and MLP modules
    with their projections stacked and, on this thread, rotary embeddings compiled; on leaving
    it, also on an error, all is as it was."""
    swaps = [(m, _fused_norm(m)) for m in fusion.norms] + [(m, stacked_forward(m)) for m in fusion.projections]
    saved = [m.__dict__.get("forward") for m, _ in swaps]
    for m, forward in swaps:
        m.forward = forward
    _local.rotary = getattr(_local, "rotary", 0) + fusion.rotary
    try:
        yield
    finally:
        _local.rotary -= fusion.rotary
        for (m, _), forward in zip(swaps, saved):
            if forward is None:
                del m.forward
            else:
                m.forward = forward


def _fused_norm(module: nn.Module):
    # One function per module, made once: a compiled forward that traces it guards on its
    # identity, and a new one at every block would make it compile again each time.
    forward = module.__dict__.get("_fused_forward")
    if forward is None:
        shape = (module.weight.shape[-1],)
        forward = module.__dict__["_fused_forward"] = (
            lambda hidden: F.rms_norm(hidden, shape, module.weight, module.variance_epsilon))
    return forward


# --- the rotary embedding --------------------------------------------------------------------

# Per thread: the number of `fused` blocks with the rotary fusion that this thread is inside.
# A thread-local flag rather than swapping the function for the block's duration, so that a
# service thread running the reference path meanwhile is not affected.
_local = threading.local()
_install_lock = threading.Lock()


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb` (the half-split layout of Llama-family models),
    written as one expression for the compiler to fuse."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    half = q.shape[-1] // 2

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@functools.cache
def compiled_rotate() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """`rotate` compiled, with the eager fallback of `Compiled`."""
    return Compiled(rotate, "the rotary embedding")


class Compiled:
    """`fn` compiled whole (one graph, shapes dynamic: compiled once for one row and once
    for any other count), or `fn` itself from the first failure on (a machine without a
    working Triton or C compiler): slower, never wrong. Compiling happens at the first calls,
    which the graph cache makes before it captures. Inside a `fused` block it traces the
    swapped-in norms (the compiler fuses either kind) and the reference rotary embedding."""

    def __init__(self, fn: Callable, what: str):
        # Each compiled function takes a few graphs (one row or many; a head's two feature
        # widths), and two targets of one class share a code object: more than the default
        # eight before dynamo gives up and runs eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
        self.fn, self.what = fn, what
        self.working = torch.compile(fn, dynamic=True, fullgraph=True)

    @property
    def eager(self) -> bool:
        """Whether compiling failed and `fn` runs as it is."""
        return self.working is self.fn

    def __call__(self, *args, **kwargs):
        try:
            # By default dims of equal size share one symbol, so a forward of as many rows as
            # the model has KV heads or head dims (or a cache as wide) is tied to that constant
            # and compiled apart: each such bucket would cost another compile of minutes. Set
            # for our own traces only: others in the process (transformers' compiled static
            # `generate`) keep the default.
            with torch.fx.experimental._config.patch(use_duck_shape=False):
                return self.working(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure; the eager function is exact
            if self.eager or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
                raise
            print(f"aerie: compiling {self.what} failed ({type(e).__name__}: {e}); running it uncompiled",
                  file=sys.stderr)
            self.working = self.fn
            return self.fn(*args, **kwargs)


def install_rotary_dispatch(model: nn.Module) -> bool:
    """Route the `apply_rotary_pos_emb` of `model`'s attention modules through a dispatcher
    that runs `compiled_rotate` inside `fused` blocks and the reference everywhere else.
    Idempotent; returns whether any module of `model` now dispatches."""
    modules = {sys.modules[type(m).__module__] for m in model.modules() if type(m).__name__.endswith("Attention")}
    modules = [mod for mod in modules if callable(getattr(mod, "apply_rotary_pos_emb", None))]
    with _install_lock:
        for mod in modules:
            if not hasattr(mod.apply_rotary_pos_emb, "reference"):
                mod.apply_rotary_pos_emb = _dispatching(mod.apply_rotary_pos_emb)
    return bool(modules)


def _dispatching(reference: Callable) -> Callable:
    @functools.wraps(reference)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        # Under torch.compile (transformers' static `generate`) the reference is traced as
        # before: the compiler sees a constant False and never reads the thread-local.
        if not torch.compiler.is_compiling() and getattr(_local, "rotary", 0):
            return compiled_rotate()(q, k, cos, sin, *args, **kwargs)
        return reference(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.reference = reference
    return apply_rotary_pos_emb


# --- grouped-query attention -----------------------------------------------------------------

def grouped_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor, scaling: float | None = None,
                            split_kv: bool = False) -> torch.Tensor:
    """SDPA over query heads that share KV heads (query [b, heads, n, d], key and value
    [b, kv_heads, length, d]) under a mask ([b or 1, 1, n, length]), with each KV head read
    once: the query heads of one group are stacked as rows of one head, and the mask is
    repeated for each (n rows, not the cache). Returns [b, n, heads, d], as transformers'
    attention functions do.

    Given a mask, transformers' SDPA path repeats every KV head once per query head that
    shares it (SDPA's `enable_gqa` has no fused kernel that takes a mask): a copy of the whole
    static cache in every layer of every forward, 0.66 ms of the 8B shape's 7.5 ms one-token
    forward on an H100.

    `split_kv`: where the device has the kernels, the mask is additive and the rows are few,
    spread the keys over the GPU (`aerie.split_kv`) instead of one SDPA program per block of
    rows."""
    b, heads, n, d = query.shape
    kv_heads, groups = key.shape[1], heads // key.shape[1]
    rows = query.reshape(b, kv_heads, groups * n, d)
    if (split_kv and groups * n <= split_kv_kernels.MAX_ROWS and attention_mask.is_floating_point()
            and split_kv_kernels.available(query)):
        scale = scaling if scaling is not None else d**-0.5
        out = split_kv_kernels.split_kv_attention(rows, key, value, attention_mask, scale)
    else:
        out = split_kv_kernels.sdpa_attention(rows, key, value, attention_mask, scaling)
    return out.reshape(b, heads, n, d).transpose(1, 2).contiguous()


def install_grouped_attention() -> None:
    """Route transformers' "sdpa" attention through a dispatcher that runs
    `grouped_query_attention` for forwards called with `fold_query_groups=True` (the static
    path's, through the model's keyword arguments, which reach every attention call; with
    `split_kv=True` too, its split-KV kernels where they apply) and the
    reference for every other, transformers' own `generate` included. A keyword rather than a
    flag of this module, so that a compiled layer sees a constant. Idempotent."""
    with _install_lock:
        reference = AttentionInterface._global_mapping["sdpa"]
        if not hasattr(reference, "reference"):
            AttentionInterface.register("sdpa", _grouped_dispatching(reference))


def _grouped_dispatching(reference: Callable) -> Callable:
    @functools.wraps(reference)
    def sdpa_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: float | None = None, fold_query_groups: bool = False,
                               split_kv: bool = False, **kwargs):
        if (fold_query_groups and attention_mask is not None and attention_mask.dim() == 4
                and attention_mask.shape[1] == 1 and key.shape[1] <= query.shape[1] and dropout == 0.0):
            return grouped_query_attention(query, key, value, attention_mask, scaling, split_kv), None
        return reference(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    sdpa_attention_forward.reference = reference
    return sdpa_attention_forward
