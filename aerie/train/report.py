"""`aerie train report`: the standard comparison of trained heads, as the papers make it.

EAGLE-1 head against EAGLE-3 head, on MT-bench and HumanEval, at T=0 and T=1, with the
EAGLE-2 dynamic tree; and a chain against the dynamic tree for the EAGLE-3 head. The cells
run most important first, so that under a time budget the headline figures are complete.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from aerie.bench.harness import machine_info
from aerie.bench.prompts import read_prompts
from aerie.train.evaluate import EvalCell, run_cells
from aerie.tree import TreeConfig


def report_cells(heads: dict[str, str], prompt_sets: list[str], tree: TreeConfig, max_new_tokens: int) -> list[EvalCell]:
    """The grid, headline cells first across every prompt set: every head at T=0, then the
    first head with a chain of the same depth, then every head at T=1. A time limit then
    cuts the least important cells of every set, not a whole set."""
    chain = TreeConfig.chain(tree.depth)
    cells: list[EvalCell] = []

    def add(head: str, prompts: str, temperature: float, shape: TreeConfig) -> None:
        name = f"{head}/{prompts}/T{temperature:g}/{shape.kind}"
        cells.append(EvalCell(name, heads[head], prompts, temperature, shape, max_new_tokens))

    names = list(heads)
    for head in names:
        for prompts in prompt_sets:
            add(head, prompts, 0.0, tree)
    for prompts in prompt_sets:
        add(names[0], prompts, 0.0, chain)
    for head in names:
        for prompts in prompt_sets:
            add(head, prompts, 1.0, tree)
    return cells


def markdown_table(summaries: dict[str, dict], expected: dict[str, int]) -> str:
    """One row per cell: tau, the acceptance at depth 1..3 and how many prompts it covers."""
    lines = [
        "| head | prompts | T | tree | tau | accept >= 1 | >= 2 | >= 3 | prompts run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        head, prompts, temp, shape = name.split("/")
        if not s["n_prompts"]:
            lines.append(f"| {head} | {prompts} | {temp[1:]} | {shape} | not run | | | | 0/{expected[prompts]} |")
            continue
        acc = [s["accept_at_least"].get(str(d)) for d in (1, 2, 3)]
        cells = " | ".join(f"{a:.2f}" if a is not None else "-" for a in acc)
        lines.append(
            f"| {head} | {prompts} | {temp[1:]} | {shape} | {s['tau']:.2f} | {cells} | {s['n_prompts']}/{expected[prompts]} |"
        )
    return "\n".join(lines)


def run_report(
    model: str | None,
    heads: dict[str, str],
    prompt_files: dict[str, str],
    out_dir: str | Path,
    device: str,
    dtype: str,
    tree: TreeConfig,
    max_new_tokens: int = 256,
    workers: int = 1,
    minutes: float | None = None,
    limit: int | None = None,
) -> dict[str, dict]:
    """Run the grid and write report.json and report.md into `out_dir`."""
    prompt_sets = {name: read_prompts(path, limit) for name, path in prompt_files.items()}
    cells = report_cells(heads, list(prompt_sets), tree, max_new_tokens)
    deadline = time.time() + minutes * 60 if minutes else None
    summaries = run_cells(model, cells, prompt_sets, device, dtype, workers, deadline=deadline)
    expected = {name: len(p) for name, p in prompt_sets.items()}
    table = markdown_table(summaries, expected)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine_info(device), "cells": summaries, "expected_prompts": expected}
    (out / "report.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "report.md").write_text(table + "\n")
    return summaries
