"""Running a test's ranks as spawned processes that meet over a TCP store (gloo on the CPU)."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections.abc import Callable

import torch.distributed as dist


def run_ranks(rank_main: Callable[..., None], world: int, *args) -> None:
    """Run rank_main(rank, store_port, *args) for every rank and require each to exit cleanly."""
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_run_and_exit, args=(rank_main, rank, store.port, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * world, "a rank failed: see its traceback above"


def _run_and_exit(rank_main: Callable[..., None], *args) -> None:
    """rank_main(*args), then leave without the interpreter's teardown: destroying gloo's
    threads there aborts a finished rank now and again ("terminate called without an active
    exception"), which failed a passing test. A rank that raises still exits with its
    traceback and a non-zero code."""
    rank_main(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
