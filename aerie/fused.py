"""Fused RMSNorm for the graphed GPU path.

transformers' Llama-family RMSNorm is seven elementwise kernels (upcast, square, mean, add,
rsqrt, multiply, downcast-and-scale); at batch 1 a forward is bound by kernel launches, and two
norms per layer are about a quarter of a SmolLM2 layer's kernels. `F.rms_norm` does the same
in one kernel on CUDA. It rounds once instead of twice in half precision, so it is used only
inside `fused_norms`, around the forwards that our own static path runs: plain and speculative
decoding both go through it, and the same model called from anywhere else (transformers'
`generate`, the dynamic-cache path) keeps the reference norm.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def rms_norms(*models: nn.Module) -> list[nn.Module]:
    """transformers' RMSNorm modules under `models` (LlamaRMSNorm, Qwen2RMSNorm, ...): a
    `weight` scaled by the inverse root mean square, with `variance_epsilon`."""
    return [m for model in models for m in model.modules()
            if type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor)
            and hasattr(m, "variance_epsilon")]


def norms_to_fuse(model: nn.Module, device: torch.device) -> list[nn.Module]:
    """The norms worth fusing: all of them on CUDA, none elsewhere (on the CPU `F.rms_norm`
    is the same sequence of kernels)."""
    return rms_norms(model) if device.type == "cuda" else []


def _fused_forward(module: nn.Module):
    shape, weight, eps = (module.weight.shape[-1],), module.weight, module.variance_epsilon
    return lambda hidden: F.rms_norm(hidden, shape, weight, eps)


@contextmanager
def fused_norms(norms: list[nn.Module]) -> Iterator[None]:
    """Within the block, the modules `norms` (from `rms_norms`) run as `F.rms_norm`; on
    leaving it, also on an error, they are as they were."""
    saved = [m.__dict__.get("forward") for m in norms]
    for m in norms:
        m.forward = _fused_forward(m)
    try:
        yield
    finally:
        for m, forward in zip(norms, saved):
            if forward is None:
                del m.forward
            else:
                m.forward = forward
