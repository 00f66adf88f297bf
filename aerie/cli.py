"""The `aerie` command line. User errors end as one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from aerie.errors import AerieError, InputError

DEMO_PROMPT = "Explain in a few sentences why the sky is blue."


def _add_model_args(p: argparse.ArgumentParser, head: bool = True, compiled: str | None = "cuda") -> None:
    """The model options; `compiled` is the default of --compiled-forward (None: no such option)."""
    p.add_argument("--model", default=None, help="HF model directory or .gguf file (default: the SmolLM2 demo)")
    if head:
        p.add_argument("--head", default=None, help="EAGLE-1/EAGLE-3 head directory (default: the shipped one)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--kv-cache", choices=("auto", "static", "dynamic"), default="auto",
                   help="static: preallocated KV caches and CUDA graphs; auto: static on cuda, dynamic on cpu")
    if compiled is not None:
        p.add_argument("--compiled-forward", choices=("cuda", "always", "never"), default=compiled,
                       help="with static caches, run the forwards compiled (torch.compile: one decoder layer, run by "
                            f"every layer, and the head's step; compiled before the first tokens, faster after): "
                            f"on cuda only, also on the cpu, or never "
                            f"(default: {compiled})")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aerie", description="Lossless EAGLE speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate one answer")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--mode", choices=("eagle", "vanilla"), default="eagle")
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    gen.add_argument("--gateway", default=None, help="stream through a running gateway at ADDR")
    gen.add_argument("--api-key", default=None, help="the gateway's API key (default: $AERIE_API_KEY)")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument("--tree-budget", choices=("fixed", "auto"), default="fixed",
                     help="auto: choose each round's tree size and depth from measured acceptance and costs")
    _add_model_args(gen, compiled="never")  # one answer: compiling would cost more than it saves
    _add_sampling_args(gen)
    _add_gateway_tls_args(gen)
    gen.set_defaults(handler=cmd_generate)

    bench = sub.add_parser("bench", help="compare eagle, vanilla, transformers generate and the networked split")
    bench.add_argument("--prompts", required=True, help="JSONL with 'prompt' or 'turns' per line")
    bench.add_argument("--limit", type=int, default=None)
    bench.add_argument("--modes", default="eagle,vanilla,hf",
                       help="any of eagle, vanilla, hf-dynamic (or hf), hf-static, networked (eagle through verify, "
                       "draft and gateway processes), eagle-auto (--tree-budget auto) and eagle-d<D>-k<K>-n<N> "
                       "(a fixed tree of depth D, top-k K, N nodes)")
    bench.add_argument("--out", required=True)
    _add_model_args(bench)
    _add_sampling_args(bench)
    bench.set_defaults(handler=cmd_bench)

    cost = sub.add_parser("verify-cost", help="verify forward time against tree size, and the bandwidth floor")
    cost.add_argument("--shapes", default="demo,llama-8b",
                      help="demo (SmolLM2), llama-8b and llama-70b (random weights, built in place)")
    cost.add_argument("--tensor-parallel", type=int, default=1,
                      help="shard the random-weight shapes over this many GPUs (gloo processes on --device cpu)")
    cost.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    cost.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    cost.add_argument("--no-graphs", action="store_true", help="run the forwards eagerly")
    cost.add_argument("--out", required=True)
    cost.set_defaults(handler=cmd_verify_cost)

    prof = sub.add_parser("profile", help="one generation per mode under the torch profiler: trace and per-round counts")
    prof.add_argument("--prompts", required=True, help="JSONL with 'prompt' or 'turns' per line (the first is used)")
    prof.add_argument("--modes", default="eagle,vanilla")
    prof.add_argument("--out", required=True, help="directory for the traces and profile.json")
    _add_model_args(prof)
    prof.add_argument("--max-new-tokens", type=int, default=64)
    prof.set_defaults(handler=cmd_profile)

    batch = sub.add_parser("bench-batch", help="tokens/s of many concurrent sessions: eagle vs plain batched decoding")
    batch.add_argument("--prompts", required=True, help="JSONL with 'prompt' or 'turns' per line")
    batch.add_argument("--limit", type=int, default=64)
    batch.add_argument("--concurrency", default="1,4,16,64", help="comma-separated numbers of sessions at a time")
    batch.add_argument("--modes", default="eagle,vanilla",
                       help="eagle, vanilla and eagle-d<D>-k<K>-n<N> (a fixed tree of depth D, top-k K, N nodes)")
    batch.add_argument("--shape", choices=("llama-8b",), default=None,
                       help="a random-weight Llama-3-8B-shaped target and head instead of --model")
    batch.add_argument("--no-graphs", action="store_true", help="run the forwards eagerly")
    batch.add_argument("--out", required=True)
    _add_model_args(batch, compiled=None)  # the batched engine does not compile whole
    _add_sampling_args(batch)
    batch.set_defaults(handler=cmd_bench_batch)

    host = sub.add_parser("host-work", help="eager ops and host time per batched round, counted on the CPU")
    host.add_argument("--sessions", default="1,4,16,64", help="comma-separated numbers of sessions at a time")
    host.add_argument("--modes", default="eagle,vanilla", help="as bench-batch: eagle, vanilla, eagle-d<D>-k<K>-n<N>")
    host.add_argument("--max-new-tokens", type=int, default=24)
    host.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; above, every session samples")
    host.add_argument("--out", required=True)
    host.set_defaults(handler=cmd_host_work)

    demo = sub.add_parser("demo", help="one answer on the demo model, with tokens/s and tau")
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.add_argument("--in-process", action="store_true", help="skip the services, run in one process")
    _add_model_args(demo, compiled="never")
    demo.set_defaults(handler=cmd_demo)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    # Training and the services live outside the core; import them only when present.
    try:
        from aerie.train.cli import add_train_parser
    except ImportError:
        pass
    else:
        add_train_parser(sub)
    try:
        from gateway.cli import add_loadtest_parser, add_serve_parser

        # Both import the services' dependencies (grpc health, ...) as they register.
        add_serve_parser(sub)
        add_loadtest_parser(sub)
    except ImportError:
        pass


def _add_gateway_tls_args(p: argparse.ArgumentParser) -> None:
    """--tls-ca, --tls-cert, --tls-key, --tls-server-name (or AERIE_TLS_*) for --gateway."""
    from aerie_rpc.config import add_arguments
    from aerie_rpc.tls import TlsClientOptions

    add_arguments(p, TlsClientOptions)


def _gateway_tls(args):
    from aerie_rpc.config import from_args
    from aerie_rpc.tls import TlsClientOptions, load_tls

    tls = load_tls(from_args(TlsClientOptions, args))
    if tls.cert is not None and not tls.dialing:
        raise AerieError("--tls-cert is a client certificate here, sent only over TLS: add --tls-ca")
    return tls


def _sampling(args):
    from aerie.sampling import SamplingParams
    from aerie.verifier import StopCriteria

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    return params, StopCriteria(args.max_new_tokens)


def cmd_generate(args) -> int:
    params, stop = _sampling(args)
    if args.gateway:
        from gateway.cli import generate_via_gateway

        # The services chose these when they started; silently ignoring them would mislead.
        local = {"--mode": args.mode != "eagle", "--model": args.model is not None, "--head": args.head is not None,
                 "--device": args.device != "cpu", "--dtype": args.dtype != "float32",
                 "--kv-cache": args.kv_cache != "auto", "--compiled-forward": args.compiled_forward != "never",
                 "--tree-budget": args.tree_budget != "fixed"}
        if any(local.values()):
            given = ", ".join(flag for flag, set_ in local.items() if set_)
            raise InputError(f"{given} cannot apply with --gateway: the services' own settings decide them")

        result = generate_via_gateway(
            args.gateway, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, seed=args.seed, chat=not args.no_chat,
            api_key=args.api_key or os.environ.get("AERIE_API_KEY"), tls=_gateway_tls(args),
        )
    else:
        from aerie.engine import Engine
        from aerie.stack import load_stack
        from aerie.verifier import StopCriteria

        stack = load_stack(args.model, args.head, args.device, args.dtype, need_head=args.mode == "eagle",
                           kv_cache=args.kv_cache, compiled_forward=args.compiled_forward)
        ids = stack.encode_prompt(args.prompt, chat=not args.no_chat)
        engine = Engine(stack.target, stack.head, stack.tree)
        if args.tree_budget == "auto" and args.mode == "eagle":
            from aerie.budget import auto_engine

            engine = auto_engine(stack)
        res = engine.generate(ids, params, StopCriteria(stop.max_new_tokens, stack.stop_token_ids()), args.mode)
        result = {
            "text": stack.decode(res.token_ids),
            "token_ids": res.token_ids,
            "new_tokens": res.new_tokens,
            "tau": res.tau,
            "tokens_per_s": res.tokens_per_s,
            "rounds": len(res.rounds),
        }
    if args.json:
        print(json.dumps(result))
    else:
        print(result["text"])
        print(f"\n[{result['new_tokens']} tokens, {result['tokens_per_s']:.1f} tok/s, tau {result['tau']:.2f}]",
              file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from contextlib import ExitStack

    from aerie.bench.harness import format_table, run_bench
    from aerie.bench.prompts import read_prompts
    from aerie.stack import load_stack

    params, stop = _sampling(args)
    prompts = read_prompts(args.prompts, args.limit)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    speculative = any(m.startswith("eagle") or m == "networked" for m in modes)
    stack = load_stack(args.model, args.head, args.device, args.dtype, need_head=speculative, kv_cache=args.kv_cache,
                       compiled_forward=args.compiled_forward)
    with ExitStack() as services:
        extra = {}
        if "networked" in modes:
            from gateway.bench import NetworkedMode

            extra["networked"] = services.enter_context(
                NetworkedMode(args.model, args.head, args.device, args.dtype, str(stack.model_dir))
            )
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)

        def write(result: dict) -> None:
            out.write_text(json.dumps(result, indent=2) + "\n")

        result = run_bench(stack, prompts, modes, stop.max_new_tokens, params, args.device, extra, on_prompt=write)
    write(result)
    print(format_table(result))
    return 0


def cmd_verify_cost(args) -> int:
    from aerie.bench.verify_cost import format_verify_cost, run_verify_cost
    from aerie.models import parse_dtype

    shapes = [s for s in args.shapes.split(",") if s]
    if args.tensor_parallel < 1:
        raise InputError(f"--tensor-parallel must be >= 1, got {args.tensor_parallel}")
    if args.tensor_parallel > 1:
        result = _sharded_verify_cost(shapes, args)
    else:
        result = run_verify_cost(shapes, args.device, parse_dtype(args.dtype), graphs=not args.no_graphs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(format_verify_cost(result))
    return 0


def _sharded_verify_cost(shapes: list[str], args) -> dict:
    from aerie.bench.harness import machine_info
    from aerie.bench.verify_cost import SHAPES
    from aerie.bench.verify_cost_tp import run_sharded_verify_cost
    from aerie.models import parse_dtype

    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise InputError(f"--tensor-parallel measures the random-weight shapes ({', '.join(SHAPES)}), not {', '.join(unknown)}")
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < args.tensor_parallel:
            raise InputError(f"--tensor-parallel {args.tensor_parallel} needs that many GPUs; torch sees "
                             f"{torch.cuda.device_count()}")
    results = [run_sharded_verify_cost(name, SHAPES[name](), args.tensor_parallel, args.device, parse_dtype(args.dtype),
                                       graphs=not args.no_graphs) for name in shapes]
    return {"machine": machine_info(args.device), "copy_bandwidth_gbs": results[0]["copy_bandwidth_gbs"],
            "graphs": results[0]["graphs"], "dtype": args.dtype, "tensor_parallel": args.tensor_parallel,
            "shapes": results}


def cmd_profile(args) -> int:
    from aerie.bench.profile import format_profile, profile_modes
    from aerie.bench.prompts import read_prompts
    from aerie.stack import load_stack

    prompt = read_prompts(args.prompts, 1)[0]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    stack = load_stack(args.model, args.head, args.device, args.dtype, need_head="eagle" in modes,
                       kv_cache=args.kv_cache, compiled_forward=args.compiled_forward)
    summary = profile_modes(stack, stack.encode_prompt(prompt.text), modes, args.max_new_tokens, Path(args.out))
    print(format_profile(summary))
    return 0


def cmd_host_work(args) -> int:
    from aerie.bench.host_work import format_host_work, run_host_work
    from aerie.sampling import SamplingParams
    from aerie.stack import GPU_TREE

    try:
        sessions = [int(c) for c in args.sessions.split(",") if c.strip()]
    except ValueError:
        raise InputError(f"--sessions takes comma-separated integers, got {args.sessions!r}") from None
    if not sessions or min(sessions) < 1:
        raise InputError(f"--sessions needs numbers >= 1, got {args.sessions!r}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    params = SamplingParams(temperature=args.temperature)
    result = run_host_work(modes, sessions, GPU_TREE, args.max_new_tokens, params,
                           progress=lambda s: print(s, file=sys.stderr))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_host_work(result))
    return 0


def cmd_bench_batch(args) -> int:
    from aerie.batch.engine import BatchConfig
    from aerie.bench.batch import BatchBenchSetup, format_batch_table, llama_8b_setup, run_bench_batch, tree_for_mode
    from aerie.bench.prompts import read_prompts
    from aerie.errors import InputError
    from aerie.models import parse_dtype
    from aerie.stack import CPU_TREE, GPU_TREE, load_stack

    params, stop = _sampling(args)
    prompts = read_prompts(args.prompts, args.limit)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        raise InputError(f"--concurrency takes comma-separated integers, got {args.concurrency!r}") from None
    tree = GPU_TREE if args.device == "cuda" else CPU_TREE
    speculative = any(tree_for_mode(m, tree) is not None for m in modes)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for, but torch sees no CUDA device")
    if args.shape == "llama-8b":
        if args.model is not None:
            raise InputError("--shape and --model exclude each other")
        setup = llama_8b_setup(args.device, parse_dtype(args.dtype), [p.text for p in prompts],
                               [p.id for p in prompts], tree, speculative)
    else:
        stack = load_stack(args.model, args.head, args.device, args.dtype, need_head=speculative, tree=tree,
                           kv_cache="dynamic")
        setup = BatchBenchSetup(stack.target, stack.head, stack.tree, [stack.encode_prompt(p.text) for p in prompts],
                                [p.id for p in prompts], stack.stop_token_ids(), str(stack.model_dir))
    result = run_bench_batch(setup, modes, levels, stop.max_new_tokens, params, args.device,
                             BatchConfig(cuda_graphs=not args.no_graphs))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_batch_table(result))
    return 0


def cmd_demo(args) -> int:
    if not args.in_process:
        try:
            from gateway.demo import run_networked_demo
        except ImportError:
            pass
        else:
            run_networked_demo(args.model, args.head, args.prompt, args.max_new_tokens, args.device, args.dtype)
            return 0
    from aerie.engine import Engine
    from aerie.sampling import SamplingParams
    from aerie.stack import load_stack
    from aerie.verifier import StopCriteria

    stack = load_stack(args.model, args.head, args.device, args.dtype, kv_cache=args.kv_cache,
                       compiled_forward=args.compiled_forward)
    engine = Engine(stack.target, stack.head, stack.tree)
    ids = stack.encode_prompt(args.prompt)
    stop = StopCriteria(args.max_new_tokens, stack.stop_token_ids())
    res = engine.generate(ids, SamplingParams(), stop, "eagle")
    print(f"> {args.prompt}\n")
    print(stack.decode(res.token_ids))
    print(f"\n{res.new_tokens} tokens in {res.seconds:.2f} s: {res.tokens_per_s:.1f} tokens/s, "
          f"tau {res.tau:.2f} over {len(res.rounds)} rounds")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except AerieError as e:
        print(f"aerie: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

