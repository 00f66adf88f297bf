"""`aerie host-work`: the host's share of a batched round, counted on the CPU.

    aerie host-work --sessions 1,4,16,64 --out host_work.json

On a small target the batched round is host-bound (docs/benchmarks.md): what a CUDA graph
replays costs the host one launch, and everything outside the graphs costs it one launch or
one small host op per tensor operation, plus the Python around them. None of that depends on
the GPU, so it can be counted without one: this runs `BatchEngine.generate_many` on a tiny
random-weight target on the CPU, with `StandInGraphCache` in place of CUDA graph capture (a
replay runs the captured function again, timed and counted apart), and reports per round and
per phase (draft, verify):

- eager tensor ops: those dispatched outside any graph replay, with the most frequent ones;
- graph replays;
- host milliseconds outside graph replays, that is the round's time less the replayed work,
  which on a GPU runs on the device.

The counts are the same for any target and head of the same tree; the milliseconds are this
CPU's, not a GPU host's, and are for comparing versions of the code on one machine.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aerie.batch.draft import BatchDrafter
from aerie.batch.engine import BatchEngine, BatchRun
from aerie.batch.verify import BatchVerifier
from aerie.bench.batch import tree_for_mode
from aerie.bench.harness import machine_info
from aerie.graphs import GraphCache
from aerie.sampling import SamplingParams
from aerie.tree import TreeConfig
from aerie.verifier import StopCriteria

VOCAB = 256

# Where an op or a replay is counted: the first of these methods found on the call stack.
_PHASES = {
    inspect.unwrap(method).__code__: phase
    for method, phase in ((BatchDrafter.draft, "draft"), (BatchVerifier.verify, "verify"),
                          (BatchVerifier.step_plain, "verify"))
}


def _phase() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        phase = _PHASES.get(frame.f_code)
        if phase is not None:
            return phase
        frame = frame.f_back
    return "other"  # joins, prefill, leaving rows


@dataclass
class Census:
    """What ran outside and inside the stand-in graphs, per phase."""

    in_replay: int = 0  # > 0 inside a replay or a capture
    ops: Counter = field(default_factory=Counter)  # (phase, aten op) -> calls outside replays
    replays: Counter = field(default_factory=Counter)  # phase -> replays
    replay_s: Counter = field(default_factory=Counter)  # phase -> seconds inside replays

    def reset(self) -> None:
        self.ops.clear()
        self.replays.clear()
        self.replay_s.clear()


class _Replay:
    def __init__(self, census: Census, fn: Callable[[], tuple[torch.Tensor, ...]], outputs: tuple[torch.Tensor, ...]):
        self.census, self.fn, self.outputs = census, fn, outputs

    def replay(self) -> None:
        phase = _phase()
        self.census.in_replay += 1
        t0 = time.perf_counter()
        try:
            for out, new in zip(self.outputs, self.fn()):
                out.copy_(new)
        finally:
            self.census.replay_s[phase] += time.perf_counter() - t0
            self.census.replays[phase] += 1
            self.census.in_replay -= 1


def _stand_in_class(census: Census) -> type[GraphCache]:
    class StandInGraphCache(GraphCache):
        """GraphCache on the CPU: capture runs the function (after the same two warm-ups),
        replay runs it again and copies its results into the captured outputs."""

        def __init__(self, enabled: bool):
            super().__init__(enabled)
            self.enabled = True  # GraphCache turns itself off without CUDA

        def _capture(self, fn):
            census.in_replay += 1  # capture is set-up work, not a round's host work
            try:
                for _ in range(2):
                    fn()
                outputs = fn()
            finally:
                census.in_replay -= 1
            self.captures += 1
            return _Replay(census, fn, outputs), outputs

    return StandInGraphCache


@contextlib.contextmanager
def stand_in_graphs(census: Census) -> Iterator[None]:
    """Static caches made inside this block capture with the CPU stand-in."""
    import aerie.kvcache

    original = aerie.kvcache.GraphCache
    aerie.kvcache.GraphCache = _stand_in_class(census)
    try:
        yield
    finally:
        aerie.kvcache.GraphCache = original


class _CountOps(TorchDispatchMode):
    def __init__(self, census: Census):
        super().__init__()
        self.census = census

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.census.in_replay:
            self.census.ops[(_phase(), func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def census_run(engine: BatchEngine, census: Census, prompts: list[list[int]], mode: str, max_new_tokens: int,
               params: SamplingParams = SamplingParams(), timed_runs: int = 3) -> dict:
    """One batched generation of every prompt at once: a warm-up (captures), `timed_runs`
    timed runs (the least host time per phase is kept) and a counted one (the op counter
    slows the host, so it is not timed). The engine's caches must have been made inside
    `stand_in_graphs(census)`."""
    stop = StopCriteria(max_new_tokens)

    def generate() -> BatchRun:
        return engine.generate_many(prompts, params, stop, mode, concurrency=len(prompts))

    generate()
    host_ms: dict[str, float] = {}
    for _ in range(timed_runs):
        census.reset()
        run = generate()
        for phase, wall in (("draft", run.draft_s), ("verify", run.verify_s)):
            ms = 1e3 * (wall - census.replay_s[phase]) / run.forwards
            host_ms[phase] = min(host_ms.get(phase, ms), ms)
    census.reset()
    with _CountOps(census):
        counted = generate()
    if [r.token_ids for r in counted.results] != [r.token_ids for r in run.results]:
        raise RuntimeError("the counted run generated differently from the timed ones")
    rounds = counted.forwards
    phases = {}
    for phase in ("draft", "verify") if mode == "eagle" else ("verify",):
        ops = Counter({name: n for (p, name), n in census.ops.items() if p == phase})
        phases[phase] = {
            "eager_ops_per_round": sum(ops.values()) / rounds,
            "graph_replays_per_round": census.replays[phase] / rounds,
            "host_ms_per_round": host_ms[phase],
            "top_ops": {name: round(n / rounds, 2) for name, n in ops.most_common(8)},
        }
    return {
        "sessions": len(prompts),
        "rounds": rounds,
        "tau": counted.tau,
        "eager_ops_per_round": sum(p["eager_ops_per_round"] for p in phases.values()),
        "host_ms_per_round": sum(p["host_ms_per_round"] for p in phases.values()),
        "phases": phases,
    }


def tiny_engine(tree: TreeConfig, seed: int = 0) -> BatchEngine:
    """A tiny random EAGLE-3 target and head in a batched engine: op counts depend on the tree
    and the number of sessions, not on the model."""
    from aerie.tiny import tiny_head, tiny_target

    target = tiny_target("eagle3", vocab=VOCAB, layers=4, seed=seed)
    return BatchEngine(target, tiny_head(target, "eagle3", draft_vocab=128, seed=seed + 1), tree)


def run_host_work(modes: list[str], sessions: list[int], default_tree: TreeConfig, max_new_tokens: int,
                  params: SamplingParams = SamplingParams(), prompt_tokens: int = 32,
                  progress: Callable[[str], None] = lambda _: None) -> dict:
    """Each mode (`eagle`, `vanilla`, `eagle-d<D>-k<K>-n<N>` as in bench-batch) at each number
    of sessions, on random prompts of `prompt_tokens` tokens."""
    trees = {mode: tree_for_mode(mode, default_tree) for mode in modes}  # refuses unknown modes first
    census = Census()
    rows = []
    generator = torch.Generator().manual_seed(0)
    with stand_in_graphs(census):
        engines = {mode: tiny_engine(tree or default_tree) for mode, tree in trees.items()}
        for n in sessions:
            prompts = torch.randint(0, VOCAB, (n, prompt_tokens), generator=generator).tolist()
            for mode, tree in trees.items():
                progress(f"{mode} at {n} sessions")
                row = census_run(engines[mode], census, prompts, "eagle" if tree else "vanilla", max_new_tokens, params)
                rows.append({**row, "mode": mode, "tree": vars(tree) if tree else None})
    return {"machine": machine_info("cpu"), "max_new_tokens": max_new_tokens, "prompt_tokens": prompt_tokens,
            "sampling": vars(params), "runs": rows}


def format_host_work(result: dict) -> str:
    lines = [
        "| mode | sessions | eager ops / round (draft + verify) | graph replays / round "
        "| host ms / round (draft + verify) |",
        "|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        ph = r["phases"]
        ops = " + ".join(f"{ph[p]['eager_ops_per_round']:.0f}" for p in ("draft", "verify") if p in ph)
        replays = sum(p["graph_replays_per_round"] for p in ph.values())
        ms = " + ".join(f"{ph[p]['host_ms_per_round']:.2f}" for p in ("draft", "verify") if p in ph)
        lines.append(f"| {r['mode']} | {r['sessions']} | {ops} | {replays:.1f} | {ms} |")
    return "\n".join(lines)
