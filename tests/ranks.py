"""Running a test's ranks as spawned processes that meet over a TCP store (gloo on the CPU)."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable

import torch.distributed as dist


def run_ranks(rank_main: Callable[..., None], world: int, *args) -> None:
    """Run rank_main(rank, store_port, *args) for every rank and require each to exit cleanly."""
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(rank, store.port, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * world, "a rank failed: see its traceback above"
