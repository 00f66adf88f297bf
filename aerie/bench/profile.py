"""Where a round's time goes: one generation per mode under the torch profiler.

    aerie profile --prompts mt_bench_questions.jsonl --device cuda --out DIR

For each mode it writes DIR/trace_<mode>.json.gz (open in Perfetto or chrome://tracing) and
puts into DIR/profile.json, per round: GPU kernels launched (inside CUDA graphs included),
graph replays, host-device waits, and the host and device time of the draft and verify
phases, with the top kernels by device time and by calls. The generation runs once before it is
profiled, so that graph capture and allocation are not in the trace.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from aerie.engine import Engine
from aerie.sampling import SamplingParams
from aerie.stack import Stack
from aerie.verifier import StopCriteria

# The engine's named spans: a split round drafts then verifies, a device round is one.
PHASES = ("draft", "verify", "round")
# Host calls that make the host wait for the device.
_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ")


def profile_modes(stack: Stack, prompt_ids: list[int], modes: list[str], max_new_tokens: int, out: Path) -> dict:
    engine = Engine(stack.target, stack.head, stack.tree)
    stop = StopCriteria(max_new_tokens, stack.stop_token_ids())
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"max_new_tokens": max_new_tokens, "tree": vars(stack.tree), "modes": {}}
    for mode in modes:
        engine.generate(prompt_ids, SamplingParams(), stop, mode)  # capture graphs outside the trace
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            result = engine.generate(prompt_ids, SamplingParams(), stop, mode)
        trace = out / f"trace_{mode}.json"
        prof.export_chrome_trace(str(trace))
        with trace.open("rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
        summary["modes"][mode] = _summarise(prof, result)
    (out / "profile.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _summarise(prof, result) -> dict:
    rounds = max(1, len(result.rounds))
    events = prof.events()
    # Device-side events, less the GPU projections of our own named spans (not kernels).
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("aerie.")]
    by_kernel: dict[str, list[float]] = {}
    for e in kernels:
        by_kernel.setdefault(e.name, []).append(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time)
    top = sorted(by_kernel.items(), key=lambda kv: -sum(kv[1]))[:15]
    # On a launch-bound target the many small kernels cost more than the few large ones.
    frequent = sorted(by_kernel.items(), key=lambda kv: -len(kv[1]))[:30]
    phases = {}
    for name in PHASES:
        host = [e for e in events if e.name == f"aerie.{name}" and e.device_type == torch.autograd.DeviceType.CPU]
        if host:
            phases.setdefault(name, {})["host_ms_per_round"] = sum(e.cpu_time_total for e in host) / 1e3 / rounds
        # The span's projection on the GPU: from its first kernel's start to its last one's end.
        device = [e for e in events if e.name == f"aerie.{name}" and e.device_type == torch.autograd.DeviceType.CUDA]
        if device:
            phases.setdefault(name, {})["device_span_ms_per_round"] = sum(e.device_time_total for e in device) / 1e3 / rounds
    return {
        "rounds": len(result.rounds),
        "new_tokens": result.new_tokens,
        "tau": result.tau,
        "tokens_per_s": result.tokens_per_s,
        "ms_per_round": 1e3 * result.seconds / rounds,
        "kernels_per_round": len(kernels) / rounds,
        "graph_replays_per_round": sum(e.name == "cudaGraphLaunch" for e in events) / rounds,
        "host_waits_per_round": sum(e.name.startswith(_WAITS) for e in events) / rounds,
        "device_ms_per_round": sum(sum(v) for v in by_kernel.values()) / 1e3 / rounds,
        "phases": phases,
        "top_kernels": [
            {"name": name[:120], "calls_per_round": len(v) / rounds, "ms_per_round": sum(v) / 1e3 / rounds}
            for name, v in top
        ],
        "frequent_kernels": [
            {"name": name[:120], "calls_per_round": len(v) / rounds, "ms_per_round": sum(v) / 1e3 / rounds}
            for name, v in frequent
        ],
    }


def format_profile(summary: dict) -> str:
    lines = ["| mode | ms/round | tau | kernels/round | graph replays | host waits | device ms/round "
             "| host ms draft / verify / round | GPU span ms draft / verify / round |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, s in summary["modes"].items():
        ph = s["phases"]
        host = " / ".join(f"{ph[p]['host_ms_per_round']:.2f}" if "host_ms_per_round" in ph.get(p, {}) else "-"
                          for p in PHASES)
        gpu = " / ".join(f"{ph[p]['device_span_ms_per_round']:.2f}" if "device_span_ms_per_round" in ph.get(p, {})
                         else "-" for p in PHASES)
        lines.append(f"| {mode} | {s['ms_per_round']:.2f} | {s['tau']:.2f} | {s['kernels_per_round']:.0f} | "
                     f"{s['graph_replays_per_round']:.1f} | {s['host_waits_per_round']:.1f} | "
                     f"{s['device_ms_per_round']:.2f} | {host} | {gpu} |")
    return "\n".join(lines)
