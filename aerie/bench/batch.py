"""`aerie bench-batch`: total tokens/s of many concurrent sessions, speculative against plain
batched decoding in the same engine (`aerie.batch`), at several concurrency levels.

    aerie bench-batch --prompts mt_bench.jsonl --limit 64 --concurrency 1,4,16,64 \
        --modes eagle,vanilla --device cuda --dtype bfloat16 --max-new-tokens 128 --out batch.json

Every (mode, concurrency) run generates for the same prompts; each prompt's tokens are compared
with the first run's, which is the losslessness check (token-identical at T=0; in bfloat16 a
different batch shape may legitimately flip a near-tie, float32 should not). `--shape llama-8b`
runs a Llama-3-8B-shaped target with random weights (nothing downloaded) and a random EAGLE-3
head: its tau is ~1, so its eagle numbers show the cost of speculation, not a gain.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from tqdm import tqdm

from aerie.batch.engine import BatchConfig, BatchEngine
from aerie.bench.harness import EAGLE_VARIANT, machine_info
from aerie.errors import InputError
from aerie.heads import DraftHead
from aerie.sampling import SamplingParams
from aerie.target import Target
from aerie.tree import TreeConfig
from aerie.verifier import StopCriteria

WARM_UP_TOKENS = 16


@dataclass
class BatchBenchSetup:
    target: Target
    head: DraftHead | None
    tree: TreeConfig
    prompts: list[list[int]]
    prompt_ids: list[str]
    stop_token_ids: frozenset[int]
    model: str


def tree_for_mode(mode: str, default: TreeConfig) -> TreeConfig | None:
    """The tree a mode drafts (None for vanilla): `eagle` the default, `eagle-d<D>-k<K>-n<N>`
    a fixed one, for finding the tree size that pays at each batch size."""
    if mode == "vanilla":
        return None
    if mode == "eagle":
        return default
    match = EAGLE_VARIANT.match(mode)
    if match is None or match.group(1) == "auto":
        raise InputError(f"unknown bench-batch mode {mode!r}: use eagle, vanilla or eagle-d<D>-k<K>-n<N>")
    depth, top_k, total = (int(g) for g in match.groups()[1:])
    try:
        return TreeConfig("dynamic", depth, top_k, total)
    except ValueError as e:
        raise InputError(f"bench-batch mode {mode}: {e}") from None


def warm_up_batches(concurrency: int) -> list[int]:
    """One session count per graph bucket that a run of `concurrency` sessions can reach."""
    sizes, b = [], 1
    while b < concurrency:
        sizes.append(b)
        b *= 2
    return [*sizes, concurrency]


def run_bench_batch(
    setup: BatchBenchSetup,
    modes: list[str],
    concurrencies: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    device: str,
    config: BatchConfig = BatchConfig(),
) -> dict:
    if any(c < 1 for c in concurrencies):
        raise InputError(f"concurrency levels must be >= 1, got {concurrencies}")
    trees = {m: tree_for_mode(m, setup.tree) for m in modes}
    if any(t is not None for t in trees.values()) and setup.head is None:
        raise InputError("eagle modes need a draft head")
    stop = StopCriteria(max_new_tokens, setup.stop_token_ids)
    engines = {m: BatchEngine(setup.target, setup.head if t else None, t or setup.tree, config) for m, t in trees.items()}
    # Plain decoding first, so that every other run is compared with it.
    order = sorted(modes, key=lambda m: m != "vanilla")
    runs, reference = [], None
    for mode in order:
        for c in concurrencies:
            engine = engines[mode]
            kind = "eagle" if trees[mode] else "vanilla"
            # Untimed: allocates the caches at the timed run's size, then captures the graphs of
            # every batch the run passes through (the full one, and the smaller ones it shrinks
            # to as its last sessions finish), as a long-running server would have them.
            engine.reserve(max(len(p) for p in setup.prompts), max_new_tokens, c, kind)
            for sessions in warm_up_batches(c):
                engine.generate_many(setup.prompts[:sessions], params, StopCriteria(WARM_UP_TOKENS, stop.stop_token_ids),
                                     kind, sessions)
            captured = engine.graph_captures
            with tqdm(total=len(setup.prompts) * max_new_tokens, desc=f"{mode} x{c}", unit="tok") as bar:
                run = engine.generate_many(setup.prompts, params, stop, kind, c, on_tokens=bar.update)
            tokens = [r.token_ids for r in run.results]
            if reference is None:
                reference = tokens
            mismatched = [setup.prompt_ids[i] for i, (a, b) in enumerate(zip(tokens, reference)) if a != b]
            runs.append({
                "mode": mode,
                "concurrency": c,
                "new_tokens": run.new_tokens,
                "seconds": run.seconds,
                "tokens_per_s": run.tokens_per_s,
                "tau": run.tau,
                "rounds": run.forwards,
                "prefill_s": run.prefill_s,
                "draft_s": run.draft_s,
                "verify_s": run.verify_s,
                "ms_per_round": 1e3 * (run.draft_s + run.verify_s) / max(run.forwards, 1),
                # Captures inside the timed run (their cost is in its seconds): 0 once warmed up.
                "graph_captures": engine.graph_captures - captured,
                "mean_session_s": statistics.fmean(r.seconds for r in run.results),
                "identical_to_reference": not mismatched,
                "mismatched_prompts": mismatched,
                "gpu_allocated_gib": torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            })
            done = runs[-1]
            # A line per run, so that a long benchmark cut short still shows what it measured.
            tqdm.write(f"{mode} x{c}: {done['tokens_per_s']:.1f} tok/s, tau {done['tau']:.2f}, "
                       f"{done['ms_per_round']:.2f} ms/round, identical: {done['identical_to_reference']}")
    return {
        "machine": machine_info(device),
        "config": {
            "model": setup.model,
            "dtype": str(setup.target.model.dtype).removeprefix("torch."),
            "max_new_tokens": max_new_tokens,
            "temperature": params.temperature,
            "seed": params.seed,
            "prompts": len(setup.prompts),
            "tree": vars(setup.tree),
            "concurrency": concurrencies,
            "reference": f"{order[0]} x{concurrencies[0]}",
        },
        "runs": runs,
        "summary": summarize_batch(runs, params.greedy),
    }


def summarize_batch(runs: list[dict], greedy: bool) -> dict:
    tps: dict[str, dict[str, float]] = {}
    for r in runs:
        tps.setdefault(r["mode"], {})[str(r["concurrency"])] = r["tokens_per_s"]
    summary = {
        # At T > 0 the draws depend on the tree (not the distribution): reported, not required.
        "all_identical": all(r["identical_to_reference"] for r in runs) if greedy else None,
        "tokens_per_s": tps,
    }
    plain = tps.get("vanilla", {})
    for mode, by_c in tps.items():
        if mode != "vanilla" and plain:
            summary[f"{mode}_vs_vanilla"] = {c: v / plain[c] for c, v in by_c.items() if plain.get(c)}
    return summary


def format_batch_table(result: dict) -> str:
    m = result["machine"]
    lines = [f"machine: {m.get('gpu', m['cpu'])}, torch {m['torch']}, {result['config']['dtype']}",
             "| mode | sessions | tokens/s | vs vanilla | tau | ms per round | identical |",
             "|---|---|---|---|---|---|---|"]
    ratios = {k.removesuffix("_vs_vanilla"): v for k, v in result["summary"].items() if k.endswith("_vs_vanilla")}
    for r in result["runs"]:
        ratio = ratios.get(r["mode"], {}).get(str(r["concurrency"]))
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | "
                     f"{f'{ratio:.2f}x' if ratio else '-'} | {r['tau']:.2f} | {r['ms_per_round']:.2f} | "
                     f"{str(r['identical_to_reference']).lower()} |")
    if result["summary"]["all_identical"] is not None:
        lines.append(f"all_identical: {str(result['summary']['all_identical']).lower()}")
    return "\n".join(lines)


def llama_8b_setup(device: str, dtype: torch.dtype, texts: list[str], ids: list[str], tree: TreeConfig,
                   with_head: bool) -> BatchBenchSetup:
    """The random-weight Llama-3-8B shape with a random EAGLE-3 head. Prompts are their UTF-8
    bytes as token ids (no tokenizer to download); there is no stop token."""
    from aerie.bench.verify_cost import llama_8b_shaped
    from aerie.heads import new_head
    from aerie.target import FeatureSpec, eagle3_default_layers

    model = llama_8b_shaped(torch.device(device), dtype)
    target = Target(model, FeatureSpec("eagle3", eagle3_default_layers(model.config.num_hidden_layers)))
    head = None
    if with_head:
        torch.manual_seed(0)
        head = new_head(target, "eagle3").eval()
    return BatchBenchSetup(target, head, tree, [list(t.encode())[:512] for t in texts], ids, frozenset(),
                           "llama-8b (random weights)")
