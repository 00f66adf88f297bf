"""Kernels of a round timed alone on a GPU, with nothing downloaded:

- a draft level's top-k: torch.topk, `aerie.tree.top_k_in_chunks` at several chunk widths
  (`TOP_K_CHUNK`) and the top-k kernels (`aerie.row_top_k`), for the rows a draft level scores
  (the root, or a frontier of top-k nodes) over an EAGLE-3 draft vocabulary and a full one;
  and the next frontier's choice, a stable sort against the kernels;
- attention over a static cache: SDPA against the split-KV kernels (`aerie.split_kv`), for
  SmolLM2's and Llama-3-8B's heads, one token to a 128-node tree after 512 committed tokens,
  with the largest difference between the two, and the split-KV kernels at other smallest
  slices and program counts.

Each case runs 50 times inside one CUDA graph, replayed 20 times: the figure is device time
per call, without launch overhead, as inside a captured round.

    PYTHONPATH=. python3 scripts/gpu_kernel_check.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

import torch

import aerie.split_kv
from aerie.bench.harness import machine_info
from aerie.bench.verify_cost import graph_replay_ms, random_tree
from aerie.fused import grouped_query_attention
from aerie.graphs import GraphCache
from aerie.kvcache import Attend, additive_mask
from aerie.row_top_k import row_top_k
from aerie.tree import ancestor_mask, top_k_in_chunks

CALLS, REPLAYS = 50, 20


def graphed_us(fn: Callable[[], object]) -> float:
    """Device microseconds per call of `fn`, replayed from a graph of CALLS calls (captured
    as the static path captures its forwards)."""
    graphs = GraphCache(enabled=True)
    graphs.run("calls", lambda: tuple(fn() for _ in range(CALLS)))
    graph, _ = graphs.graphs["calls"]
    return 1e3 * graph_replay_ms(graph, REPLAYS) / CALLS


def top_k_cases() -> list[dict]:
    rows = []
    for shape in ((1, 8192), (10, 8192), (1, 49152), (10, 49152)):
        scores = torch.randn(*shape, device="cuda")
        row = {"shape": list(shape), "k": 10, "torch_topk_us": graphed_us(lambda: torch.topk(scores, 10, dim=-1)),
               "row_top_k_us": graphed_us(lambda: row_top_k(scores, 10))}
        for chunk in (256, 512, 1024, 2048, 4096):
            row[f"chunk_{chunk}_us"] = graphed_us(lambda: top_k_in_chunks(scores, 10, chunk))
        rows.append(row)
        print(row, flush=True)
    # The next frontier: the best 10 of a level's 100 candidates, parents before children.
    scores = torch.randn(100, device="cuda")
    row = {"shape": [100], "k": 10,
           "stable_sort_us": graphed_us(lambda: torch.sort(scores, descending=True, stable=True).indices[:10]),
           "row_top_k_us": graphed_us(lambda: row_top_k(scores[None], 10))}
    rows.append(row)
    print(row, flush=True)
    return rows


# (name, query heads, KV heads, head dim)
HEADS = (("smollm2-135m", 9, 3, 64), ("llama-8b", 32, 8, 128))
PAST = 512


def attention_cases() -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, heads, kv_heads, d in HEADS:
        for capacity in (1024, 4096):
            key, value = (torch.randn(1, kv_heads, capacity, d, device="cuda", dtype=torch.bfloat16) for _ in "kv")
            for n in (1, 8, 64, 128):
                query = torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16)
                pattern = ancestor_mask(random_tree(n - 1, gen)) if n > 1 else torch.ones(1, 1, dtype=torch.bool)
                seen = Attend(PAST, pattern).padded(n, PAST, n, capacity, torch.device("cuda"))
                mask = additive_mask(seen, torch.bfloat16)
                sdpa = grouped_query_attention(query, key, value, mask, d**-0.5)
                split = grouped_query_attention(query, key, value, mask, d**-0.5, split_kv=True)
                row = {"shape": name, "capacity": capacity, "rows": n,
                       "max_abs_difference": (sdpa.float() - split.float()).abs().max().item(),
                       "sdpa_us": graphed_us(lambda: grouped_query_attention(query, key, value, mask, d**-0.5)),
                       "split_kv_us": graphed_us(
                           lambda: grouped_query_attention(query, key, value, mask, d**-0.5, split_kv=True))}
                if n in (1, 64) and capacity == 1024:
                    row["split_kv_us_by_setting"] = split_kv_settings(
                        lambda: grouped_query_attention(query, key, value, mask, d**-0.5, split_kv=True))
                rows.append(row)
                print(row, flush=True)
    return rows


def split_kv_settings(fn: Callable[[], object]) -> dict[str, float | str]:
    """`fn` timed at other smallest slices and programs per multiprocessor than the defaults
    (a setting that cannot run says why)."""
    defaults = aerie.split_kv.MIN_SLICE_KEYS, aerie.split_kv.PROGRAMS_PER_SM
    out: dict[str, float | str] = {}
    try:
        for keys in (64, 128, 256):
            for programs in (1, 2, 4):
                aerie.split_kv.MIN_SLICE_KEYS, aerie.split_kv.PROGRAMS_PER_SM = keys, programs
                try:
                    out[f"slice_{keys}_programs_{programs}"] = graphed_us(fn)
                except Exception as e:  # noqa: BLE001 - a setting the card cannot run is a result
                    out[f"slice_{keys}_programs_{programs}"] = f"{type(e).__name__}: {str(e)[:120]}"
    finally:
        aerie.split_kv.MIN_SLICE_KEYS, aerie.split_kv.PROGRAMS_PER_SM = defaults
    return out


def main(out: str) -> None:
    # KERNELS=top_k (or attention) times one kind alone.
    kinds = os.environ.get("KERNELS", "attention,top_k").split(",")
    result = {"machine": machine_info("cuda"), **({"attention": attention_cases()} if "attention" in kinds else {}),
              **({"top_k": top_k_cases()} if "top_k" in kinds else {})}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
