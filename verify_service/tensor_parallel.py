"""`aerie serve verify --tensor-parallel N`: the target sharded over N processes (one per GPU).

Rank 0 loads its shard, serves gRPC exactly as the single-process service does, and mirrors
every forward and compaction on ranks 1..N-1, which load their shards and run
`serve_mirror` until rank 0 sends SHUTDOWN (after its drain on SIGTERM).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch
import torch.distributed as dist

from aerie.errors import InputError, ModelError
from aerie.parallel.launch import (
    ParallelGroup,
    exit_when_orphaned,
    ignore_stop_signals,
    join_group,
    rendezvous_from_env,
    spawn_workers,
    stop_workers,
    watch_workers,
)
from aerie.parallel.mirror import MirrorGroup, TensorParallelTarget, serve_mirror
from aerie.parallel.shard import plan_shards
from aerie.target import FeatureSpec, Target
from verify_service.config import VerifyConfig

log = logging.getLogger("aerie.verify")
SPAWN_HOST = "127.0.0.1"


def run(config: VerifyConfig) -> int:
    """Run this process's part: all of it (spawning the workers) or, under torchrun, one rank."""
    world = config.tensor_parallel
    if config.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA device")
    rdzv = rendezvous_from_env(os.environ, world)
    # Every rank would fail alike on a model that cannot be split N ways: say so once, first.
    check_shardable(config)
    if rdzv is not None:
        if rdzv.rank > 0:
            ignore_stop_signals()
            return _serve_worker(config, join_group(rdzv.rank, world, config.device, rdzv.local_rank))
        return _serve_rank0(config, join_group(0, world, config.device, rdzv.local_rank))
    if config.device == "cuda" and torch.cuda.device_count() < world:
        raise InputError(f"--tensor-parallel {world} needs {world} GPUs, torch sees {torch.cuda.device_count()}")
    # Rank 0 hosts the rendezvous store; port 0 lets the OS pick a free one, with no race.
    store = dist.TCPStore(SPAWN_HOST, 0, world, is_master=True, wait_for_workers=False)
    procs = spawn_workers(world, _spawned_worker, (config, SPAWN_HOST, store.port))
    stopping = threading.Event()
    watch_workers(procs, stopping)
    try:
        return _serve_rank0(config, join_group(0, world, config.device, 0, store), stopping)
    finally:
        stopping.set()
        codes = stop_workers(procs)
        log.info("tensor-parallel workers stopped (exit codes %s)", codes)


def check_shardable(config: VerifyConfig) -> None:
    from transformers import AutoConfig

    from aerie.models import resolve_model

    plan_shards(AutoConfig.from_pretrained(resolve_model(config.model)), 0, config.tensor_parallel)


def _spawned_worker(rank: int, config: VerifyConfig, host: str, port: int) -> None:
    """Entry point of a spawned rank > 0 (a fresh interpreter)."""
    import sys

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(name)s [rank {rank}] %(message)s")
    ignore_stop_signals()
    exit_when_orphaned()
    store = dist.TCPStore(host, port, config.tensor_parallel, is_master=False)
    sys.exit(_serve_worker(config, join_group(rank, config.tensor_parallel, config.device, rank, store)))


def load_shard(config: VerifyConfig, group: ParallelGroup):
    """This rank's shard of the target, and (for rank 0's end-of-sequence ids) the tokenizer."""
    from aerie.models import parse_dtype, resolve_model
    from aerie.parallel.load import load_shard as load_shard_weights
    from aerie_rpc.models import load_tokenizer

    # Each rank reads only its slices of the checkpoint: no GPU, and no host, ever holds
    # more than one rank's shard per rank.
    path = resolve_model(config.model)
    model, plan = load_shard_weights(path, group, parse_dtype(config.dtype))
    try:
        tokenizer, _ = load_tokenizer(str(path))
    except ModelError:
        tokenizer = None  # token ids only; the end-of-sequence ids come from the generation config
    log.info("rank %d of %d holds %d of %d query heads, %d of %d key/value heads", group.rank, group.world,
             plan.heads, model.config.num_attention_heads, plan.kv_heads, model.config.num_key_value_heads)
    return model, tokenizer, path


def _serve_worker(config: VerifyConfig, group: ParallelGroup) -> int:
    try:
        model, _, _ = load_shard(config, group)
        serve_mirror(Target(model, FeatureSpec("eagle1"), static=config.static_kv(group.device)), group.channel())
        log.info("rank %d: shutdown received", group.rank)
    finally:
        group.leave()
    return 0


def _serve_rank0(config: VerifyConfig, group: ParallelGroup, stopping: threading.Event | None = None) -> int:
    from aerie.models import eos_token_ids
    from aerie_rpc.server import ServiceHost
    from aerie_rpc.telemetry import setup_tracing
    from verify_service.service import SERVICE_NAME, VerifierServicer, verifier_pb2_grpc

    broken = threading.Event()

    def on_broken(message: str) -> None:
        # Every later round would fail: drain as on SIGTERM, and exit non-zero for a restart.
        log.error("%s", message)
        broken.set()
        os.kill(os.getpid(), signal.SIGTERM)

    mirror = MirrorGroup(group.channel(), on_broken)
    try:
        model, tokenizer, path = load_shard(config, group)
        eos = eos_token_ids(tokenizer, getattr(model, "generation_config", None))
        servicer = VerifierServicer(model, config, eos, model_name=config.model or path.name,
                                    make_target=lambda spec: TensorParallelTarget(
                                        Target(model, spec, static=config.static_kv(group.device)), mirror))
        provider = setup_tracing("aerie-verify")
        host = ServiceHost(config.listen, lambda s: verifier_pb2_grpc.add_VerifierServicer_to_server(servicer, s),
                           [SERVICE_NAME], workers=config.workers, on_drain=servicer.drain)
        host.serve_until_signalled(config.grace_s)
        if provider is not None:
            provider.shutdown()
    finally:
        if stopping is not None:
            stopping.set()
        try:
            mirror.shutdown()
        except Exception as e:  # noqa: BLE001 - a dead worker cannot be told; it is already gone
            log.warning("could not tell the tensor-parallel workers to stop: %s", e)
        group.leave()
    return 1 if broken.is_set() else 0
