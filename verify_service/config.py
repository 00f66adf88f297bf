"""Configuration of the verify service (flags mirrored by AERIE_* environment variables)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aerie.errors import InputError
from aerie.target import StaticKV
from aerie_rpc.config import option
from aerie_rpc.tls import TlsServerOptions


@dataclass
class VerifyConfig(TlsServerOptions):
    listen: str = option("127.0.0.1:50061", "address to serve on, HOST:PORT (port 0 picks a free one)")
    model: str | None = option(None, "Hugging Face model directory or .gguf file (default: the demo model)")
    device: str = option("cpu", "where the target runs", choices=("cpu", "cuda"))
    dtype: str = option("float32", "weights and activations", choices=("float32", "bfloat16", "float16"))
    tensor_parallel: int = option(
        1, "shard the target over this many processes, one per GPU (gloo on --device cpu); "
        "spawned here, or one rank per process under torchrun"
    )
    max_sessions: int = option(64, "sessions (KV caches) held at once; beyond: RESOURCE_EXHAUSTED")
    max_tokens: int = option(262144, "KV tokens reserved across sessions (prompt + max_new_tokens + tree each)")
    max_prompt_tokens: int = option(16384, "longest prompt (plus resumed tokens) one session may bring")
    max_tree_nodes: int = option(128, "largest draft tree accepted, root included")
    session_ttl_s: float = option(300.0, "drop a session idle for this long (its drafter is gone)")
    batch_sessions: int = option(
        0, "verify the rounds of up to this many concurrent sessions in one target forward (rows of one "
        "batched KV cache, which also caps the sessions held); 0: one forward per session and round"
    )
    batch_window_ms: float = option(
        2.0, "with --batch-sessions: how long a round waits for other sessions' rounds to join its forward "
        "(it starts sooner once every generating session has one pending)"
    )
    cuda_graphs: bool = option(
        True, "on cuda: static KV caches, with every forward of up to 128 tokens replayed as a captured CUDA graph "
        "(with --tensor-parallel the all-reduces are captured too); --no-cuda-graphs: static caches, eager forwards"
    )
    compiled_forward: bool = option(
        True, "on cuda with static caches and one process: run the target's decoder layers compiled (torch.compile, "
        "one layer's graph for all; compiled before the service answers); --no-compiled-forward: the eager kernels"
    )
    workers: int = option(64, "server threads (each open stream holds one)")
    grace_s: float = option(20.0, "on SIGTERM, how long in-flight rounds may take to finish")

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "max_sessions", "max_tokens", "max_prompt_tokens", "workers"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_tree_nodes < 2:
            raise InputError("--max-tree-nodes must be >= 2 (the root and one draft node)")
        if self.session_ttl_s <= 0 or self.grace_s < 0:
            raise InputError("--session-ttl-s must be > 0 and --grace-s >= 0")
        if self.batch_sessions < 0 or self.batch_window_ms < 0:
            raise InputError("--batch-sessions and --batch-window-ms must be >= 0 (--batch-sessions 0: no batching)")

    def static_kv(self, device: torch.device) -> StaticKV | None:
        """How targets on `device` run: static caches on CUDA (graphed unless --no-cuda-graphs,
        compiled unless --no-compiled-forward or sharded), dynamic caches on the CPU."""
        if torch.device(device).type != "cuda":
            return None
        # A sharded forward holds collectives, which the compiled forward was never tried with.
        compiled = self.compiled_forward and self.tensor_parallel == 1
        return StaticKV(cuda_graphs=self.cuda_graphs, compiled_forward="cuda" if compiled else "never")

    @property
    def session_limit(self) -> tuple[int, str]:
        """Sessions held at once, and the flag that sets it (a batch holds one per row)."""
        if self.batch_sessions and self.batch_sessions <= self.max_sessions:
            return self.batch_sessions, "--batch-sessions"
        return self.max_sessions, "--max-sessions"
