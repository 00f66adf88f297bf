"""The verify cost of a target sharded over N GPUs: a Llama-3-70B (or 8B) shape with random
bf16 weights, built directly as each rank's shard on its own GPU (nothing is downloaded, and
no GPU ever holds more than its shard), measured as the tensor-parallel verify service runs it.

    aerie verify-cost --shapes llama-70b --tensor-parallel 2 --out verify_cost_70b.json

Rank 0 (this process) drives `verify_cost_curve` through a `TensorParallelTarget`; ranks
1..N-1 are spawned here and mirror every forward, as in `aerie serve verify --tensor-parallel`.
The floor is the largest shard's weights (rank 0's, which keeps the LM head) read once at the
copy bandwidth measured on rank 0's GPU: the ranks read their shards at the same time.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from aerie.bench.verify_cost import TREE_SIZES, copy_bandwidth, verify_cost_curve, weight_bytes
from aerie.parallel.launch import ParallelGroup, join_group, spawn_workers, stop_workers
from aerie.parallel.load import empty_shard
from aerie.parallel.mirror import MirrorGroup, TensorParallelTarget, serve_mirror
from aerie.parallel.shard import plan_shards
from aerie.target import FeatureSpec, StaticKV, Target, eagle3_default_layers

HOST = "127.0.0.1"


def build_sharded_random(config: LlamaConfig, group: ParallelGroup, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """This rank's shard of a random-weight Llama of `config`, allocated on its device only
    (`empty_shard`) and filled: norms 1, matrices N(0, 0.02)."""
    model, _ = empty_shard(config, group, dtype)
    generator = torch.Generator(device=group.device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def _static(device: torch.device, graphs: bool) -> StaticKV:
    return StaticKV(cuda_graphs=graphs and device.type == "cuda")


def _worker(rank: int, config: dict, world: int, device: str, dtype: torch.dtype, graphs: bool, port: int) -> None:
    """A spawned rank > 0: build its shard, then mirror rank 0's forwards until SHUTDOWN."""
    store = dist.TCPStore(HOST, port, world, is_master=False)
    group = join_group(rank, world, device, rank, store)
    try:
        model = build_sharded_random(LlamaConfig(**config), group, dtype)
        serve_mirror(Target(model, FeatureSpec("eagle1"), static=_static(group.device, graphs)), group.channel())
    finally:
        group.leave()


def run_sharded_verify_cost(
    name: str, config: LlamaConfig, world: int, device: str, dtype: torch.dtype, graphs: bool = True,
    sizes: tuple[int, ...] = TREE_SIZES, prefix: int = 512, repeats: int = 30,
) -> dict:
    """The verify cost curve of `config` sharded over `world` ranks (one per GPU on CUDA, gloo
    processes on the CPU), in the shape `measure_shape` reports."""
    plan_shards(config, 0, world)  # refuse a world that does not divide the heads, before spawning
    if device == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"--tensor-parallel {world} needs {world} GPUs, torch sees {torch.cuda.device_count()}")
    store = dist.TCPStore(HOST, 0, world, is_master=True, wait_for_workers=False)
    procs = spawn_workers(world, _worker, (config.to_dict(), world, device, dtype, graphs, store.port))
    group = join_group(0, world, device, 0, store)
    mirror = MirrorGroup(group.channel())
    try:
        model = build_sharded_random(config, group, dtype)
        spec = FeatureSpec("eagle3", eagle3_default_layers(config.num_hidden_layers))
        target = TensorParallelTarget(Target(model, spec, static=_static(group.device, graphs)), mirror)
        curve = verify_cost_curve(target, sizes, prefix, repeats, replay=False)
        shard_bytes = weight_bytes(model)
    finally:
        mirror.shutdown()
        stop_workers(procs)
        group.leave()
    bandwidth = copy_bandwidth(torch.device(device)) if device == "cuda" else float("nan")
    floor_ms = 1e3 * shard_bytes / bandwidth
    one = curve[0].ms_median
    return {
        "shape": name,
        "tensor_parallel": world,
        "graphs": graphs and device == "cuda",
        "weights_gb": shard_bytes / 1e9,  # rank 0's shard, the largest
        "copy_bandwidth_gbs": bandwidth / 1e9,
        "bandwidth_floor_ms": floor_ms,
        "one_token_ms": one,
        "one_token_vs_floor": floor_ms / one if not math.isnan(floor_ms) else None,
        "one_token_device_vs_floor": None,
        "curve": [vars(p) for p in curve],
        "kernels": [],
    }
