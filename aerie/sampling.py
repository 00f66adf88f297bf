"""Sampling parameters, logit warping and per-position randomness.

Plain and speculative decoding both go through `warp_probs` and `position_uniform`, so a
temperature, top-p or top-k setting means exactly the same distribution in both, and the
random numbers that decide a token depend only on (seed, position): a run can be repeated,
and resumed from any round boundary, identically.
"""

from __future__ import annotations

import numpy as np
import torch

# SamplingParams and MAX_SEED live in aerie.params (no torch there) and are re-exported here.
from aerie.params import MAX_SEED, POSITION_STRIDE, SamplingParams  # noqa: F401


def warp_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Target distribution over the vocabulary (last dim) after temperature, top-k and top-p.

    Computed in float64 so that the rejection test and the residual are not biased by rounding.
    For greedy params this is the one-hot of the argmax.
    """
    logits = logits.to(torch.float64)
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float64)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing it is kept).
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample: the first token whose cumulative probability exceeds u * total."""
    cdf = torch.cumsum(probs, dim=-1)
    target = (u.to(cdf.dtype) * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_max(probs.shape[-1] - 1)


_U64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit integers with full avalanche."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def position_uniform(seed: int, position: int, index: int) -> float:
    """The index-th random number owned by one sequence position, in [0, 1): index 0 draws
    the token emitted at `position` (plain decoding, or the bonus token), index j + 1 decides
    the rejection test of the j-th draft candidate for that position.

    Counter based (the SplitMix64 stream of (seed, position), read at `index`): each number is
    a pure function of (seed, position, index), so any of them can be drawn alone, in any
    order, with a few integer operations on the host.
    """
    state = (_mix64((seed * POSITION_STRIDE + position) & _U64) + (index + 1) * _GOLDEN_GAMMA) & _U64
    return (_mix64(state) >> 11) * 2.0**-53  # 53 bits: a double in [0, 1)


def _mix64_array(x: np.ndarray) -> np.ndarray:
    """`_mix64` over a uint64 array: numpy's uint64 arithmetic wraps modulo 2**64, which is
    the masking `_mix64` does by hand."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def position_uniforms(seed: int, positions: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """`position_uniform(seed, p, i)` for every (p, i) of `positions` and `indices`
    (broadcast together), bit for bit, as one vectorised pass: a device round draws a table
    of them on the host before each launch."""
    positions = np.asarray(positions, dtype=np.uint64)
    indices = np.asarray(indices, dtype=np.uint64)
    with np.errstate(over="ignore"):  # the wrap-around is the hash's own arithmetic
        stream = _mix64_array(np.uint64((seed * POSITION_STRIDE) & _U64) + positions)
        state = stream + (indices + np.uint64(1)) * np.uint64(_GOLDEN_GAMMA)
        return (_mix64_array(state) >> np.uint64(11)).astype(np.float64) * 2.0**-53
