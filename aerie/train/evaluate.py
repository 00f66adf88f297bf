"""Measuring a head: tau (tokens committed per target forward, bonus included) and the
per-depth acceptance (the fraction of rounds that accept at least d draft tokens), with the
in-process engine on benchmark prompts.

Several evaluation cells (head x temperature x tree x prompt set) can share one pool of
worker processes, each holding the target once; on a GPU this keeps the device busy while
each process's Python drives its own sequence.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from aerie.bench.prompts import Prompt
from aerie.errors import InputError
from aerie.tree import TreeConfig


@dataclass(frozen=True)
class EvalCell:
    """One measurement: a head on a prompt set at one temperature with one tree shape."""

    name: str
    head: str
    prompts: str  # key into the prompt sets
    temperature: float = 0.0
    tree: TreeConfig = TreeConfig(kind="dynamic", depth=8, top_k=10, total_tokens=60)
    max_new_tokens: int = 256
    seed: int = 0


# --- one sequence ---------------------------------------------------------------------------


def round_stats(accepted: list[int]) -> dict:
    return {"rounds": len(accepted), "committed": sum(a + 1 for a in accepted), "accepted": accepted}


def summarize(cell: EvalCell, per_prompt: list[dict]) -> dict:
    """tau over all rounds of all prompts, the per-depth acceptance and the histogram."""
    accepted = [a for p in per_prompt for a in p["accepted"]]
    rounds = len(accepted)
    depth = cell.tree.depth
    hist: dict[str, int] = {}
    for a in accepted:
        hist[str(a)] = hist.get(str(a), 0) + 1
    return {
        "name": cell.name,
        "head": cell.head,
        "prompts": cell.prompts,
        "temperature": cell.temperature,
        "tree": asdict(cell.tree),
        "max_new_tokens": cell.max_new_tokens,
        "n_prompts": len(per_prompt),
        "rounds": rounds,
        "new_tokens": sum(p["new_tokens"] for p in per_prompt),
        "tau": (sum(a + 1 for a in accepted) / rounds) if rounds else None,
        "tau_mean_per_prompt": (sum(p["tau"] for p in per_prompt) / len(per_prompt)) if per_prompt else None,
        "accept_at_least": {str(d): (sum(a >= d for a in accepted) / rounds if rounds else None) for d in range(1, depth + 1)},
        "histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
        "vanilla_checked": sum(1 for p in per_prompt if "matches_vanilla" in p),
        "vanilla_mismatches": sum(1 for p in per_prompt if p.get("matches_vanilla") is False),
        "per_prompt": [{k: v for k, v in p.items() if k != "accepted"} for p in per_prompt],
    }


class _Runner:
    """The target and the heads it has loaded, in one process."""

    def __init__(self, model: str | None, device: str, dtype: str):
        from aerie.train.loading import load_model, pick_dtype, stop_token_ids

        self.device = device
        self.model, self.tokenizer, _ = load_model(model, device, pick_dtype(dtype, device))
        self.stop = stop_token_ids(self.tokenizer, self.model)
        self.heads: dict[str, object] = {}

    def engine(self, head_path: str, tree: TreeConfig):
        from aerie.engine import Engine
        from aerie.heads import load_head
        from aerie.target import StaticKV, Target
        from aerie.train.loading import feature_spec

        if head_path not in self.heads:
            # On a GPU the rounds run as CUDA graphs, as they do when serving.
            static = StaticKV.default_for(self.device)
            probe = Target(self.model, feature_spec(self.model, "eagle3"), static=static)
            head = load_head(head_path, probe)
            self.heads[head_path] = (Target(self.model, head.feature_spec, static=static), head)
        target, head = self.heads[head_path]
        return Engine(target, head, tree, max_tree_nodes=max(128, tree.total_tokens + 1))

    def run(self, cell: EvalCell, prompt: Prompt, check_vanilla: bool) -> dict:
        from aerie.sampling import SamplingParams
        from aerie.train.loading import encode_chat
        from aerie.verifier import StopCriteria

        engine = self.engine(cell.head, cell.tree)
        ids = encode_chat(self.tokenizer, prompt.text)
        params = SamplingParams(temperature=cell.temperature, seed=cell.seed)
        stop = StopCriteria(cell.max_new_tokens, self.stop)
        t0 = time.perf_counter()
        res = engine.generate(ids, params, stop, "eagle")
        out = {
            "id": prompt.id, "new_tokens": res.new_tokens, "rounds": len(res.rounds), "tau": res.tau,
            "seconds": round(time.perf_counter() - t0, 3), "accepted": [r.accepted for r in res.rounds],
        }
        if check_vanilla:
            plain = engine.generate(ids, params, stop, "vanilla")
            out["matches_vanilla"] = plain.token_ids == res.token_ids
        return out


_RUNNER: _Runner | None = None


def _init_worker(model, device, dtype, threads):
    global _RUNNER
    torch.set_num_threads(threads)
    _RUNNER = _Runner(model, device, dtype)


def _work(task):
    cell, prompt, check_vanilla, deadline = task
    if deadline is not None and time.time() > deadline:
        return cell.name, None
    return cell.name, _RUNNER.run(cell, prompt, check_vanilla)


def run_cells(
    model: str | None,
    cells: list[EvalCell],
    prompt_sets: dict[str, list[Prompt]],
    device: str = "cpu",
    dtype: str = "auto",
    workers: int = 1,
    check_vanilla: int = 0,
    deadline: float | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Evaluate every cell; returns {cell name: summary}. Tasks run in the order of `cells`,
    so under a `deadline` (time.time() value) the first cells are the complete ones."""
    for cell in cells:
        if cell.prompts not in prompt_sets:
            raise InputError(f"cell {cell.name}: unknown prompt set {cell.prompts!r}")
        if not (Path(cell.head) / "config.json").is_file():
            raise InputError(f"head '{cell.head}' is not a directory with a config.json")
    tasks = [
        (cell, prompt, i < check_vanilla, deadline)
        for cell in cells
        for i, prompt in enumerate(prompt_sets[cell.prompts])
    ]
    results: dict[str, list[dict]] = {cell.name: [] for cell in cells}
    bar = tqdm(total=len(tasks), desc="eval", unit="prompt", disable=not progress, dynamic_ncols=True)
    if workers <= 1:
        _init_worker(model, device, dtype, torch.get_num_threads())
        stream = map(_work, tasks)
        pool = None
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(model, device, dtype, threads))
        stream = pool.imap(_work, tasks, chunksize=1)
    try:
        for name, row in stream:
            if row is not None:
                results[name].append(row)
            bar.update(1)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        bar.close()
    return {cell.name: summarize(cell, results[cell.name]) for cell in cells}


def format_table(summaries: dict[str, dict]) -> str:
    lines = [f"{'cell':40s} {'n':>4s} {'tau':>6s}  accept>=d (d=1..)"]
    for name, s in summaries.items():
        tau = f"{s['tau']:.2f}" if s["tau"] is not None else "-"
        acc = " ".join(f"{v:.2f}" for v in s["accept_at_least"].values() if v is not None)
        lines.append(f"{name:40s} {s['n_prompts']:4d} {tau:>6s}  {acc}")
    return "\n".join(lines)
