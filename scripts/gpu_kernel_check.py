"""A draft level's top-k timed alone on a GPU, with nothing downloaded: torch.topk against
`aerie.tree.top_k` at several chunk widths (`TOP_K_CHUNK`), for the rows a draft level scores
(the root, or a frontier of top-k nodes) over an EAGLE-3 draft vocabulary and a full one.

Each case runs 50 times inside one CUDA graph, replayed 20 times: the figure is device time
per call, without launch overhead, as inside a captured round.

    PYTHONPATH=. python3 scripts/gpu_kernel_check.py OUT.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import torch

from aerie.bench.harness import machine_info
from aerie.bench.verify_cost import graph_replay_ms
from aerie.graphs import GraphCache
from aerie.tree import top_k

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
        row = {"shape": list(shape), "k": 10, "torch_topk_us": graphed_us(lambda: torch.topk(scores, 10, dim=-1))}
        for chunk in (256, 512, 1024, 2048, 4096):
            row[f"chunk_{chunk}_us"] = graphed_us(lambda: top_k(scores, 10, chunk))
        rows.append(row)
        print(row, flush=True)
    return rows


def main(out: str) -> None:
    result = {"machine": machine_info("cuda"), "top_k": top_k_cases()}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
