"""Plots and tables from a GPU benchmark run (`scripts/gpu_bench.sh`): tokens/s per mode,
the verify cost curve against the bandwidth floor, the histogram of accepted lengths, the
tree-budget sweep and batched throughput against concurrent sessions.

    python -m aerie.bench.figures RUN_DIR OUT_DIR

writes OUT_DIR/*.png and prints markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path


def load(run: Path, name: str) -> dict | None:
    path = run / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def modes_table(result: dict, title: str) -> str:
    s = result["summary"]
    taus = {}
    for r in result["rows"]:
        taus.setdefault(r["mode"], []).append(r["tau"])
    lines = [f"**{title}** ({result['config']['prompts']} prompts, {result['config']['max_new_tokens']} new tokens, "
             f"T={result['config']['temperature']:g}, {result['config']['dtype']})", "",
             "| mode | tokens/s | tau | draft ms / round | verify ms / round |", "|---|---|---|---|---|"]
    for mode, tps in s["tokens_per_s"].items():
        cost = s.get("per_round", {}).get(mode, {})
        tau = sum(taus[mode]) / len(taus[mode])
        d, v = cost.get("draft_ms"), cost.get("verify_ms")
        lines.append(f"| {mode} | {tps:.1f} | {tau:.2f} | {'' if d is None else f'{d:.2f}'} | "
                     f"{'' if v is None else f'{v:.2f}'} |")
    extras = [f"{k}: {v:.2f}x" for k, v in s.items() if k.startswith(("speedup", "auto_vs", "networked_vs"))]
    extras.append(f"all_identical: {s.get('all_identical')}")
    return "\n".join(lines + ["", "; ".join(extras)])


def accepted_histogram(result: dict, mode: str = "eagle") -> Counter:
    hist: Counter = Counter()
    for r in result["rows"]:
        if r["mode"] == mode and r["accepted_per_round"]:
            hist.update(r["accepted_per_round"])
    return hist


def plot_all(run: Path, out: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("aerie: error: plotting needs matplotlib: pip install -e '.[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    main, side = load(run, "mtbench_t0"), load(run, "side_by_side")
    hf_static = load(run, "mtbench_t0_hf_static")  # gpu_bench.sh runs hf-static in a process of its own
    if main:
        gpu = main["machine"].get("gpu", main["machine"]["cpu"])
        rates = dict(main["summary"]["tokens_per_s"])
        # Starred: from another run of the same script (another process, the same machine).
        if hf_static and "hf-static" in hf_static["summary"]["tokens_per_s"]:
            rates["hf-static*"] = hf_static["summary"]["tokens_per_s"]["hf-static"]
        if side and "hf-dynamic" in side["summary"]["tokens_per_s"]:
            rates["hf-dynamic*"] = side["summary"]["tokens_per_s"]["hf-dynamic"]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.bar(list(rates), list(rates.values()), color=["#2b6cb0" if m == "eagle" else "#999" for m in rates])
        for i, v in enumerate(rates.values()):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"MT-bench, T=0, batch 1 - {gpu}", fontsize=9)
        written.append(_save(fig, out / "gpu_tokens_per_s.png"))

        hist = accepted_histogram(main)
        if hist:
            fig, ax = plt.subplots(figsize=(6, 3))
            keys = range(0, max(hist) + 1)
            total = sum(hist.values())
            ax.bar(list(keys), [hist.get(k, 0) / total for k in keys], color="#2b6cb0")
            ax.set_xlabel("draft tokens accepted in a round")
            ax.set_ylabel("share of rounds")
            ax.set_title(f"Accepted lengths, MT-bench T=0 ({total} rounds) - {gpu}", fontsize=9)
            written.append(_save(fig, out / "gpu_accepted_lengths.png"))

    cost = load(run, "verify_cost")
    if cost:
        shapes = cost["shapes"]
        fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 3.2))
        axes = axes if len(shapes) > 1 else [axes]
        for ax, s in zip(axes, shapes):
            sizes = [p["tree_size"] for p in s["curve"]]
            ax.plot(sizes, [p["ms_median"] for p in s["curve"]], "o-", label="verify call (host work included)")
            ax.fill_between(sizes, [p["ms_p10"] for p in s["curve"]], [p["ms_p90"] for p in s["curve"]], alpha=0.2)
            if s["curve"][0].get("device_ms") is not None:
                ax.plot(sizes, [p["device_ms"] for p in s["curve"]], "s-", label="graph replay alone (device)")
            ax.axhline(s["bandwidth_floor_ms"], color="r", ls="--", label="weights / copy bandwidth")
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_xlabel("tokens in the tree")
            ax.set_ylabel("ms")
            ax.set_title(f"{s['shape']} ({s['weights_gb']:.1f} GB)", fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle(f"Verify cost against tree size - {cost['machine'].get('gpu', '')}", fontsize=9)
        written.append(_save(fig, out / "gpu_verify_cost.png"))

    sweep = load(run, "budget_sweep")
    if sweep:
        rates = sweep["summary"]["tokens_per_s"]
        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        colors = {"eagle-auto": "#c05621", "vanilla": "#999"}
        ax.barh(list(rates), list(rates.values()), color=[colors.get(m, "#2b6cb0") for m in rates])
        for i, v in enumerate(rates.values()):
            ax.text(v, i, f" {v:.0f}", va="center", fontsize=8)
        ax.set_xlabel("tokens/s")
        ax.set_title(f"Tree budget, MT-bench first {sweep['config']['prompts']} - "
                     f"{sweep['machine'].get('gpu', sweep['machine']['cpu'])}", fontsize=9)
        written.append(_save(fig, out / "gpu_budget_sweep.png"))

    batches = [(name, b) for name in ("batch_demo", "batch_8b") if (b := load(run, name))]
    if batches:
        fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.2))
        axes = axes if len(batches) > 1 else [axes]
        for ax, (name, b) in zip(axes, batches):
            for mode, by_c in b["summary"]["tokens_per_s"].items():
                levels = sorted(by_c, key=int)
                ax.plot([int(c) for c in levels], [by_c[c] for c in levels], "o-", label=mode)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("concurrent sessions")
            ax.set_ylabel("total tokens/s")
            ax.set_title(f"{b['config']['model'].rstrip('/').split('/')[-1]}, {b['config']['max_new_tokens']} new tokens",
                         fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle(f"Batched decoding - {batches[0][1]['machine'].get('gpu', '')}", fontsize=9)
        written.append(_save(fig, out / "gpu_batch.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    run, out = Path(argv[0]), Path(argv[1])
    for path in plot_all(run, out):
        print(f"wrote {path}")
    for name, title in (("mtbench_t0", "MT-bench T=0"), ("side_by_side", "hf-dynamic beside eagle"),
                        ("budget_sweep", "tree budget sweep"), ("networked", "networked split"),
                        ("humaneval_t0", "HumanEval T=0"), ("mtbench_t1", "MT-bench T=1"),
                        ("mtbench_t0_fp32", "MT-bench T=0, float32")):
        result = load(run, name)
        if result:
            print("\n" + modes_table(result, title))
    cost = load(run, "verify_cost")
    if cost:
        from aerie.bench.verify_cost import format_verify_cost

        print(f"\ncopy bandwidth {cost['copy_bandwidth_gbs']:.0f} GB/s\n" + format_verify_cost(cost))
    for name in ("batch_demo", "batch_8b"):
        result = load(run, name)
        if result:
            from aerie.bench.batch import format_batch_table

            print(f"\n**{name}**\n" + format_batch_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
