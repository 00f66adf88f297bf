"""What one verify round costs on this machine: the target's forward time against tree size,
and the memory-bandwidth floor that a batch-1 forward cannot beat.

    aerie verify-cost --device cuda --shapes demo,llama-8b --out verify_cost.json

`llama-8b` is a Llama-3-8B-shaped model with random bf16 weights built in place on the
device (nothing is downloaded); its timings are the target side of an 8B deployment. Each
forward runs exactly as a verify round does: a tree of k nodes on top of a committed prefix,
on a static cache, replayed as a CUDA graph.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aerie.engine import Engine
from aerie.graphs import bucket_for
from aerie.sampling import SamplingParams
from aerie.target import FeatureSpec, StaticKV, Target, eagle3_default_layers, truncate_cache
from aerie.tree import TreeConfig
from aerie.verifier import StopCriteria

TREE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def llama_8b_config() -> LlamaConfig:
    """Llama-3-8B's shape (a new config each call: the model build sets fields on it)."""
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False,
    )


def smollm2_135m_config() -> LlamaConfig:
    """The demo target's shape (SmolLM2-135M), for timing it with nothing downloaded."""
    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
        tie_word_embeddings=True,
    )


def llama_70b_config() -> LlamaConfig:
    """Llama-3-70B's shape."""
    return LlamaConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False,
    )


@dataclass
class CostPoint:
    tree_size: int
    ms_median: float  # the whole verify call: host work, graph replay, read-back
    ms_p10: float
    ms_p90: float
    device_ms: float | None = None  # the graph replay alone, timed on the device (CUDA only)


def copy_bandwidth(device: torch.device, gib: float = 2.0, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (each copy reads and writes every byte)."""
    n = int(gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    return 2 * n * repeats / (time.perf_counter() - t0)


def random_tree(k: int, generator: torch.Generator) -> torch.Tensor:
    """Parents of a random k-node tree under a root (k + 1 nodes, topological order)."""
    parents = [-1]
    for i in range(1, k + 1):
        parents.append(int(torch.randint(0, i, (1,), generator=generator)))
    return torch.tensor(parents)


def verify_cost_curve(
    target: Target, sizes: tuple[int, ...] = TREE_SIZES, prefix: int = 512, repeats: int = 30, replay: bool = True,
) -> list[CostPoint]:
    """Time a verify forward of a k-token tree (the root and k - 1 drafted nodes; k = 1 is
    plain decoding's step) after `prefix` committed tokens, with the host work and the
    result's read-back that a round includes. `replay`: also time the captured graph alone
    (not for a sharded target, whose graphs hold all-reduces that every rank must join)."""
    gen = torch.Generator().manual_seed(0)
    vocab = target.vocab_size
    cache = target.new_cache()
    target.forward(cache, torch.randint(0, vocab, (prefix,), generator=gen))
    points = []
    for k in sizes:
        parents = None if k == 1 else random_tree(k - 1, gen)
        tokens = torch.randint(0, vocab, (k,), generator=gen)
        times = []
        for i in range(repeats + 3):
            _sync(target.device)
            t0 = time.perf_counter()
            out = target.forward(cache, tokens, tree_parents=parents)
            out.logits.argmax(-1).cpu()  # the accept step's read-back: the round's one sync
            elapsed = time.perf_counter() - t0
            target.compact(cache, prefix, [])  # drop the tree again (on every rank of a sharded target)
            if i >= 3:  # the first runs capture the graph
                times.append(elapsed * 1e3)
        times.sort()
        device_ms = replay_ms(cache, ("target", bucket_for(k, target.static.largest_graph))) if replay else None
        points.append(CostPoint(k, statistics.median(times), times[len(times) // 10], times[(9 * len(times)) // 10],
                                device_ms))
    target.release_cache(cache)
    return points


def plain_decode_ms(target: Target, prefix: int = 512, tokens: int = 128) -> float:
    """Our plain decoding's time per token after `prefix` tokens (`aerie.engine.Engine`,
    vanilla: on a static cache, one step ahead of the host), from a generation of `tokens`
    after an untimed one that captures its graphs."""
    prefix = min(prefix, target.max_positions - tokens)  # a small model's context
    prompt = torch.randint(0, target.vocab_size, (prefix,), generator=torch.Generator().manual_seed(2)).tolist()
    engine = Engine(target, None, TreeConfig())
    run = lambda: engine.generate(prompt, SamplingParams(), StopCriteria(tokens), "vanilla")  # noqa: E731
    run()
    result = run()
    return 1e3 * (result.seconds - result.prefill_s) / (result.new_tokens - 1)


def replay_ms(cache, key, repeats: int = 50) -> float | None:
    """Device time of one replay of the graph captured under `key`, without the host work
    around it: what the forward itself costs the GPU."""
    entry = getattr(cache, "graphs", None) and cache.graphs.graphs.get(key)
    return graph_replay_ms(entry[0], repeats) if entry else None


def graph_replay_ms(graph: torch.cuda.CUDAGraph, repeats: int = 50) -> float:
    """Device ms of one replay of `graph` (after one untimed replay), from CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


# Kernel names by what they compute, for the breakdown of one forward.
_KERNEL_KINDS = (("matmul", ("gemm", "gemv", "cutlass", "xmma", "cublas", "splitk", "nvjet")),
                 ("attention", ("flash", "fmha", "attention", "efficient")))


def kernel_breakdown(target: Target, k: int, prefix: int = 512) -> dict | None:
    """Kernels in one k-token verify forward, and their device time by kind (matmul,
    attention, everything else), from the torch profiler over a few graph replays."""
    if target.device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(1)
    cache = target.new_cache()
    target.forward(cache, torch.randint(0, target.vocab_size, (prefix,), generator=gen))
    tokens = torch.randint(0, target.vocab_size, (k,), generator=gen)
    parents = None if k == 1 else random_tree(k - 1, gen)
    for _ in range(3):  # capture outside the profile
        target.forward(cache, tokens, tree_parents=parents)
        truncate_cache(cache, prefix)
    graph = cache.graphs.graphs[("target", bucket_for(k, target.static.largest_graph))][0]
    replays = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    target.release_cache(cache)
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    count = 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        count += 1
        name = e.name.lower()
        kind = next((kind for kind, keys in _KERNEL_KINDS if any(key in name for key in keys)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + e.device_time_total / 1e3 / replays
        by_name[e.name[:100]] = by_name.get(e.name[:100], 0.0) + e.device_time_total / 1e3 / replays
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {"tree_size": k, "kernels": count / replays, "ms_by_kind": by_kind,
            "top_kernels_ms": dict(top)}


# The random-weight shapes, by name.
SHAPES = {"smollm2-135m": smollm2_135m_config, "llama-8b": llama_8b_config, "llama-70b": llama_70b_config}


def llama_8b_shaped(device: torch.device, dtype: torch.dtype = torch.bfloat16,
                    config: LlamaConfig | None = None) -> LlamaForCausalLM:
    """A Llama-3-8B-shaped causal LM (or of `config`) with random weights, built directly on
    `device`."""
    config = config or llama_8b_config()
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure_shape(name: str, model, device: torch.device, bandwidth: float, graphs: bool = True) -> dict:
    layers = model.config.num_hidden_layers
    target = Target(model, FeatureSpec("eagle3", eagle3_default_layers(layers)), static=StaticKV(cuda_graphs=graphs))
    curve = verify_cost_curve(target)
    kernels = [b for b in (kernel_breakdown(target, 1), kernel_breakdown(target, 64)) if b]
    plain_ms = plain_decode_ms(target)
    # The same forwards with transformers' own kernels, with the norms alone fused, with the
    # norms and the rotary embedding fused but the layers not compiled; and compiled with the
    # KV heads repeated for each query head, with the projections separate, or with SDPA for
    # every attention: what each step saves (aerie.fused, aerie.projections, aerie.split_kv).
    uncompiled = StaticKV(cuda_graphs=graphs, compiled_forward="never", grouped_attention=False,
                          stacked_projections=False)
    variants = {
        "reference": replace(uncompiled, fused_norms=False, compiled_rotary=False),
        "fused_norms_only": replace(uncompiled, compiled_rotary=False),
        "fused_uncompiled": uncompiled,
        "repeated_kv_heads": StaticKV(cuda_graphs=graphs, grouped_attention=False),
        "separate_projections": StaticKV(cuda_graphs=graphs, stacked_projections=False),
        "sdpa_attention": StaticKV(cuda_graphs=graphs, split_kv_attention=False),
    }
    unfused = {}
    for label, static in variants.items():
        # Every variant compiles the same decoder-layer function again: past dynamo's limit
        # of recompiles for one function, the later variants would be timed uncompiled.
        torch._dynamo.reset()
        other = Target(model, target.features, static=static)
        unfused[label] = {
            "curve": [vars(p) for p in verify_cost_curve(other, sizes=(1, 64))],
            "kernels": [b for b in (kernel_breakdown(other, 1),) if b],
        }
    floor_ms = 1e3 * weight_bytes(model) / bandwidth
    one = curve[0].ms_median
    return {
        "shape": name,
        "weights_gb": weight_bytes(model) / 1e9,
        "bandwidth_floor_ms": floor_ms,
        "one_token_ms": one,
        "one_token_vs_floor": floor_ms / one,
        "one_token_device_vs_floor": floor_ms / curve[0].device_ms if curve[0].device_ms else None,
        "plain_decode_ms": plain_ms,  # a token of plain decoding, host included
        "plain_decode_vs_floor": floor_ms / plain_ms,
        "curve": [vars(p) for p in curve],
        "kernels": kernels,
        **unfused,
    }


def _sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_verify_cost(shapes: list[str], device: str, dtype: torch.dtype, graphs: bool) -> dict:
    from aerie.bench.harness import machine_info
    from aerie.models import load_causal_lm, resolve_model

    dev = torch.device(device)
    bandwidth = copy_bandwidth(dev) if dev.type == "cuda" else float("nan")
    results = []
    for name in shapes:
        if name == "demo":
            model, _ = load_causal_lm(resolve_model(None), device, dtype)
        elif name in SHAPES:
            model = llama_8b_shaped(dev, dtype, SHAPES[name]())
        else:
            raise ValueError(f"unknown shape {name!r}: use demo, {' or '.join(SHAPES)}")
        results.append(measure_shape(name, model, dev, bandwidth, graphs))
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {"machine": machine_info(device), "copy_bandwidth_gbs": bandwidth / 1e9, "graphs": graphs,
            "dtype": str(dtype).removeprefix("torch."), "shapes": results}


def format_verify_cost(result: dict) -> str:
    sizes = [p["tree_size"] for p in result["shapes"][0]["curve"]]
    lines = ["| shape | " + " | ".join(f"k={k}" for k in sizes) + " | floor (ms) | 1 token vs floor |",
             "|---|" + "---|" * len(sizes) + "---|---|"]
    for s in result["shapes"]:
        cells = " | ".join(f"{p['ms_median']:.2f}" for p in s["curve"])
        share = "-" if s["one_token_vs_floor"] is None else f"{100 * s['one_token_vs_floor']:.0f}%"
        name = s["shape"] + (f" (TP {s['tensor_parallel']})" if s.get("tensor_parallel", 1) > 1 else "")
        lines.append(f"| {name} | {cells} | {s['bandwidth_floor_ms']:.2f} | {share} |")
        if s["curve"][0].get("device_ms") is not None:
            cells = " | ".join(f"{p['device_ms']:.2f}" for p in s["curve"])
            share = 100 * s["one_token_device_vs_floor"]
            lines.append(f"| {s['shape']} (graph replay only) | {cells} | {s['bandwidth_floor_ms']:.2f} | {share:.0f}% |")
        if s.get("plain_decode_ms") is not None:
            share = 100 * s["plain_decode_vs_floor"]
            lines.append(f"| {s['shape']} (plain decoding, per token) | {s['plain_decode_ms']:.2f} |"
                         + " |" * (len(sizes) - 1) + f" {s['bandwidth_floor_ms']:.2f} | {share:.0f}% |")
        for label, what in (("reference", "transformers' kernels"), ("fused_norms_only", "fused norms only"),
                            ("fused_uncompiled", "fused norms and rotary, not compiled"),
                            ("repeated_kv_heads", "compiled, KV heads repeated for each query head"),
                            ("separate_projections", "compiled, q/k/v and gate/up projections separate"),
                            ("sdpa_attention", "compiled, SDPA for every attention, no split-KV")):
            other = {p["tree_size"]: p for p in s.get(label, {}).get("curve", [])}
            if other:
                cells = " | ".join(f"{other[k]['ms_median']:.2f}" if k in other else "" for k in sizes)
                lines.append(f"| {s['shape']} ({what}) | {cells} | | |")
    return "\n".join(lines)
