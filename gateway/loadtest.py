"""`aerie loadtest` (or `python -m gateway.loadtest`): N concurrent client sessions for D seconds
through the gateway's gRPC API, against two verify and two draft services and a gateway started
on free loopback ports (gateway/cluster.py) over a tiny random-weight target on the CPU
(aerie/tiny.py). `--kill-verifier-at S` SIGKILLs one verifier S seconds in: the gateway's
resume should keep that from the clients.

Reports request latency and time to first token (p50, p99), tokens/s, requests completed,
errors by gRPC status, outputs that differ from the in-process engine's, resumes, and the RSS of
every service process (at the start of the load, its peak, at the end). Loopback only; RSS is
read from /proc, so Linux only. The figures are about the serving machinery under concurrency
(gRPC, sessions, resumes, memory), not about a real model's speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from aerie_rpc.server import channel
from aerie_rpc.v1 import gateway_pb2, gateway_pb2_grpc
from gateway import client
from gateway.cluster import LocalCluster

KILLED = "verify0"


@dataclass(frozen=True)
class LoadSettings:
    sessions: int = 64
    duration_s: float = 60.0
    max_requests: int = 0  # 0: as many as fit in duration_s
    max_new_tokens: int = 48
    prompts: int = 8  # each sent greedy and sampled
    kill_verifier_at: float | None = None
    verifiers: int = 2
    drafters: int = 2
    redis: str | None = None
    request_timeout_s: float = 120.0
    progress_s: float = 5.0
    sample_s: float = 1.0
    seed: int = 0

    def check(self) -> None:
        from aerie.errors import InputError

        if min(self.sessions, self.max_new_tokens, self.prompts, self.drafters) < 1 or self.duration_s <= 0 \
                or self.max_requests < 0:
            raise InputError("--sessions, --max-new-tokens, --prompts and --drafters must be >= 1, --duration-s > 0 "
                             "and --max-requests >= 0")
        if self.kill_verifier_at is not None:
            if not 0 <= self.kill_verifier_at < self.duration_s:
                raise InputError("--kill-verifier-at must fall within --duration-s")
            if self.verifiers < 2:
                raise InputError("--kill-verifier-at needs --verifiers 2 or more (one must survive)")


# --- the workload ------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One kind of request; every request of a kind must stream the same tokens."""

    prompt: tuple[int, ...]
    temperature: float
    seed: int
    expected: tuple[int, ...] = ()


def make_variants(vocab: int, count: int, seed: int) -> list[Variant]:
    """Prompts of 4 to 24 random ids, each greedy and sampled (T=1, a seed of its own)."""
    rng = random.Random(seed)
    prompts = [tuple(rng.randrange(vocab) for _ in range(rng.randint(4, 24))) for _ in range(count)]
    return [Variant(p, t, seed + i) for i, p in enumerate(prompts) for t in (0.0, 1.0)]


def with_expected(variants: list[Variant], model_dir: Path, head_dir: Path, max_new: int) -> list[Variant]:
    """Each variant's output from the in-process engine: the networked output must equal it
    (lossless), resumed or not."""
    from aerie.engine import Engine
    from aerie.sampling import SamplingParams
    from aerie.stack import load_stack
    from aerie.verifier import StopCriteria

    stack = load_stack(str(model_dir), str(head_dir))
    engine = Engine(stack.target, stack.head, stack.tree)
    stop = StopCriteria(max_new, frozenset())
    return [Variant(v.prompt, v.temperature, v.seed, tuple(engine.generate(
        list(v.prompt), SamplingParams(temperature=v.temperature, seed=v.seed), stop, "eagle").token_ids))
        for v in variants]


def request_of(v: Variant, max_new: int) -> gateway_pb2.GenerateRequest:
    req = client.request(prompt_ids=list(v.prompt), max_new_tokens=max_new, temperature=v.temperature, seed=v.seed)
    req.ignore_eos = True  # every request runs to max_new tokens: equal work, comparable latency
    return req


# --- the clients -------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    start_s: float  # since the load began
    latency_s: float
    first_token_s: float | None = None
    tokens: int = 0
    resumes: int = 0
    error: str | None = None  # the gRPC status a client got, or NO_RESULT
    wrong_output: bool = False


class Tally:
    """Requests started and finished, shared by the client threads."""

    def __init__(self, max_requests: int):
        self.max_requests = max_requests
        self.started = 0
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()

    def begin(self) -> bool:
        with self._lock:
            if self.max_requests and self.started >= self.max_requests:
                return False
            self.started += 1
            return True

    def add(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def snapshot(self) -> tuple[int, list[Outcome]]:
        with self._lock:
            return self.started, list(self.outcomes)


def one_request(stub: gateway_pb2_grpc.GatewayStub, v: Variant, max_new: int, timeout_s: float,
                origin: float) -> Outcome:
    t0 = time.monotonic()
    try:
        out = client.collect(client.stream_on(stub, request_of(v, max_new), timeout_s))
    except client.GatewayError as e:
        return Outcome(t0 - origin, time.monotonic() - t0, error=e.code.name if e.code else "NO_RESULT")
    ids = tuple(out["token_ids"])
    return Outcome(t0 - origin, time.monotonic() - t0, out["first_token_s"], len(ids), out["resumes"],
                   wrong_output=ids != v.expected or tuple(out["streamed_ids"]) != v.expected)


def client_session(index: int, stub: gateway_pb2_grpc.GatewayStub, variants: list[Variant], settings: LoadSettings,
                   tally: Tally, origin: float) -> None:
    """Requests back to back until the time is up (one in flight per session, like a chat)."""
    n = 0
    while time.monotonic() - origin < settings.duration_s and tally.begin():
        v = variants[(index + n) % len(variants)]
        n += 1
        tally.add(one_request(stub, v, settings.max_new_tokens, settings.request_timeout_s, origin))


# --- memory ------------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    """Resident set size of a live process, from /proc (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class MemorySampler:
    """RSS of each service every `period_s`, in a thread of its own."""

    def __init__(self, pids: dict[str, int], period_s: float, origin: float):
        self.pids, self.period_s, self.origin = pids, period_s, origin
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.period_s):
                return

    def sample(self) -> None:
        t = time.monotonic() - self.origin
        for name, pid in self.pids.items():
            mb = rss_mb(pid)
            if mb is not None:
                self.samples[name].append((round(t, 2), round(mb, 1)))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def latest(self) -> dict[str, float]:
        return {name: rows[-1][1] for name, rows in self.samples.items() if rows}

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: {"start": rows[0][1], "peak": max(mb for _, mb in rows), "end": rows[-1][1]}
                for name, rows in self.samples.items() if rows}


# --- one run -----------------------------------------------------------------------------


def service_args(settings: LoadSettings, redis_prefix: str) -> dict[str, list[str]]:
    """Sized so that one verifier (and one drafter) can carry every session when its twin is
    gone, as a deployment of two of each must be: each generation holds a server thread on
    every node for its whole stream, and a finished session's verifier state lingers until
    its drafter's Release arrives, after the next request may already have come in."""
    room = 2 * settings.sessions + 16
    gateway = ["--workers", str(settings.sessions + 32), "--max-sessions", str(room)]
    if settings.redis:
        gateway += ["--redis", settings.redis, "--redis-prefix", redis_prefix, "--session-ttl-s", "900"]
    return {"verify": ["--workers", str(room + 16), "--max-sessions", str(room)],
            "draft": ["--workers", str(room + 16), "--max-sessions", str(room)],
            "gateway": gateway}


def _drop_redis_keys(url: str, prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(url)
    keys = list(r.scan_iter(match=prefix + "*", count=1000))
    for i in range(0, len(keys), 500):
        r.delete(*keys[i:i + 500])
    r.close()


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None, "max": None}
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"p50": cuts[49], "p99": cuts[98], "mean": statistics.fmean(values), "max": max(values)}


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import grpc
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "grpcio": grpc.__version__,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def summarize(settings: LoadSettings, load_at_start: float, started: int, outcomes: list[Outcome], wall_s: float,
              memory: MemorySampler, kill: dict | None) -> dict:
    done = [o for o in outcomes if o.error is None]
    tokens = sum(o.tokens for o in done)
    return {
        "settings": asdict(settings),
        # The load average shows whatever else ran on the machine meanwhile.
        "machine": {**machine(), "load_average_1m": {"start": load_at_start, "end": os.getloadavg()[0]}},
        "wall_s": wall_s,
        "requests": {
            "started": started, "completed": len(done), "unfinished": started - len(outcomes),
            "errors": dict(Counter(o.error for o in outcomes if o.error)),
            "wrong_output": sum(o.wrong_output for o in done),
            "resumed": sum(o.resumes > 0 for o in done), "resumes": sum(o.resumes for o in done),
        },
        "latency_s": percentiles([o.latency_s for o in done]),
        "first_token_s": percentiles([o.first_token_s for o in done if o.first_token_s is not None]),
        "tokens": tokens,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(done) / wall_s if wall_s > 0 else 0.0,
        "kill": kill,
        "memory_mb": memory.summary(),
        "memory_samples_mb": memory.samples,
    }


def progress_line(t: float, window_s: float, started: int, outcomes: list[Outcome], memory: MemorySampler) -> str:
    done = [o for o in outcomes if o.error is None]
    errors = Counter(o.error for o in outcomes if o.error)
    recent = [o for o in done if o.start_s + o.latency_s >= t - window_s]
    rss = " ".join(f"{name} {mb:.0f}" for name, mb in memory.latest().items())
    return (f"[{t:5.1f} s] {len(done)} done, {started - len(outcomes)} in flight, "
            f"{sum(o.tokens for o in recent) / window_s:.0f} tok/s in requests done, "
            f"errors {dict(errors) or 0}, wrong {sum(o.wrong_output for o in done)}, "
            f"resumed {sum(o.resumes > 0 for o in done)}; RSS MB: {rss}")


def kill_verifier(cluster: LocalCluster, now: float, log) -> dict:
    pid, address = cluster.pids()[KILLED], cluster.addresses[KILLED]
    status = cluster.kill(KILLED)
    log(f"[{now:5.1f} s] SIGKILL {KILLED} (pid {pid}, {address}): exit status {status}")
    return {"node": KILLED, "address": address, "at_s": round(now, 2), "exit_status": status}


def drive(cluster: LocalCluster, variants: list[Variant], settings: LoadSettings, log=print) -> dict:
    """Run the sessions against a started cluster; kill a verifier on time; sum it up."""
    tally = Tally(settings.max_requests)
    load_at_start = os.getloadavg()[0]
    origin = time.monotonic()
    memory = MemorySampler(cluster.pids(), settings.sample_s, origin)
    memory.start()
    kill: dict | None = None
    with channel(cluster.gateway_address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        threads = [threading.Thread(target=client_session, args=(i, stub, variants, settings, tally, origin),
                                    name=f"session-{i}", daemon=True) for i in range(settings.sessions)]
        for t in threads:
            t.start()
        next_report = settings.progress_s
        while any(t.is_alive() for t in threads):
            now = time.monotonic() - origin
            if kill is None and settings.kill_verifier_at is not None and now >= settings.kill_verifier_at:
                kill = kill_verifier(cluster, now, log)
            if now >= next_report:
                log(progress_line(now, settings.progress_s, *tally.snapshot(), memory))
                next_report += settings.progress_s
            time.sleep(0.1)
        wall_s = time.monotonic() - origin
    memory.stop()
    started, outcomes = tally.snapshot()
    return summarize(settings, load_at_start, started, outcomes, wall_s, memory, kill)


def run_loadtest(settings: LoadSettings, log=print) -> dict:
    from aerie.tiny import VOCAB, build_tiny_model

    settings.check()
    with tempfile.TemporaryDirectory(prefix="aerie-loadtest-") as tmp:
        model_dir, head_dir = build_tiny_model(Path(tmp))
        redis_prefix = f"aerie-loadtest-{uuid.uuid4().hex[:8]}:"
        cluster = LocalCluster(str(model_dir), str(head_dir), model_dir=str(model_dir), verifiers=settings.verifiers,
                               drafters=settings.drafters, extra_args=service_args(settings, redis_prefix),
                               trace_files=False, startup_s=180.0)
        log(f"starting {settings.verifiers} verify, {settings.drafters} draft and 1 gateway services "
            f"(logs in {cluster.tmp})")
        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                # The services take a while to import and load: the reference outputs are
                # computed meanwhile.
                starting = pool.submit(cluster.start)
                variants = with_expected(make_variants(VOCAB, settings.prompts, settings.seed), model_dir, head_dir,
                                         settings.max_new_tokens)
                starting.result()
            log(f"{settings.sessions} sessions for {settings.duration_s:.0f} s through {cluster.gateway_address}"
                + (f", killing {KILLED} at {settings.kill_verifier_at:.0f} s" if settings.kill_verifier_at is not None
                   else ""))
            report = drive(cluster, variants, settings, log)
        finally:
            codes = cluster.stop()
            if settings.redis:
                _drop_redis_keys(settings.redis, redis_prefix)
    report["exit_codes"] = codes
    return report


# --- output ------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def format_markdown(report: dict) -> str:
    s, r, lat, ttft = report["settings"], report["requests"], report["latency_s"], report["first_token_s"]
    kill = report["kill"]
    rows = [
        ("sessions x duration", f"{s['sessions']} x {s['duration_s']:.0f} s ({s['max_new_tokens']} tokens each)"),
        ("verifier killed", f"{kill['node']} at {kill['at_s']:.1f} s" if kill else "no"),
        ("requests completed", f"{r['completed']} of {r['started']} ({report['requests_per_s']:.1f}/s)"),
        ("client errors", ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "0"),
        ("outputs differing from in-process", str(r["wrong_output"])),
        ("requests resumed (resumes)", f"{r['resumed']} ({r['resumes']})"),
        ("latency p50 / p99", f"{_ms(lat['p50'])} / {_ms(lat['p99'])} ms"),
        ("time to first token p50 / p99", f"{_ms(ttft['p50'])} / {_ms(ttft['p99'])} ms"),
        ("tokens/s (all sessions)", f"{report['tokens_per_s']:.0f}"),
    ]
    out = ["| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
           "| process | RSS start MB | peak MB | end MB |", "|---|---|---|---|"]
    for name, m in report["memory_mb"].items():
        out.append(f"| {name} | {m['start']:.0f} | {m['peak']:.0f} | {m['end']:.0f} |")
    return "\n".join(out) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = LoadSettings()
    p.add_argument("--sessions", type=int, default=d.sessions, help="concurrent client sessions")
    p.add_argument("--duration-s", type=float, default=d.duration_s, help="new requests start until then")
    p.add_argument("--max-requests", type=int, default=d.max_requests, help="stop after this many (0: no limit)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--prompts", type=int, default=d.prompts, help="distinct prompts, each sent greedy and sampled")
    p.add_argument("--kill-verifier-at", type=float, default=None, metavar="SECONDS",
                   help=f"SIGKILL {KILLED} this long into the load")
    p.add_argument("--verifiers", type=int, default=d.verifiers)
    p.add_argument("--drafters", type=int, default=d.drafters)
    p.add_argument("--redis", default=None, help="Redis URL for the gateway's sessions (default: in process); "
                   "keys get a prefix of their own and are deleted afterwards")
    p.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s)
    p.add_argument("--progress-s", type=float, default=d.progress_s, help="a progress line this often")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--markdown", default=None, help="write the tables as markdown here")


def settings_of(args: argparse.Namespace) -> LoadSettings:
    return LoadSettings(
        sessions=args.sessions, duration_s=args.duration_s, max_requests=args.max_requests,
        max_new_tokens=args.max_new_tokens, prompts=args.prompts, kill_verifier_at=args.kill_verifier_at,
        verifiers=args.verifiers,
        drafters=args.drafters, redis=args.redis, request_timeout_s=args.request_timeout_s,
        progress_s=args.progress_s,
    )


def run_command(args: argparse.Namespace) -> int:
    """Exit status 1 when any client saw an error, an unfinished or a wrong output."""
    report = run_loadtest(settings_of(args), log=lambda line: print(line, file=sys.stderr, flush=True))
    table = format_markdown(report)
    print(table)
    for path, text in ((args.out, json.dumps(report, indent=2) + "\n"), (args.markdown, table)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
    r = report["requests"]
    return 1 if r["errors"] or r["wrong_output"] or r["unfinished"] else 0


def main(argv: list[str] | None = None) -> int:
    from aerie.errors import AerieError

    parser = argparse.ArgumentParser(prog="python -m gateway.loadtest", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        return run_command(parser.parse_args(argv))
    except AerieError as e:
        print(f"aerie: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
