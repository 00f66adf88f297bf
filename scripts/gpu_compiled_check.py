"""The compiled forward against the eager one on a GPU, with nothing downloaded.

A SmolLM2-shaped target with random weights and a random EAGLE-3 head (so tau is 1: this
times the forwards, not the head), float32 and bfloat16, each with `--compiled-forward never`
and `cuda` in one process: tokens/s of eagle and vanilla, draft and verify ms per round, the
warm-up seconds (where the compiling happens), whether each compiled function fell back to
eager, and whether the tokens agree.

    PYTHONPATH=. python3 scripts/gpu_compiled_check.py OUT.json
"""

from __future__ import annotations

import json
import sys
import time

import torch

from aerie.bench.verify_cost import llama_8b_shaped, smollm2_135m_config
from aerie.engine import Engine
from aerie.heads import new_head
from aerie.sampling import SamplingParams
from aerie.target import FeatureSpec, StaticKV, Target, eagle3_default_layers
from aerie.tree import TreeConfig
from aerie.verifier import StopCriteria

PROMPT = list(range(100, 160))
TREE = TreeConfig("dynamic", 4, 8, 15)


def measure(model, compiled_forward: str, dtype: torch.dtype) -> dict:
    config = model.config
    target = Target(model, FeatureSpec("eagle3", eagle3_default_layers(config.num_hidden_layers)),
                    StaticKV(compiled_forward=compiled_forward))
    torch.manual_seed(0)
    head = new_head(target, "eagle3", 8192).to("cuda", dtype).eval()
    engine = Engine(target, head, TREE)
    t0 = time.perf_counter()
    for mode in ("eagle", "vanilla"):
        engine.generate(PROMPT, SamplingParams(), StopCriteria(32), mode)
    result = {"warm_s": time.perf_counter() - t0}
    for mode in ("eagle", "vanilla"):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run = engine.generate(PROMPT, SamplingParams(), StopCriteria(128), mode)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rounds = max(1, len(run.rounds))
        result[mode] = {"tok_s": len(run.token_ids) / seconds, "tokens": run.token_ids, "tau": run.tau,
                        "draft_ms": 1e3 * sum(r.draft_s for r in run.rounds) / rounds,
                        "verify_ms": 1e3 * sum(r.verify_s for r in run.rounds) / rounds}
    result["compiled_eager_fallback"] = [getattr(target.compiled, "eager", None), getattr(head.compiled, "eager", None)]
    return result


def main(out: str) -> None:
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = llama_8b_shaped(torch.device("cuda"), dtype, smollm2_135m_config())
        per_mode = {mode: measure(model, mode, dtype) for mode in ("never", "cuda")}
        for mode, r in per_mode.items():
            print(dtype, mode, f"warm-up {r['warm_s']:.1f} s", {m: f"{r[m]['tok_s']:.1f} tok/s" for m in ("eagle", "vanilla")},
                  flush=True)
        for m in ("eagle", "vanilla"):
            print(dtype, m, "compiled == uncompiled tokens:", per_mode["never"][m]["tokens"] == per_mode["cuda"][m]["tokens"])
        results[str(dtype)] = per_mode
        del model
        torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "compiled_check.json")
