"""Sampling parameters: what a request asks for, checked without torch (the gateway
validates requests with them and never loads a model)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from aerie.errors import InputError

# Splits the seed space so that (seed, position) pairs never collide for realistic lengths.
POSITION_STRIDE = 1_000_003
# The largest seed whose per-position generator seeds stay within int64.
MAX_SEED = (2**63 - 1) // POSITION_STRIDE - 1


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature == 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
