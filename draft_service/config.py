"""Configuration of the draft service (flags mirrored by AERIE_* environment variables)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aerie.errors import InputError
from aerie.tree import TreeConfig
from aerie_rpc.config import option
from aerie_rpc.tls import TlsOptions

if TYPE_CHECKING:
    from aerie.heads import DraftHead


@dataclass
class DraftConfig(TlsOptions):
    listen: str = option("127.0.0.1:50062", "address to serve on, HOST:PORT (port 0 picks a free one)")
    verifier: tuple[str, ...] = option((), "verify services to drive, ADDR[,ADDR...] (required)")
    model: str | None = option(None, "the target's model directory: only its config and embedding are read")
    head: str | None = option(None, "EAGLE-1/EAGLE-3 head directory (default: the demo model's head)")
    device: str = option("cpu", "where the head runs", choices=("cpu", "cuda"))
    dtype: str = option("float32", "head weights and activations", choices=("float32", "bfloat16", "float16"))
    tree_kind: str = option("auto", "draft tree: dynamic (EAGLE-2), chain, static (EAGLE-1), or auto by device",
                            choices=("auto", "dynamic", "chain", "static"))
    tree_depth: int = option(0, "draft levels below the root (0: the default for the device and head)")
    tree_top_k: int = option(0, "candidates kept per level (0: the default for the device and head)")
    tree_total_tokens: int = option(0, "draft nodes per tree after reranking (0: the default for the device and head)")
    max_sessions: int = option(64, "sessions drafted at once; beyond: RESOURCE_EXHAUSTED")
    max_tokens: int = option(262144, "head KV tokens reserved across sessions (prompt + max_new_tokens each)")
    prefill_timeout_s: float = option(120.0, "deadline of one Prefill call to a verifier")
    round_timeout_s: float = option(30.0, "a verifier answering no round within this long counts as lost")
    request_timeout_s: float = option(3600.0, "deadline of a whole generation (the Verify stream)")
    verifier_cooldown_s: float = option(10.0, "after losing a verifier, leave it out of new sessions this long")
    workers: int = option(64, "server threads (each open stream holds one)")
    grace_s: float = option(20.0, "on SIGTERM, how long in-flight rounds may take to finish")

    def __post_init__(self) -> None:
        if not self.verifier:
            raise InputError("the draft service needs at least one verifier: --verifier ADDR[,ADDR...]")
        for name in ("max_sessions", "max_tokens", "workers"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("prefill_timeout_s", "round_timeout_s", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise InputError(f"--{name.replace('_', '-')} must be > 0")

    def tree(self, head: DraftHead | None = None) -> TreeConfig:
        """The tree shape: the default for the device and `head` (as in-process generation)
        with overrides."""
        from aerie.stack import default_tree

        base = default_tree(self.device, head)
        if self.tree_kind == "static":
            return TreeConfig.eagle1_static()
        if self.tree_kind == "chain":
            return TreeConfig.chain(self.tree_depth or base.depth)
        return TreeConfig(
            kind="dynamic", depth=self.tree_depth or base.depth, top_k=self.tree_top_k or base.top_k,
            total_tokens=self.tree_total_tokens or base.total_tokens,
        )
