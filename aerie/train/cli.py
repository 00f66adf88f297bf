"""`aerie train datagen | eagle3 | eagle1 | eval`: argument parsing and handlers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aerie.errors import InputError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_GSM8K = REPO.parent / "shared" / "benchmarks" / "gsm8k_train.jsonl"


def add_train_parser(subparsers) -> None:
    train = subparsers.add_parser("train", help="make training data, train EAGLE heads, measure tau")
    sub = train.add_subparsers(dest="train_command", required=True)

    gen = sub.add_parser("datagen", help="self-distillation: the target answers the training prompts")
    _model_args(gen)
    gen.add_argument("--out", required=True, help="data directory (shards + manifest.json); reruns resume")
    gen.add_argument("--gsm8k", default=str(DEFAULT_GSM8K), help="GSM8K training questions (JSONL, field 'question')")
    gen.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    gen.add_argument("--max-new-tokens", type=int, default=512)
    gen.add_argument("--batch-size", type=int, default=64, help="prompts per shard: per generate call, or the batch engine's rows")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy answers (best for T=0 acceptance)")
    gen.add_argument("--made-scale", type=float, default=1.0, help="scale the number of made (non-GSM8K) prompts")
    gen.add_argument("--max-seconds", type=float, default=None, help="start no new shard after this long")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--part", default="0/1", metavar="K/N",
                     help="answer only every N-th shard from shard K: N processes, each with its own --out, share the prompts")
    gen.add_argument("--engine", choices=("generate", "batch"), default="generate",
                     help="generate: transformers' generate (dynamic cache); batch: our batched engine "
                          "(static caches and CUDA graphs on a GPU, continuous batching)")
    gen.set_defaults(handler=cmd_datagen)

    for kind in ("eagle3", "eagle1"):
        p = sub.add_parser(kind, help=f"train an {kind.upper().replace('EAGLE', 'EAGLE-')} head on datagen output")
        _model_args(p)
        p.add_argument("--data", required=True, nargs="+", help="datagen output directories (greedy and sampled answers, say)")
        p.add_argument("--out", required=True, help="head directory (config.json, model.safetensors, logs, plot)")
        p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
        p.add_argument("--epochs", type=float, default=3.0)
        p.add_argument("--lr", type=float, default=3e-4)
        p.add_argument("--min-lr-ratio", type=float, default=0.1)
        p.add_argument("--warmup-steps", type=int, default=100)
        p.add_argument("--weight-decay", type=float, default=0.0)
        p.add_argument("--grad-clip", type=float, default=0.5)
        p.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per batch")
        p.add_argument("--max-len", type=int, default=2048, help="cut longer sequences")
        p.add_argument("--holdout", type=float, default=0.02, help="fraction of samples held out for acceptance")
        p.add_argument("--log-every", type=int, default=10)
        p.add_argument("--eval-every", type=int, default=200)
        p.add_argument("--save-every", type=int, default=200)
        p.add_argument("--max-minutes", type=float, default=None, help="shorten the schedule to fit this time")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
        p.add_argument("--init", default=None, metavar="HEAD",
                       help="start from this trained head (its weights and draft vocabulary), e.g. to train it on more data")
        if kind == "eagle3":
            p.add_argument("--ttt-steps", type=int, default=7, help="training-time-test unroll steps")
            p.add_argument("--step-decay", type=float, default=0.8, help="loss weight decay**k of step k")
            p.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary size")
        else:
            p.add_argument("--feature-weight", type=float, default=1.0)
            p.add_argument("--ce-weight", type=float, default=0.1)
            p.add_argument("--noise", type=float, default=0.2, help="uniform input-feature noise width")
        p.set_defaults(handler=cmd_train, kind=kind)

    ev = sub.add_parser("eval", help="tau and per-depth acceptance of a head on a prompt set")
    _model_args(ev)
    ev.add_argument("--head", required=True, help="head directory")
    ev.add_argument("--prompts", required=True, help="JSONL(.gz) with 'prompt' or 'turns' per line")
    ev.add_argument("--limit", type=int, default=None)
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--temperature", type=float, default=0.0)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--tree", choices=("dynamic", "chain"), default="dynamic")
    ev.add_argument("--depth", type=int, default=None, help="draft depth (default 8 on cuda, 6 on cpu)")
    ev.add_argument("--top-k", type=int, default=None, help="dynamic tree top-k (default 10 on cuda, 8 on cpu)")
    ev.add_argument("--total-tokens", type=int, default=None, help="dynamic tree nodes (default 60 on cuda, 16 on cpu)")
    ev.add_argument("--workers", type=int, default=1, help="processes sharing the prompts")
    ev.add_argument("--check-vanilla", type=int, default=0, help="also decode the first N prompts plainly and compare")
    ev.add_argument("--out", required=True, help="JSON file for the results")
    ev.set_defaults(handler=cmd_eval)

    rep = sub.add_parser("report", help="EAGLE-1 vs EAGLE-3 heads, T=0 and T=1, chain vs dynamic tree: tau tables")
    _model_args(rep)
    rep.add_argument("--head", action="append", required=True, metavar="NAME=DIR",
                     help="a head to compare (repeat); the first one is the headline")
    rep.add_argument("--prompts", action="append", required=True, metavar="NAME=FILE",
                     help="a prompt set (repeat), JSONL(.gz) with 'prompt' or 'turns' per line")
    rep.add_argument("--limit", type=int, default=None, help="prompts per set")
    rep.add_argument("--max-new-tokens", type=int, default=256)
    rep.add_argument("--depth", type=int, default=None, help="draft depth (default 8 on cuda, 6 on cpu)")
    rep.add_argument("--top-k", type=int, default=None)
    rep.add_argument("--total-tokens", type=int, default=None)
    rep.add_argument("--workers", type=int, default=1, help="processes sharing the prompts")
    rep.add_argument("--minutes", type=float, default=None, help="start no prompt after this long")
    rep.add_argument("--out", required=True, help="directory for report.json and report.md")
    rep.set_defaults(handler=cmd_report)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory or .gguf file (default: the SmolLM2 demo)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (bf16 on cuda)")


def _positive(value, flag: str) -> None:
    if value is not None and value <= 0:
        raise InputError(f"{flag} must be > 0, got {value}")


def _part(text: str) -> tuple[int, int]:
    part, _, parts = text.partition("/")
    if not (part.isdigit() and parts.isdigit() and int(part) < int(parts)):
        raise InputError(f"--part must be K/N with 0 <= K < N (this process's share of N), got {text!r}")
    return int(part), int(parts)


def cmd_datagen(args) -> int:
    from aerie.train.datagen import DatagenConfig, run_datagen
    from aerie.train.loading import encode_chat, load_model, pick_device, pick_dtype, stop_token_ids
    from aerie.train.prompts import training_prompts

    _positive(args.limit, "--limit")
    _positive(args.max_new_tokens, "--max-new-tokens")
    _positive(args.batch_size, "--batch-size")
    if args.temperature < 0:
        raise InputError(f"--temperature must be >= 0, got {args.temperature}")
    prompts = training_prompts(args.gsm8k, seed=args.seed, made_scale=args.made_scale)
    if args.limit:
        prompts = prompts[: args.limit]
    device = pick_device(args.device)
    model, tokenizer, model_dir = load_model(args.model, device, pick_dtype(args.dtype, device))
    stop = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(stop) if stop else 0)
    config = DatagenConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                           temperature=args.temperature, seed=args.seed, engine=args.engine, part=_part(args.part))
    manifest = run_datagen(
        model, lambda text: encode_chat(tokenizer, text), prompts, args.out, config, stop, pad,
        model_name=str(model_dir), max_seconds=args.max_seconds,
    )
    state = "complete" if manifest["complete"] else "partial (rerun to continue)"
    print(f"{manifest['samples']} samples, {manifest['tokens']} tokens in {len(manifest['shards'])} shards: {state}")
    if manifest["new_tokens"]:
        print(f"this run: {manifest['new_tokens']} answer tokens in {manifest['seconds']:.1f} s, "
              f"{manifest['new_tokens'] / manifest['seconds']:.0f} tokens/s")
    return 0


def cmd_train(args) -> int:
    from aerie.train.data import load_datasets, split_holdout
    from aerie.train.loading import load_target, pick_device, pick_dtype
    from aerie.train.trainer import CHECKPOINT, TrainConfig, train

    if args.resume and not (Path(args.out) / CHECKPOINT).is_file():
        raise InputError(f"--resume: '{Path(args.out) / CHECKPOINT}' does not exist")
    if not 0 <= args.holdout < 1:
        raise InputError(f"--holdout must be in [0, 1), got {args.holdout}")
    _positive(args.max_len, "--max-len")
    extra = (
        dict(ttt_steps=args.ttt_steps, step_decay=args.step_decay, draft_vocab=args.draft_vocab)
        if args.kind == "eagle3"
        else dict(feature_weight=args.feature_weight, ce_weight=args.ce_weight, noise=args.noise)
    )
    config = TrainConfig(
        kind=args.kind, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, batch_tokens=args.batch_tokens,
        epochs=args.epochs, steps=args.steps, seed=args.seed, log_every=args.log_every,
        eval_every=args.eval_every, save_every=args.save_every, max_minutes=args.max_minutes, **extra,
    )
    samples, vocab_size = load_datasets(args.data, max_len=args.max_len)
    train_samples, heldout = split_holdout(samples, args.holdout, seed=args.seed)
    device = pick_device(args.device)
    target, _, _ = load_target(args.model, args.kind, device, pick_dtype(args.dtype, device))
    if vocab_size != target.vocab_size:
        raise InputError(f"the data was made for a vocabulary of {vocab_size} tokens, "
                         f"but the target's has {target.vocab_size}: make the data with this model")
    summary = train(target, train_samples, heldout, config, args.out, resume=args.resume, init=args.init)
    acc = summary["heldout"].get("acc", [])
    print(f"{summary['steps']} steps; held-out top-1 agreement per step: " + " ".join(f"{a:.3f}" for a in acc))
    print(f"head written to {args.out}")
    return 0


def _named_paths(values: list[str], flag: str) -> dict[str, str]:
    named: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path or "/" in name:
            raise InputError(f"{flag} takes NAME=PATH (a name without '/'), got {value!r}")
        if name in named:
            raise InputError(f"{flag} {name} is given twice")
        named[name] = path
    return named


def _tree_for(args, device: str):
    from aerie.tree import TreeConfig

    gpu = device == "cuda"
    try:
        if getattr(args, "tree", "dynamic") == "chain":
            return TreeConfig.chain(args.depth or (8 if gpu else 6))
        return TreeConfig("dynamic", args.depth or (8 if gpu else 6), args.top_k or (10 if gpu else 8),
                          args.total_tokens or (60 if gpu else 16))
    except ValueError as e:
        raise InputError(str(e)) from None


def cmd_report(args) -> int:
    from aerie.train.loading import pick_device
    from aerie.train.report import run_report

    _positive(args.max_new_tokens, "--max-new-tokens")
    _positive(args.workers, "--workers")
    heads = _named_paths(args.head, "--head")
    prompts = _named_paths(args.prompts, "--prompts")
    device = pick_device(args.device)
    summaries = run_report(
        args.model, heads, prompts, args.out, device, args.dtype, _tree_for(args, device),
        max_new_tokens=args.max_new_tokens, workers=args.workers, minutes=args.minutes, limit=args.limit,
    )
    print((Path(args.out) / "report.md").read_text(), end="")
    ran = sum(s["n_prompts"] for s in summaries.values())
    print(f"{ran} prompt runs over {len(summaries)} cells; results in {args.out}")
    return 0


def cmd_eval(args) -> int:
    from aerie.bench.harness import machine_info
    from aerie.bench.prompts import read_prompts
    from aerie.train.evaluate import EvalCell, format_table, run_cells
    from aerie.train.loading import pick_device

    _positive(args.max_new_tokens, "--max-new-tokens")
    _positive(args.workers, "--workers")
    if args.temperature < 0:
        raise InputError(f"--temperature must be >= 0, got {args.temperature}")
    device = pick_device(args.device)
    tree = _tree_for(args, device)
    prompts = read_prompts(args.prompts, args.limit)
    cell = EvalCell(name="eval", head=args.head, prompts=args.prompts, temperature=args.temperature, tree=tree,
                    max_new_tokens=args.max_new_tokens, seed=args.seed)
    summaries = run_cells(args.model, [cell], {args.prompts: prompts}, device, args.dtype, args.workers, args.check_vanilla)
    result = summaries["eval"]
    result["machine"] = machine_info(device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(summaries))
    if result["vanilla_mismatches"]:
        print(f"warning: {result['vanilla_mismatches']} prompts differ from plain decoding", file=sys.stderr)
    return 0
