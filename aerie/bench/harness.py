"""`aerie bench`: our speculative decoding, our plain decoding and transformers `generate`,
side by side on the same prompts, the same target and the same machine.

Other modes plug in as `ModeRunner`s (the services add `networked`: the same speculative
loop split over verify, draft and gateway processes), so the core stays free of them.
"""

from __future__ import annotations

import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import StaticCache

from aerie.bench.prompts import Prompt
from aerie.budget import auto_engine
from aerie.errors import InputError
from aerie.graphs import GraphCache
from aerie.engine import Engine
from aerie.sampling import SamplingParams
from aerie.stack import Stack
from aerie.tree import TreeConfig
from aerie.verifier import StopCriteria

# hf-dynamic and hf-static are transformers' own `generate` with its default dynamic cache and
# with `cache_implementation="static"` (which compiles the decode step); hf is hf-dynamic.
# eagle-split is eagle with drafter and verifier apart, handing the tree over through the host
# as the services do, where eagle runs its rounds whole on the device (aerie.device_round).
MODES = ("eagle", "eagle-split", "vanilla", "hf-dynamic", "hf-static", "hf")
# Untimed tokens per mode before timing: enough for rounds that commit several tokens at once,
# so that every graph (and, with the compiled forward, every shape family) exists before.
WARM_UP_TOKENS = 32
# `--tree-budget auto` is taken through its warm-up (TreeBudget.warmup_rounds) before timing,
# as a long-running server would be: untimed answers of up to this many tokens, at most
# AUTO_WARM_UP_RUNS of them.
AUTO_WARM_UP_TOKENS = 256
AUTO_WARM_UP_RUNS = 32
# Variants of eagle in the same run: `eagle-auto` (--tree-budget auto) and fixed trees
# `eagle-d<depth>-k<top_k>-n<total_tokens>`, for sweeping the tree budget side by side.
EAGLE_VARIANT = re.compile(r"^eagle-(auto|d(\d+)-k(\d+)-n(\d+))$")


@dataclass
class ModeRun:
    """One generation in one mode, with the per-round costs where the mode has rounds."""

    token_ids: list[int]
    tau: float = 1.0
    accepted_per_round: list[int] | None = None
    # Mean per round: draft_ms, verify_ms (a device round's whole time: its draft_ms is 0),
    # wire_ms, request_bytes, response_bytes.
    per_round: dict[str, float] | None = None


ModeRunner = Callable[[list[int], SamplingParams, StopCriteria], ModeRun]


def cpu_name() -> str:
    """The processor's marketing name where Linux tells it (platform.processor() often is empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    info = {
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


class HFStaticCache:
    """One transformers StaticCache reused (reset) across calls: `generate` compiles its
    decode step for the cache's shape, so a cache that keeps its length compiles once
    instead of once per prompt length."""

    def __init__(self, model, length: int = 2048):
        self.model, self.length, self.cache = model, length, None

    @torch.inference_mode()  # its tensors are made and used inside generate's inference mode
    def for_length(self, needed: int):
        if self.cache is None or needed > self.length:
            while self.length < needed:
                self.length *= 2
            self.cache = StaticCache(config=self.model.config, max_cache_len=self.length)
        self.cache.reset()
        return self.cache


def _hf_generate(
    stack: Stack, prompt_ids: list[int], params: SamplingParams, stop: StopCriteria,
    static: HFStaticCache | None = None,
) -> list[int]:
    model = stack.target.model
    ids = torch.tensor([prompt_ids], device=model.device)
    kwargs = dict(max_new_tokens=stop.max_new_tokens, eos_token_id=sorted(stop.stop_token_ids) or None)
    if static is not None:
        kwargs["past_key_values"] = static.for_length(len(prompt_ids) + stop.max_new_tokens)
    if params.greedy:
        kwargs.update(do_sample=False)
    else:
        torch.manual_seed(params.seed)
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=sorted(stop.stop_token_ids)[0]
                             if stop.stop_token_ids else None, **kwargs)
    return out[0, len(prompt_ids):].tolist()


def compiled_graph_count() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_bench(
    stack: Stack,
    prompts: list[Prompt],
    modes: list[str],
    max_new_tokens: int,
    params: SamplingParams,
    device: str,
    extra_modes: dict[str, ModeRunner] | None = None,
    on_prompt: Callable[[dict], None] | None = None,
) -> dict:
    """Every mode on every prompt, side by side. `on_prompt` gets the result so far after each
    prompt (the CLI writes it out, so that a run cut short keeps what it measured)."""
    extra_modes = extra_modes or {}
    unknown = [m for m in modes if m not in MODES and m not in extra_modes and not EAGLE_VARIANT.match(m)]
    if unknown:
        raise InputError(
            f"unknown bench modes {unknown}: choose from {', '.join([*MODES, *extra_modes])}, "
            "eagle-auto or eagle-d<depth>-k<top_k>-n<total_tokens>"
        )
    if any(m.startswith("eagle") for m in modes) and stack.head is None:
        raise InputError("mode eagle needs a draft head")
    engine = Engine(stack.target, stack.head, stack.tree)
    split = Engine(stack.target, stack.head, stack.tree, device_rounds=False)
    stop = StopCriteria(max_new_tokens, stack.stop_token_ids())
    # Vanilla runs first whenever asked for, so every other mode can be compared with it.
    order = sorted(modes, key=lambda m: m != "vanilla")
    encoded = [stack.encode_prompt(p.text) for p in prompts]
    hf_static = HFStaticCache(stack.target.model)
    engines = {m: _eagle_variant_engine(stack, m) for m in modes if EAGLE_VARIANT.match(m)}
    runners: dict[str, ModeRunner] = {
        "hf": lambda ids, p, s: ModeRun(_hf_generate(stack, ids, p, s)),
        "hf-dynamic": lambda ids, p, s: ModeRun(_hf_generate(stack, ids, p, s)),
        "hf-static": lambda ids, p, s: ModeRun(_hf_generate(stack, ids, p, s, hf_static)),
        "vanilla": lambda ids, p, s: ModeRun(engine.generate(ids, p, s, "vanilla").token_ids),
        "eagle": lambda ids, p, s: _engine_run(engine.generate(ids, p, s, "eagle")),
        "eagle-split": lambda ids, p, s: _engine_run(split.generate(ids, p, s, "eagle")),
        **{m: _eagle_variant(engines, m) for m in engines},
        **extra_modes,
    }
    engine.precompile()  # the compiled forwards' shape families, before any run
    _warm_up([runners[m] for m in order], encoded[0], params, StopCriteria(WARM_UP_TOKENS, stop.stop_token_ids), device)
    if stack.target.static is not None:
        ours = [runners[m] for m in order if m == "vanilla" or m.startswith("eagle")]
        _warm_up_prefills(ours, encoded[0], params, stack.target.static.largest_graph, device)
        # The longest prompt to the full length, past any stop token: the pooled caches grow
        # to what the timed runs need, and the graphs over the grown storage are captured
        # now rather than in some prompt's timed run. Twice: a mode with a deeper or larger
        # tree can grow storage that the modes before it captured their graphs over.
        for _ in range(2):
            _warm_up(ours, max(encoded, key=len), params, StopCriteria(max_new_tokens), device)
    if "eagle-auto" in modes:  # its warm-up rounds capture every size's and depth's graphs
        budget = engines["eagle-auto"].budget
        for i in range(AUTO_WARM_UP_RUNS):
            if not budget.warmup_rounds:
                break
            # Answers to the prompts, each to its stop token: what it learns of acceptance
            # is what serving them would teach it (text past a stop token is not).
            _warm_up([runners["eagle-auto"]], encoded[i % len(encoded)], params,
                     StopCriteria(AUTO_WARM_UP_TOKENS, stop.stop_token_ids), device)
    rows = []
    for prompt, ids in tqdm(list(zip(prompts, encoded)), desc="bench", unit="prompt"):
        vanilla_tokens = None
        for mode in order:
            captures, compiles = GraphCache.total_captures, compiled_graph_count()
            _sync(device)
            t0 = time.perf_counter()
            run = runners[mode](ids, params, stop)
            _sync(device)
            seconds = time.perf_counter() - t0
            if mode == "vanilla":
                vanilla_tokens = run.token_ids
            rows.append({
                "id": prompt.id,
                "mode": mode,
                "new_tokens": len(run.token_ids),
                "seconds": seconds,
                "tokens_per_s": len(run.token_ids) / seconds,
                "tau": run.tau,
                "accepted_per_round": run.accepted_per_round,
                "per_round": run.per_round,
                "identical_to_vanilla": None if vanilla_tokens is None else run.token_ids == vanilla_tokens,
                # Where a bf16 answer leaves plain decoding's (a near tie rounded the other way).
                "tokens_matching_vanilla": None if vanilla_tokens is None else common_prefix(run.token_ids,
                                                                                               vanilla_tokens),
                # Graphs captured and graphs compiled inside the timed run: a warm engine has
                # none, so a slow row with some names its cause.
                "graph_captures": GraphCache.total_captures - captures,
                "captured": _captured_since(captures),
                "compiles": compiled_graph_count() - compiles,
            })
        if on_prompt is not None:
            on_prompt(_result(stack, prompts, modes, max_new_tokens, params, device, rows, engines))
    return _result(stack, prompts, modes, max_new_tokens, params, device, rows, engines)


def _result(stack: Stack, prompts: list[Prompt], modes: list[str], max_new_tokens: int, params: SamplingParams,
            device: str, rows: list[dict], engines: dict[str, Engine]) -> dict:
    auto = engines.get("eagle-auto")
    return {
        "machine": machine_info(device),
        "config": {
            "max_new_tokens": max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
            "dtype": str(stack.target.model.dtype).removeprefix("torch."),
            "model": str(stack.model_dir),
            "tree": vars(stack.tree),
            "prompts": len(prompts),
        },
        "complete": len(rows) == len(prompts) * len(modes),
        "rows": rows,
        "summary": summarize(rows, modes, params.greedy),
        # What `--tree-budget auto` chose by the end, and the candidates it weighed.
        **({"auto_budget": auto.budget.report()} if auto is not None else {}),
    }


def _eagle_variant_engine(stack: Stack, mode: str) -> Engine:
    match = EAGLE_VARIANT.match(mode)
    if match.group(1) == "auto":
        return auto_engine(stack)
    depth, top_k, total = (int(g) for g in match.groups()[1:])
    try:
        tree = TreeConfig("dynamic", depth, top_k, total)
    except ValueError as e:
        raise InputError(f"bench mode {mode}: {e}") from None
    return Engine(stack.target, stack.head, tree, max_tree_nodes=max(128, total + 1))


def _eagle_variant(engines: dict[str, Engine], mode: str) -> ModeRunner:
    return lambda ids, p, s: _engine_run(engines[mode].generate(ids, p, s, "eagle"))


def _engine_run(res) -> ModeRun:
    rounds = res.rounds
    per_round = None
    if rounds:
        per_round = {"draft_ms": 1e3 * statistics.fmean(r.draft_s for r in rounds),
                     "verify_ms": 1e3 * statistics.fmean(r.verify_s for r in rounds)}
    return ModeRun(res.token_ids, res.tau, [r.accepted for r in rounds], per_round)


def _captured_since(captures: int) -> list[str]:
    """The graphs captured since the process had captured `captures`, named by kind and shape
    (a round's tree and the target storage it ran over)."""
    new = GraphCache.total_captures - captures
    names = []
    for key in list(GraphCache.recent_keys)[-new:] if new else []:
        if isinstance(key, tuple) and key and key[0] == "round":
            tree = key[1]
            names.append(f"round d{tree.depth} k{tree.top_k} n{tree.total_tokens} commits {key[-2]} "
                         f"storage {key[-1]}")
        else:
            names.append(repr(key)[:80])
    return names


def _warm_up_prefills(runners: list[ModeRunner], ids: list[int], params: SamplingParams, largest_graph: int,
                      device: str) -> None:
    """A two-token run per mode from a prompt of every graphed prefill size (the powers of
    two up to the largest graph): a prompt of the timed runs then captures no prefill graph,
    the target's or the head's."""
    tokens = ids * (largest_graph // len(ids) + 1)
    size = 1
    while size <= largest_graph:
        _warm_up(runners, tokens[:size], params, StopCriteria(2), device)
        size *= 2


def _warm_up(runners: list[ModeRunner], ids: list[int], params: SamplingParams, stop: StopCriteria, device: str) -> None:
    """One short untimed run per mode, so that first-call allocation is not measured."""
    for run in runners:
        run(ids, params, stop)
    _sync(device)


def pooled_tau(rows: list[dict]) -> float:
    """Tokens committed per target forward over every round of every row, as the EAGLE papers
    count tau; the mean of per-prompt tau instead weighs a short answer as much as a long one."""
    rounds = [a for r in rows for a in (r.get("accepted_per_round") or [])]
    return sum(a + 1 for a in rounds) / len(rounds) if rounds else 1.0


def summarize(rows: list[dict], modes: list[str], greedy: bool) -> dict:
    per_mode = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        tokens = sum(r["new_tokens"] for r in mine)
        seconds = sum(r["seconds"] for r in mine)
        per_mode[mode] = tokens / seconds if seconds else 0.0
    per_round = {}
    for mode in modes:
        costs = [r["per_round"] for r in rows if r["mode"] == mode and r["per_round"]]
        if costs:
            per_round[mode] = {key: statistics.fmean(c[key] for c in costs) for key in costs[0]}
    eagle_rows = [r for r in rows if r["mode"] == "eagle"]
    speculative = [r for r in rows if r["mode"].startswith("eagle") or r["mode"] == "networked"]
    compared = [r["identical_to_vanilla"] for r in speculative if r["identical_to_vanilla"] is not None]
    vanilla_length = {r["id"]: r["new_tokens"] for r in rows if r["mode"] == "vanilla"}
    matched = {mode: mine for mode in modes if mode != "vanilla"
               if (mine := [r for r in rows if r["mode"] == mode and r.get("tokens_matching_vanilla") is not None])}
    summary = {
        # Token identity is the losslessness check at T=0; under sampling the distributions,
        # not the draws, are what must match, so it is reported but not required.
        "all_identical": all(compared) if greedy and compared else None,
        # Per mode: the share of answers identical to plain decoding's, and the share of
        # plain decoding's tokens each reproduced before its first difference.
        "identical_share": {mode: statistics.fmean(r["identical_to_vanilla"] for r in mine)
                            for mode, mine in matched.items()},
        "matching_token_share": {mode: sum(r["tokens_matching_vanilla"] for r in mine)
                                 / max(1, sum(vanilla_length[r["id"]] for r in mine))
                                 for mode, mine in matched.items()},
        "tau_mean": statistics.fmean(r["tau"] for r in eagle_rows) if eagle_rows else None,
        "tau_pooled": {mode: pooled_tau([r for r in rows if r["mode"] == mode]) for mode in modes},
        "tokens_per_s": per_mode,
        "per_round": per_round,
        "timed_graph_captures": {mode: sum(r.get("graph_captures", 0) for r in rows if r["mode"] == mode)
                                 for mode in modes},
    }
    if "eagle" in per_mode and "vanilla" in per_mode and per_mode["vanilla"]:
        summary["speedup_vs_vanilla"] = per_mode["eagle"] / per_mode["vanilla"]
    for hf in ("hf", "hf-dynamic", "hf-static"):
        if "eagle" in per_mode and per_mode.get(hf):
            summary["speedup_vs_" + hf.replace("-", "_")] = per_mode["eagle"] / per_mode[hf]
    fixed = [tps for m, tps in per_mode.items() if EAGLE_VARIANT.match(m) and m != "eagle-auto"]
    if "eagle-auto" in per_mode and fixed:
        summary["auto_vs_best_fixed"] = per_mode["eagle-auto"] / max(fixed)
    if "eagle" in per_mode and "networked" in per_mode and per_mode["eagle"]:
        summary["networked_vs_in_process"] = per_mode["networked"] / per_mode["eagle"]
    return summary


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def format_table(result: dict) -> str:
    s = result["summary"]
    lines = [f"machine: {result['machine'].get('gpu', result['machine']['cpu'])}, torch {result['machine']['torch']}",
             "| mode | tokens/s | tau pooled | tau, mean of prompts | ms per round: draft | verify | wire | bytes per round |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, tps in s["tokens_per_s"].items():
        taus = [r["tau"] for r in result["rows"] if r["mode"] == mode]
        cost = s.get("per_round", {}).get(mode)
        split = " | ".join(f"{cost[k]:.1f}" if cost and k in cost else "-" for k in ("draft_ms", "verify_ms", "wire_ms"))
        size = f"{cost['request_bytes'] + cost['response_bytes']:.0f}" if cost and "request_bytes" in cost else "-"
        pooled = s.get("tau_pooled", {}).get(mode, 1.0)
        lines.append(f"| {mode} | {tps:.1f} | {pooled:.2f} | {statistics.fmean(taus):.2f} | {split} | {size} |")
    keys = ("speedup_vs_vanilla", "speedup_vs_hf", "speedup_vs_hf_dynamic", "speedup_vs_hf_static",
            "networked_vs_in_process", "auto_vs_best_fixed", "all_identical")
    for key in keys:
        if key in s and s[key] is not None:
            value = f"{s[key]:.2f}x" if isinstance(s[key], float) else str(s[key]).lower()
            lines.append(f"{key}: {value}")
    for mode, share in s.get("identical_share", {}).items():
        if share < 1:
            lines.append(f"{mode}: {100 * share:.0f}% of answers identical to vanilla, "
                         f"{100 * s['matching_token_share'][mode]:.1f}% of vanilla's tokens before the first difference")
    if "auto_budget" in result:
        choice = result["auto_budget"]["choice"]
        lines.append(f"eagle-auto's choice at the end: {choice['total_tokens']} tokens, depth {choice['depth']}")
    return "\n".join(lines)
