"""Starting the ranks of a tensor-parallel target: rendezvous, process groups, worker processes.

Two ways to start: torchrun (or anything that sets MASTER_ADDR, MASTER_PORT, RANK and
WORLD_SIZE, one process per GPU, each running the same command), or one command that spawns
ranks 1..N-1 itself on this host and is rank 0.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

import torch
import torch.distributed as dist
from torch import nn

from aerie.errors import InputError
from aerie.parallel.protocol import BroadcastChannel
from aerie.parallel.shard import ShardPlan, drop_lm_head_, shard_llama_

log = logging.getLogger("aerie.parallel")

ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
# A rank > 0 waits on the control channel for as long as the service is idle: hours, say.
CONTROL_TIMEOUT = datetime.timedelta(days=365)


@dataclass(frozen=True)
class Rendezvous:
    """Where this process stands, as torchrun describes it."""

    rank: int
    world: int
    local_rank: int
    master_addr: str
    master_port: int


def rendezvous_from_env(environ: Mapping[str, str], world: int) -> Rendezvous | None:
    """The torchrun-style rendezvous in `environ`, or None when none is set (then spawn)."""
    present = [k for k in ENV_KEYS if k in environ]
    if not present:
        return None
    missing = [k for k in ENV_KEYS if k not in environ]
    if missing:
        raise InputError(f"a torch.distributed launch sets {', '.join(ENV_KEYS)}; {', '.join(missing)} is not set")
    try:
        rdzv = Rendezvous(
            rank=int(environ["RANK"]), world=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", environ["RANK"])),
            master_addr=environ["MASTER_ADDR"], master_port=int(environ["MASTER_PORT"]),
        )
    except ValueError as e:
        raise InputError(f"cannot read the torch.distributed environment: {e}") from None
    if rdzv.world != world:
        raise InputError(f"WORLD_SIZE is {rdzv.world} but --tensor-parallel is {world}: start one process per shard")
    if not 0 <= rdzv.rank < world:
        raise InputError(f"RANK {rdzv.rank} is outside WORLD_SIZE {world}")
    return rdzv


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


@dataclass
class ParallelGroup:
    """This rank's place in the group, and the two process groups it talks over."""

    rank: int
    world: int
    device: torch.device
    model_group: dist.ProcessGroup  # the activations' all-reduces (NCCL on CUDA)
    control_group: dist.ProcessGroup  # the mirrored calls (always gloo: see BroadcastChannel)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, group=self.model_group)

    def channel(self) -> BroadcastChannel:
        return BroadcastChannel(self.control_group)

    def leave(self) -> None:
        dist.destroy_process_group()


def join_group(rank: int, world: int, device: str, local_rank: int, store: dist.Store | None = None) -> ParallelGroup:
    """Initialise torch.distributed for this process: over `store`, or from the environment
    (env://, which also finds torchrun's own store) when it is None."""
    if device == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise InputError(f"rank {rank} wants GPU {local_rank}, but torch sees {torch.cuda.device_count()} GPUs")
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
    else:
        where = torch.device("cpu")
    init = {"store": store} if store is not None else {"init_method": "env://"}
    dist.init_process_group(backend_for(device), rank=rank, world_size=world,
                            device_id=where if device == "cuda" else None, **init)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return ParallelGroup(rank, world, where, dist.group.WORLD, control)


def prepare_shard_(model: nn.Module, group: ParallelGroup) -> ShardPlan:
    """Shard a model loaded on the CPU for this rank, then move the shard to its device.

    Sharding before the move means a GPU only ever holds its shard.
    """
    plan = shard_llama_(model, group.rank, group.world, group.all_reduce)
    if group.rank > 0:
        drop_lm_head_(model)
    model.to(group.device)
    return plan


# --- processes -----------------------------------------------------------------------------


def spawn_workers(world: int, main: Callable[..., None], args: tuple) -> list[BaseProcess]:
    """Start ranks 1..world-1 as `main(rank, *args)` in fresh interpreters on this host.

    Not daemonic: multiprocessing would SIGTERM daemonic children at exit, which the workers
    ignore (see `ignore_stop_signals`); `stop_workers` ends them instead.
    """
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=main, args=(rank, *args), name=f"aerie-tp-rank{rank}") for rank in range(1, world)]
    for p in procs:
        p.start()
    return procs


def stop_workers(procs: list[BaseProcess], timeout_s: float = 30.0) -> list[int | None]:
    """Wait for workers told to stop (or whose rank 0 connection is closed); kill stragglers.
    Returns their exit codes."""
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            log.warning("tensor-parallel worker %s did not stop within %.0f s: killing it", p.name, timeout_s)
            p.kill()
            p.join(5.0)
    return [p.exitcode for p in procs]


def watch_workers(procs: list[BaseProcess], stopping: threading.Event) -> threading.Thread:
    """Exit this process (rank 0) if a worker dies while the service runs.

    Without its shard the model cannot run, and on CUDA rank 0 would wait in an all-reduce
    until NCCL's timeout: better to exit at once and let the supervisor restart the service.
    """

    def watch() -> None:
        from multiprocessing.connection import wait

        wait([p.sentinel for p in procs])
        if not stopping.is_set():
            dead = ", ".join(f"{p.name} (exit {p.exitcode})" for p in procs if not p.is_alive())
            log.error("tensor-parallel worker died: %s; the sharded model cannot run without it, exiting", dead)
            os._exit(1)

    thread = threading.Thread(target=watch, name="aerie-tp-watch", daemon=True)
    thread.start()
    return thread


def ignore_stop_signals() -> None:
    """For ranks > 0: SIGINT and SIGTERM are rank 0's to act on.

    A terminal's Ctrl-C and torchrun's SIGTERM reach every rank at once; rank 0 then drains
    its in-flight rounds, which need the other ranks, and only afterwards sends SHUTDOWN.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def exit_when_orphaned(poll_s: float = 1.0) -> threading.Thread:
    """For spawned ranks > 0: exit if rank 0 (the parent) is gone without saying so, e.g.
    after a SIGKILL, when the control channel might not notice (a half-open connection)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name="aerie-tp-orphan", daemon=True)
    thread.start()
    return thread
