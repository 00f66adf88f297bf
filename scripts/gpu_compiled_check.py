"""The compiled forward against the eager one, and device rounds against split ones, on a
GPU with nothing downloaded.

A SmolLM2-shaped target with random weights and a random EAGLE-3 head (so tau is about 1:
this times the forwards and the rounds, not the head), float32 and bfloat16, each with
`--compiled-forward never` and `cuda` in one process: tokens/s of eagle (greedy rounds whole
on the device, aerie.device_round), eagle-split (drafter and verifier apart, as the services
run) and vanilla, draft and verify ms per round, graphs captured and compiled inside the timed
runs (0 when warm), the warm-up seconds (where the compiling happens), whether each compiled
function fell back to eager, and whether the tokens agree.

    PYTHONPATH=. python3 scripts/gpu_compiled_check.py OUT.json
    DTYPES=bfloat16 FORWARDS=cuda PYTHONPATH=. python3 scripts/gpu_compiled_check.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from aerie.bench.verify_cost import llama_8b_shaped, smollm2_135m_config
from aerie.bench.harness import compiled_graph_count
from aerie.engine import Engine
from aerie.graphs import GraphCache
from aerie.heads import new_head
from aerie.sampling import SamplingParams
from aerie.target import FeatureSpec, StaticKV, Target, eagle3_default_layers
from aerie.tree import TreeConfig
from aerie.verifier import StopCriteria

PROMPT = list(range(100, 160))
TREE = TreeConfig("dynamic", 4, 8, 15)
MODES = ("eagle", "eagle-split", "vanilla")


def measure(model, compiled_forward: str, dtype: torch.dtype) -> dict:
    config = model.config
    target = Target(model, FeatureSpec("eagle3", eagle3_default_layers(config.num_hidden_layers)),
                    StaticKV(compiled_forward=compiled_forward))
    torch.manual_seed(0)
    head = new_head(target, "eagle3", 8192).to("cuda", dtype).eval()
    engines = {"eagle": (Engine(target, head, TREE), "eagle"),
               "eagle-split": (Engine(target, head, TREE, device_rounds=False), "eagle"),
               "vanilla": (Engine(target, None, TREE), "vanilla")}
    t0 = time.perf_counter()
    engines["eagle"][0].precompile()
    precompile_s = time.perf_counter() - t0
    print(dtype, compiled_forward, f"precompiled in {precompile_s:.1f} s", flush=True)
    for engine, mode in engines.values():
        engine.generate(PROMPT, SamplingParams(), StopCriteria(32), mode)
    result = {"precompile_s": precompile_s, "warm_s": time.perf_counter() - t0}
    for name, (engine, mode) in engines.items():
        captures, compiles = GraphCache.total_captures, compiled_graph_count()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run = engine.generate(PROMPT, SamplingParams(), StopCriteria(128), mode)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rounds = max(1, len(run.rounds))
        result[name] = {"tok_s": len(run.token_ids) / seconds, "tokens": run.token_ids, "tau": run.tau,
                        "draft_ms": 1e3 * sum(r.draft_s for r in run.rounds) / rounds,
                        "verify_ms": 1e3 * sum(r.verify_s for r in run.rounds) / rounds,
                        "graph_captures": GraphCache.total_captures - captures,
                        "compiles": compiled_graph_count() - compiles}
    result["compiled_eager_fallback"] = [getattr(target.compiled, "eager", None), getattr(head.compiled, "eager", None)]
    return result


def main(out: str) -> None:
    results = {}
    forwards = os.environ.get("FORWARDS", "never,cuda").split(",")
    for dtype in (getattr(torch, d) for d in os.environ.get("DTYPES", "float32,bfloat16").split(",")):
        model = llama_8b_shaped(torch.device("cuda"), dtype, smollm2_135m_config())
        per_mode = {}
        results[str(dtype)] = per_mode
        for forward in forwards:
            r = per_mode[forward] = measure(model, forward, dtype)
            with open(out, "w") as f:  # after each measurement: a run cut short keeps what it has
                json.dump(results, f)
            print(dtype, forward, f"warm-up {r['warm_s']:.1f} s",
                  {m: f"{r[m]['tok_s']:.1f} tok/s, draft {r[m]['draft_ms']:.2f} ms, verify {r[m]['verify_ms']:.2f} ms, "
                      f"captures {r[m]['graph_captures']}, compiles {r[m]['compiles']}" for m in MODES}, flush=True)
            print(dtype, forward, "eagle == eagle-split == vanilla tokens:",
                  r["eagle"]["tokens"] == r["eagle-split"]["tokens"] == r["vanilla"]["tokens"], flush=True)
        if len(forwards) > 1:
            for m in MODES:
                print(dtype, m, "compiled == uncompiled tokens:",
                      per_mode[forwards[0]][m]["tokens"] == per_mode[forwards[1]][m]["tokens"])
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "compiled_check.json")
