"""The network split, end to end on loopback: real gRPC servers (in this process, and as
separate processes for the kill tests), the real Redis, and the tiny random Llama with a random
EAGLE-3 head (tests/services_support.py).

- Through the gateway the output is the in-process engine's: plain decoding at T=0, EAGLE with
  the same seed at T>0 (top-p, top-k and stop tokens carried through).
- A verifier or drafter process killed with SIGKILL mid-stream: the gateway resumes on another
  node and the output is complete and identical to an uninterrupted run.
- Malformed requests get the right status while a healthy session beside them finishes right.
- One trace holds every round's gateway, drafter and verifier spans, correctly parented.
- The Redis record follows the stream and has a TTL; health checking and reflection answer;
  `aerie generate --gateway --json` reports what in-process generation reports.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aerie.engine import Engine
from aerie.sampling import SamplingParams
from aerie.stack import load_stack
from aerie.verifier import StopCriteria
from aerie_rpc import wire
from aerie_rpc.server import channel
from aerie_rpc.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc, gateway_pb2, verifier_pb2, verifier_pb2_grpc
from gateway.store import DONE, INTERRUPTED
from tests.services_support import (
    REDIS_URL,
    ROOT,
    RedisPrefix,
    free_port,
    gateway_stub,
    generate,
    process_log,
    spawn,
    start_drafter,
    start_gateway,
    start_verifier,
    wait_all,
)
from tests.tiny import VOCAB

PROMPTS = [[3, 14, 15, 9, 26, 5], [1, 2, 3], [60, 61, 7, 8, 9, 10, 11, 12, 40, 41, 42]]
SESSION_TTL_S = 600.0
# Limits of the in-process cluster, small enough to test.
VERIFY_MAX_TREE = 32
VERIFY_MAX_PROMPT = 150
GATEWAY_MAX_PROMPT = 200
GATEWAY_MAX_NEW = 400


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tiny):
    model_dir, head_dir = tiny
    return load_stack(str(model_dir), str(head_dir))


@pytest.fixture(scope="module")
def engine(stack) -> Engine:
    return Engine(stack.target, stack.head, stack.tree)


def reference(engine: Engine, prompt, max_new, params=SamplingParams(), mode="eagle", stop_ids=()) -> list[int]:
    return engine.generate(list(prompt), params, StopCriteria(max_new, frozenset(stop_ids)), mode).token_ids


@pytest.fixture(scope="module")
def rprefix():
    p = RedisPrefix(SESSION_TTL_S)
    yield p
    p.cleanup()


class InProcessCluster:
    def __init__(self, tiny, rprefix: RedisPrefix):
        model_dir, head_dir = tiny
        self.vhost, self.verifier = start_verifier(model_dir, max_tree_nodes=VERIFY_MAX_TREE,
                                                   max_prompt_tokens=VERIFY_MAX_PROMPT)
        self.dhost, self.drafter = start_drafter(model_dir, head_dir, [self.vhost.address])
        self.store = rprefix.store()
        self.ghost, self.gateway = start_gateway(
            [self.dhost.address], model_dir, store=self.store, redis=REDIS_URL, redis_prefix=rprefix.prefix,
            session_ttl_s=SESSION_TTL_S, max_prompt_tokens=GATEWAY_MAX_PROMPT, max_new_tokens_limit=GATEWAY_MAX_NEW)
        self.channel, self.stub = gateway_stub(self.ghost.address)

    def stop(self) -> None:
        self.channel.close()
        for host in (self.ghost, self.dhost, self.vhost):
            host.stop(0.5)


@pytest.fixture(scope="module")
def cluster(tiny, rprefix, spans):
    c = InProcessCluster(tiny, rprefix)
    yield c
    c.stop()


def events_of(events, kind: str) -> list:
    return [getattr(ev, kind) for ev in events if ev.WhichOneof("event") == kind]


def finished(events) -> gateway_pb2.Finished:
    done = events_of(events, "finished")
    assert len(done) == 1, events
    return done[0]


# --- 1. the same output as in process -----------------------------------------------------


def test_drafter_uses_the_in_process_tree(cluster, stack):
    assert cluster.drafter.tree == stack.tree


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_in_process_vanilla(cluster, engine, prompt):
    max_new = 48
    ids, events = generate(cluster.stub, prompt, max_new_tokens=max_new)
    want = reference(engine, prompt, max_new, mode="vanilla")
    assert ids == want
    fin = finished(events)
    assert list(fin.token_ids) == want and fin.new_tokens == max_new and fin.finish_reason == "length"
    # The speculative path really ran: trees were drafted, some draft tokens accepted.
    rounds = [ev.stats for ev in events_of(events, "tokens") if ev.stats.round > 0]
    assert rounds and fin.rounds == len(rounds) < max_new
    assert all(r.tree_size == cluster.drafter.tree.total_tokens for r in rounds)
    assert sum(r.accepted_draft for r in rounds) > 0
    assert fin.tau == pytest.approx((sum(r.accepted_draft for r in rounds) + len(rounds)) / len(rounds))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, seed=7),
    SamplingParams(temperature=1.0, seed=8),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=3),
], ids=["t1-seed7", "t1-seed8", "t0.8-p0.9-k20"])
def test_sampling_equals_in_process_eagle(cluster, engine, params):
    prompt, max_new = PROMPTS[0], 48
    msg = common_pb2.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                    seed=params.seed)
    ids, events = generate(cluster.stub, prompt, max_new_tokens=max_new, params=msg)
    want = reference(engine, prompt, max_new, params)
    assert ids == want == list(finished(events).token_ids)
    assert want != reference(engine, prompt, max_new, mode="vanilla")  # really sampled


def test_top_p_top_k_change_the_output(cluster, engine):
    """Guards the test above: the parameters it carries make a difference."""
    prompt, max_new = PROMPTS[0], 48
    plain = reference(engine, prompt, max_new, SamplingParams(temperature=0.8, seed=3))
    warped = reference(engine, prompt, max_new, SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=3))
    assert plain != warped


def test_stop_token_ends_like_in_process(cluster, engine):
    prompt, max_new = PROMPTS[1], 48
    free = reference(engine, prompt, max_new, mode="vanilla")
    stop = free[20]
    want = reference(engine, prompt, max_new, mode="vanilla", stop_ids=[stop])
    assert want == free[: free.index(stop) + 1]
    ids, events = generate(cluster.stub, prompt, max_new_tokens=max_new, stop_token_ids=[stop])
    assert ids == want
    assert finished(events).finish_reason == "stop"


def test_text_prompt_uses_the_tokenizer(cluster, engine, stack):
    text = "w3 w14 w15 w9"
    ids, events = generate(cluster.stub, [], max_new_tokens=20, prompt=text)
    want = reference(engine, stack.encode_prompt(text, chat=False), 20, mode="vanilla")
    assert ids == want
    assert finished(events).text == stack.decode(want)
    assert "".join(ev.text for ev in events_of(events, "tokens")) == stack.decode(want)


def test_streamed_text_holds_back_partial_characters():
    """A byte-level tokenizer decodes half a character as U+FFFD: the stream waits for the
    rest instead of sending the placeholder and then the whole text again."""
    from gateway.service import text_delta

    sent, pieces = "", []
    for full in ["h", "h\ufffd", "h\ufffd\ufffd", "hé", "héllo"]:
        delta, sent = text_delta(sent, full)
        pieces.append(delta)
    assert pieces == ["h", "", "", "é", "llo"] and sent == "héllo"
    assert text_delta("abc", "abX d") == ("X d", "abX d")  # changed text goes on after what agrees


# --- 2. resume after a killed verifier or drafter -----------------------------------------


class ProcessPool:
    """Service processes started by this test module; only these are ever signalled."""

    def __init__(self, where: Path):
        self.where = where
        self.procs: dict[str, subprocess.Popen] = {}
        self.span_files: dict[str, Path] = {}

    def start(self, kind: str, count: int, args_for) -> list[str]:
        addresses = [f"127.0.0.1:{free_port()}" for _ in range(count)]
        started = []
        for i, address in enumerate(addresses):
            command, module, args = args_for(i, address)
            self.span_files[address] = self.where / f"{kind}{i}.spans.jsonl"
            proc = spawn(module, args, command=command, log=self.where / f"{kind}{i}.log",
                         env={"AERIE_TRACE_FILE": str(self.span_files[address])})
            self.procs[address] = proc
            started.append(proc)
        wait_all(addresses, started)
        return addresses

    def spans(self, address: str, trace_id: str, name: str | None = None, wait_s: float = 0.0) -> list[dict]:
        """Spans of one trace written by the process at `address` (JSON lines, one per span),
        of one `name` if given. `wait_s`: a span that ends after the client has its answer
        (the drafter's generate span) may take a moment to reach the file."""
        path = self.span_files[address]
        deadline = time.monotonic() + wait_s
        while True:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
            rows = [r for r in rows if r["trace_id"] == trace_id and name in (None, r["name"])]
            if rows or time.monotonic() >= deadline:
                return rows
            time.sleep(0.05)

    def kill(self, address: str) -> None:
        self.procs[address].send_signal(signal.SIGKILL)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def verifier_procs(tiny, tmp_path_factory, rprefix, spans):
    """Three verifier processes (two started as `aerie serve verify`, one as `python -m
    verify_service`), an in-process drafter over all three, and a gateway."""
    model_dir, head_dir = tiny
    pool = ProcessPool(tmp_path_factory.mktemp("verifiers"))
    aerie = [str(Path(sys.executable).with_name("aerie"))]

    def args_for(i, address):
        args = ["--listen", address, "--model", str(model_dir)]
        if i < 2:
            return aerie, "verify_service", ["serve", "verify", *args]
        return None, "verify_service", args

    try:
        addresses = pool.start("verify", 3, args_for)
        dhost, _ = start_drafter(model_dir, head_dir, addresses, round_timeout_s=20.0, verifier_cooldown_s=600.0)
        ghost, _ = start_gateway([dhost.address], store=rprefix.store(), session_ttl_s=SESSION_TTL_S)
        yield pool, addresses, ghost.address
        ghost.stop(0.5)
        dhost.stop(0.5)
    finally:
        pool.stop()


@pytest.fixture(scope="module")
def drafter_procs(tiny, tmp_path_factory, cluster, rprefix):
    """Three drafter processes (`python -m draft_service`) over the in-process verifier, and
    a gateway over all three."""
    model_dir, head_dir = tiny
    pool = ProcessPool(tmp_path_factory.mktemp("drafters"))

    def args_for(i, address):
        return None, "draft_service", ["--listen", address, "--verifier", cluster.vhost.address,
                                       "--model", str(model_dir), "--head", str(head_dir)]

    try:
        addresses = pool.start("draft", 3, args_for)
        ghost, _ = start_gateway(addresses, store=rprefix.store(), session_ttl_s=SESSION_TTL_S,
                                 drafter_cooldown_s=600.0)
        yield pool, addresses, ghost.address
        ghost.stop(0.5)
    finally:
        pool.stop()


def run_and_kill(stub, pool: ProcessPool, node: str, prompt, max_new, params, kill_after: int):
    """Stream one generation; SIGKILL the serving `node` ('verifier' or 'drafter') once
    `kill_after` tokens have arrived. Returns (ids, events, victim, tokens seen at the kill)."""
    state: dict = {}

    def on_event(ev, ids):
        kind = ev.WhichOneof("event")
        if kind == "started":
            state["victim"] = getattr(ev.started, node)
        if kind == "tokens" and "killed_at" not in state and len(ids) >= kill_after:
            pool.kill(state["victim"])
            state["killed_at"] = len(ids)

    ids, events = generate(stub, prompt, max_new_tokens=max_new, params=params, on_event=on_event, timeout=120,
                           ignore_eos=True)
    return ids, events, state.get("victim"), state.get("killed_at")


@pytest.mark.parametrize("node", ["verifier", "drafter"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_resume_after_sigkill(request, engine, rprefix, spans, node, temperature):
    pool, addresses, gateway_address = request.getfixturevalue(f"{node}_procs")
    prompt, max_new, seed = PROMPTS[2], 160, 5
    params = SamplingParams(temperature=temperature, seed=seed)
    want = reference(engine, prompt, max_new, params)
    ch, stub = gateway_stub(gateway_address)
    with ch:
        ids, events, victim, killed_at = run_and_kill(
            stub, pool, node, prompt, max_new, common_pb2.SamplingParams(temperature=temperature, seed=seed),
            kill_after=10)
    assert victim in addresses and killed_at is not None
    victim_proc = pool.procs[victim]
    assert victim_proc.wait(10) == -signal.SIGKILL, process_log(victim_proc)

    # The stream went on: complete, each token once, identical to an uninterrupted run.
    fin = finished(events)
    assert ids == list(fin.token_ids) == want
    assert len(ids) == max_new and fin.finish_reason == "length"

    # It went on elsewhere, from where it was when the node died.
    resumed = events_of(events, "resumed")
    assert len(resumed) == 1, resumed
    r = resumed[0]
    assert r.failed_node == victim
    assert getattr(r, node) != victim and getattr(r, node) in addresses
    assert killed_at <= r.from_token < max_new
    assert fin.resumes == 1
    # The tokens streamed after the resume start exactly at from_token.
    idx = next(i for i, ev in enumerate(events) if ev.WhichOneof("event") == "resumed")
    before = sum(len(ev.tokens.ids) for ev in events[:idx] if ev.WhichOneof("event") == "tokens")
    assert before == r.from_token

    record = rprefix.store().get(events[0].session_id)
    assert record.generated_ids == want and record.status == DONE and record.resumes == 1
    assert record.finish_reason == "length"

    # One trace across the resume, with the gateway's attempts 0 and 1 as the parents of the
    # work on the killed node and on the one that took over.
    trace_hex = events_of(events, "started")[0].trace_id
    survivor = getattr(r, node)
    ours = [s for s in spans.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_hex]
    attempts = sorted((s for s in ours if s.name == "gateway.attempt"), key=lambda s: s.attributes["aerie.attempt"])
    assert [s.attributes["aerie.attempt"] for s in attempts] == [0, 1]
    span_hex = lambda s: f"{s.context.span_id:016x}"  # noqa: E731
    if node == "verifier":
        # In-process drafter spans (one per attempt) parent the prefill on each verifier process.
        # The drafter ends its generate span just after its last event: wait for both.
        deadline = time.monotonic() + 10.0
        while True:
            ours = [s for s in spans.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_hex]
            dgens = sorted((s for s in ours if s.name == "drafter.generate"), key=lambda s: s.start_time)
            if len(dgens) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert [d.parent.span_id for d in dgens] == [a.context.span_id for a in attempts]
        for address, dgen in zip((victim, survivor), dgens):
            prefills = [row for row in pool.spans(address, trace_hex) if row["name"] == "verifier.prefill"]
            assert [row["parent_id"] for row in prefills] == [span_hex(dgen)], address
        assert any(row["name"] == "verifier.round" for row in pool.spans(survivor, trace_hex))
    else:
        # The killed drafter never ended its generate span, but its finished rounds name it as
        # their parent, and so does the prefill it asked of the in-process verifier.
        victim_rounds = [row for row in pool.spans(victim, trace_hex) if row["name"] == "drafter.round"]
        assert victim_rounds and len({row["parent_id"] for row in victim_rounds}) == 1
        survivor_gen = pool.spans(survivor, trace_hex, "drafter.generate", wait_s=10.0)
        assert len(survivor_gen) == 1 and survivor_gen[0]["parent_id"] == span_hex(attempts[1])
        prefills = sorted((s for s in ours if s.name == "verifier.prefill"), key=lambda s: s.start_time)
        assert [f"{s.parent.span_id:016x}" for s in prefills] == [victim_rounds[0]["parent_id"],
                                                                   survivor_gen[0]["span_id"]]


# --- 3. malformed requests ----------------------------------------------------------------


class HealthyTraffic:
    """Sessions generated back to back through the gateway while a test sends bad requests;
    each is checked against the in-process result."""

    def __init__(self, address: str, expected: list[int], prompt, params: SamplingParams, max_new: int):
        self.channel, self.stub = gateway_stub(address)
        self.expected, self.prompt, self.params, self.max_new = expected, prompt, params, max_new
        self.runs: list[tuple[float, float, list[int] | str]] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        msg = common_pb2.SamplingParams(temperature=self.params.temperature, seed=self.params.seed)
        while not self.stopping.is_set():
            t0 = time.monotonic()
            try:
                ids, _ = generate(self.stub, self.prompt, max_new_tokens=self.max_new, params=msg, timeout=60)
                out: list[int] | str = ids
            except grpc.RpcError as e:
                out = f"{e.code().name}: {e.details()}"
            with self.lock:
                self.runs.append((t0, time.monotonic(), out))

    def check_around(self, t_start: float, t_end: float, timeout_s: float = 60.0) -> None:
        """A healthy session that was running across [t_start, t_end] finished correctly,
        and so did every other."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                runs = list(self.runs)
            bad = [out for _, _, out in runs if out != self.expected]
            assert not bad, f"a healthy session went wrong: {bad[0]}"
            if any(t0 <= t_start and t1 >= t_end for t0, t1, _ in runs):
                return
            time.sleep(0.02)
        raise AssertionError("no healthy session ran across the bad request")

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(60)
        self.channel.close()


@pytest.fixture(scope="module")
def healthy(cluster, engine):
    params = SamplingParams(temperature=1.0, seed=21)
    prompt, max_new = PROMPTS[0], 30
    traffic = HealthyTraffic(cluster.ghost.address, reference(engine, prompt, max_new, params), prompt, params,
                             max_new)
    yield traffic
    traffic.stop()
    assert len(traffic.runs) >= 2


def expect_status(call, codes) -> str:
    codes = codes if isinstance(codes, tuple) else (codes,)
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() in codes, f"{err.value.code()}: {err.value.details()}"
    assert err.value.details()  # a message a person can act on
    return err.value.details()


def check_bad(healthy: HealthyTraffic, call, codes, needle: str = "") -> None:
    t0 = time.monotonic()
    details = expect_status(call, codes)
    assert needle.lower() in details.lower(), details
    healthy.check_around(t0, time.monotonic())


def feature_spec(cluster) -> common_pb2.FeatureSpec:
    spec = cluster.drafter.head.feature_spec
    return common_pb2.FeatureSpec(kind=spec.kind, layers=list(spec.layers))


def prefill_messages(sid, prompt, features, params=None, max_new=20, prompt_tokens=None, resume=()):
    yield verifier_pb2.PrefillRequest(header=verifier_pb2.PrefillHeader(
        session_id=sid, params=params or common_pb2.SamplingParams(), features=features,
        stop=common_pb2.StopCriteria(max_new_tokens=max_new, ignore_eos=True),
        prompt_tokens=len(prompt) if prompt_tokens is None else prompt_tokens, resume_tokens=len(resume)))
    yield verifier_pb2.PrefillRequest(chunk=verifier_pb2.TokenChunk(prompt_ids=list(prompt), resume_ids=list(resume)))


@pytest.fixture
def vstub(cluster):
    with channel(cluster.vhost.address) as ch:
        yield verifier_pb2_grpc.VerifierStub(ch)


def open_session(vstub, cluster, prompt) -> tuple[str, int]:
    """A verifier session of our own (greedy); returns its id and pending token."""
    sid = f"raw-{uuid.uuid4().hex[:8]}"
    out = list(vstub.Prefill(prefill_messages(sid, prompt, feature_spec(cluster)), timeout=30))
    assert out[0].WhichOneof("part") == "result"
    return sid, out[0].result.pending_token


def verify_once(vstub, req) -> verifier_pb2.VerifyResponse:
    out = list(vstub.Verify(iter([req]), timeout=30))
    assert len(out) == 1
    return out[0]


def tree_request(sid, toks, pars, logprobs=None, **over) -> verifier_pb2.VerifyRequest:
    """A tree of `toks` with parents `pars`; `over` replaces whole tensor fields."""
    n = len(toks)
    req = verifier_pb2.VerifyRequest(
        session_id=sid, round=1, tokens=wire.encode(torch.tensor(toks, dtype=torch.int64)),
        parents=wire.encode(torch.tensor(pars, dtype=torch.int64)),
        logprobs=wire.encode(torch.zeros(n) if logprobs is None else torch.tensor(logprobs, dtype=torch.float32)))
    for name, value in over.items():
        getattr(req, name).CopyFrom(value)
    return req


def raw_tensor(data: bytes, dtype: str, shape) -> common_pb2.Tensor:
    return common_pb2.Tensor(data=data, dtype=dtype, shape=list(shape))


I64 = lambda *v: torch.tensor(v, dtype=torch.int64).numpy().tobytes()  # noqa: E731

# Each case: (name, build the request from (session id, pending token), expected status, words of the message).
TREE_CASES = [
    ("cycle", lambda s, p: tree_request(s, [p, 1, 2], [-1, 2, 1]), grpc.StatusCode.INVALID_ARGUMENT, "parent"),
    ("self-parent", lambda s, p: tree_request(s, [p, 1], [-1, 1]), grpc.StatusCode.INVALID_ARGUMENT, "parent"),
    ("parent-out-of-range", lambda s, p: tree_request(s, [p, 1, 2], [-1, 0, 7]), grpc.StatusCode.INVALID_ARGUMENT,
     "parent"),
    ("negative-parent", lambda s, p: tree_request(s, [p, 1], [-1, -4]), grpc.StatusCode.INVALID_ARGUMENT, "parent"),
    ("root-has-parent", lambda s, p: tree_request(s, [p, 1], [0, 0]), grpc.StatusCode.INVALID_ARGUMENT, "root"),
    ("lengths-differ", lambda s, p: tree_request(s, [p, 1, 2], [-1, 0]), grpc.StatusCode.INVALID_ARGUMENT,
     "parents"),
    ("logprobs-length", lambda s, p: tree_request(s, [p, 1], [-1, 0], logprobs=[0.0, -1.0, -2.0]),
     grpc.StatusCode.INVALID_ARGUMENT, "logprobs"),
    ("logprobs-nan", lambda s, p: tree_request(s, [p, 1], [-1, 0], logprobs=[0.0, math.nan]),
     grpc.StatusCode.INVALID_ARGUMENT, "finite"),
    ("tokens-float32", lambda s, p: tree_request(s, [p, 1], [-1, 0], tokens=wire.encode(torch.tensor([p, 1.0]))),
     grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    ("tokens-unknown-dtype", lambda s, p: tree_request(s, [p, 1], [-1, 0], tokens=raw_tensor(I64(p, 1), "int128", [2])),
     grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    ("tokens-2d", lambda s, p: tree_request(s, [p, 1], [-1, 0], tokens=raw_tensor(I64(p, 1), "int64", [1, 2])),
     grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    ("tokens-short-bytes", lambda s, p: tree_request(s, [p, 1], [-1, 0], tokens=raw_tensor(I64(p, 1)[:12], "int64", [2])),
     grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
    ("tokens-huge-shape", lambda s, p: tree_request(s, [p, 1], [-1, 0], tokens=raw_tensor(I64(p, 1), "int64", [1 << 40])),
     grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
    ("parents-negative-dim", lambda s, p: tree_request(s, [p, 1], [-1, 0], parents=raw_tensor(b"", "int64", [-2])),
     grpc.StatusCode.INVALID_ARGUMENT, "negative"),
    ("no-tokens", lambda s, p: verifier_pb2.VerifyRequest(session_id=s, round=1), grpc.StatusCode.INVALID_ARGUMENT,
     "tokens"),
    ("token-outside-vocab", lambda s, p: tree_request(s, [p, VOCAB + 5], [-1, 0]), grpc.StatusCode.INVALID_ARGUMENT,
     "tokens"),
    ("wrong-root", lambda s, p: tree_request(s, [(p + 1) % VOCAB, 1], [-1, 0]), grpc.StatusCode.INVALID_ARGUMENT,
     "root"),
    ("oversize-tree", lambda s, p: tree_request(s, [p] * (VERIFY_MAX_TREE + 1), [-1] + list(range(VERIFY_MAX_TREE))),
     (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), "limit"),
    ("unknown-session", lambda s, p: tree_request("nobody-" + s, [p, 1], [-1, 0]), grpc.StatusCode.NOT_FOUND,
     "unknown session"),
]


@pytest.mark.parametrize("name,build,code,needle", TREE_CASES, ids=[c[0] for c in TREE_CASES])
def test_malformed_tree(cluster, engine, healthy, vstub, name, build, code, needle):
    prompt = PROMPTS[1]
    sid, pending = open_session(vstub, cluster, prompt)
    check_bad(healthy, lambda: verify_once(vstub, build(sid, pending)), code, needle)
    # The session the bad request named goes on unharmed, on a new stream.
    want = reference(engine, prompt, 3, mode="vanilla")
    assert pending == want[0]
    resp = verify_once(vstub, tree_request(sid, [pending, want[1], (want[2] + 1) % VOCAB], [-1, 0, 1]))
    assert list(resp.new_tokens) == want[1:3] and resp.accepted_draft == 1
    assert vstub.Release(verifier_pb2.ReleaseRequest(session_id=sid), timeout=5).released


def layers_spec(layers):
    return common_pb2.FeatureSpec(kind="eagle3", layers=layers)


PREFILL_CASES = [
    ("prompt-over-limit", lambda sid, f: prefill_messages(sid, [1] * (VERIFY_MAX_PROMPT + 1), f),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "max-prompt-tokens"),
    ("resume-over-limit", lambda sid, f: prefill_messages(sid, [1] * 100, f, max_new=200, resume=[2] * 60),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "max-prompt-tokens"),
    ("bad-temperature", lambda sid, f: prefill_messages(sid, [1, 2], f, common_pb2.SamplingParams(temperature=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ("bad-top-p", lambda sid, f: prefill_messages(sid, [1, 2], f, common_pb2.SamplingParams(temperature=1, top_p=0)),
     grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ("bad-layers", lambda sid, f: prefill_messages(sid, [1, 2], layers_spec([1, 2, 99])),
     grpc.StatusCode.INVALID_ARGUMENT, "layers"),
    ("two-layers", lambda sid, f: prefill_messages(sid, [1, 2], layers_spec([1, 2])),
     grpc.StatusCode.INVALID_ARGUMENT, "3 layers"),
    ("id-outside-vocab", lambda sid, f: prefill_messages(sid, [1, VOCAB], f), grpc.StatusCode.INVALID_ARGUMENT,
     "vocabulary"),
    ("more-than-announced", lambda sid, f: prefill_messages(sid, [1, 2, 3], f, prompt_tokens=2),
     grpc.StatusCode.INVALID_ARGUMENT, "announced"),
    ("fewer-than-announced", lambda sid, f: prefill_messages(sid, [1, 2, 3], f, prompt_tokens=5),
     grpc.StatusCode.INVALID_ARGUMENT, "ended"),
    ("no-header", lambda sid, f: iter([verifier_pb2.PrefillRequest(chunk=verifier_pb2.TokenChunk(prompt_ids=[1]))]),
     grpc.StatusCode.INVALID_ARGUMENT, "header"),
    ("max-new-zero", lambda sid, f: prefill_messages(sid, [1, 2], f, max_new=0), grpc.StatusCode.INVALID_ARGUMENT,
     "max_new_tokens"),
    ("past-context", lambda sid, f: prefill_messages(sid, [1, 2], f, max_new=600), grpc.StatusCode.INVALID_ARGUMENT,
     "context"),
]


@pytest.mark.parametrize("name,build,code,needle", PREFILL_CASES, ids=[c[0] for c in PREFILL_CASES])
def test_malformed_prefill(cluster, healthy, vstub, name, build, code, needle):
    sid = f"bad-{uuid.uuid4().hex[:8]}"
    check_bad(healthy, lambda: list(vstub.Prefill(build(sid, feature_spec(cluster)), timeout=30)), code, needle)
    # Nothing of the failed session stays behind: the same id opens cleanly (no ALREADY_EXISTS).
    out = list(vstub.Prefill(prefill_messages(sid, [1, 2], feature_spec(cluster)), timeout=30))
    assert out[0].result.session_id == sid
    assert vstub.Release(verifier_pb2.ReleaseRequest(session_id=sid), timeout=5).released


def gen_request(**kw) -> gateway_pb2.GenerateRequest:
    params = kw.pop("params", {})
    kw.setdefault("max_new_tokens", 10)
    return gateway_pb2.GenerateRequest(params=common_pb2.SamplingParams(**params), **kw)


GATEWAY_CASES = [
    ("temperature-negative", gen_request(prompt_ids=[1, 2], params={"temperature": -0.5}),
     grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ("temperature-nan", gen_request(prompt_ids=[1, 2], params={"temperature": math.nan}),
     grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ("top-p-zero", gen_request(prompt_ids=[1, 2], params={"temperature": 1, "top_p": 0.0}),
     grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ("top-p-above-1", gen_request(prompt_ids=[1, 2], params={"temperature": 1, "top_p": 1.5}),
     grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ("top-k-negative", gen_request(prompt_ids=[1, 2], params={"top_k": -1}), grpc.StatusCode.INVALID_ARGUMENT,
     "top_k"),
    ("seed-negative", gen_request(prompt_ids=[1, 2], params={"seed": -3}), grpc.StatusCode.INVALID_ARGUMENT, "seed"),
    ("seed-too-large", gen_request(prompt_ids=[1, 2], params={"seed": 2**62}), grpc.StatusCode.INVALID_ARGUMENT,
     "seed"),
    ("max-new-over-limit", gen_request(prompt_ids=[1, 2], max_new_tokens=GATEWAY_MAX_NEW + 1),
     grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    ("no-prompt", gen_request(), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("text-and-ids", gen_request(prompt="w1", prompt_ids=[1]), grpc.StatusCode.INVALID_ARGUMENT, "either"),
    ("negative-id", gen_request(prompt_ids=[1, -2]), grpc.StatusCode.INVALID_ARGUMENT, "prompt_ids"),
    ("id-outside-vocab", gen_request(prompt_ids=[1, VOCAB + 1]), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
    ("negative-stop-id", gen_request(prompt_ids=[1], stop_token_ids=[-1]), grpc.StatusCode.INVALID_ARGUMENT,
     "stop_token_ids"),
    ("bad-session-id", gen_request(prompt_ids=[1], session_id="a b/c"), grpc.StatusCode.INVALID_ARGUMENT,
     "session_id"),
    ("prompt-over-gateway-limit", gen_request(prompt_ids=[1] * (GATEWAY_MAX_PROMPT + 1)),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "limit"),
    # Passes the gateway's limit, not the verifier's.
    ("prompt-over-verifier-limit", gen_request(prompt_ids=[1] * (VERIFY_MAX_PROMPT + 10)),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "max-prompt-tokens"),
    ("past-context", gen_request(prompt_ids=[1] * 120, max_new_tokens=GATEWAY_MAX_NEW),  # > 512 positions
     grpc.StatusCode.INVALID_ARGUMENT, "context"),
]


@pytest.mark.parametrize("name,req,code,needle", GATEWAY_CASES, ids=[c[0] for c in GATEWAY_CASES])
def test_malformed_generate(cluster, healthy, name, req, code, needle):
    check_bad(healthy, lambda: list(cluster.stub.Generate(req, timeout=30)), code, needle)


def test_generate_twice_with_one_session_id(cluster, healthy):
    sid = f"mine-{uuid.uuid4().hex[:8]}"
    generate(cluster.stub, [1, 2], max_new_tokens=4, session_id=sid)
    check_bad(healthy, lambda: list(cluster.stub.Generate(gen_request(prompt_ids=[1], session_id=sid), timeout=30)),
              grpc.StatusCode.FAILED_PRECONDITION, "exists")


@pytest.mark.parametrize("rpc", ["GetSession", "Resume", "Cancel"])
def test_unknown_session_is_not_found(cluster, healthy, rpc):
    sid = f"nobody-{uuid.uuid4().hex[:8]}"
    msg = {"GetSession": gateway_pb2.GetSessionRequest, "Resume": gateway_pb2.ResumeRequest,
           "Cancel": gateway_pb2.CancelRequest}[rpc](session_id=sid)

    def call():
        out = getattr(cluster.stub, rpc)(msg, timeout=10)
        return list(out) if rpc == "Resume" else out

    check_bad(healthy, call, grpc.StatusCode.NOT_FOUND, sid)


DRAFTER_CASES = [
    ("bad-temperature", dict(prompt_ids=[1, 2], params=common_pb2.SamplingParams(temperature=-1),
                             stop=common_pb2.StopCriteria(max_new_tokens=5)), "temperature"),
    ("empty-prompt", dict(stop=common_pb2.StopCriteria(max_new_tokens=5)), "prompt"),
    ("max-new-zero", dict(prompt_ids=[1]), "max_new_tokens"),
    ("resume-past-end", dict(prompt_ids=[1], generated_ids=[2, 3], stop=common_pb2.StopCriteria(max_new_tokens=2)),
     "resume"),
    ("id-outside-vocab", dict(prompt_ids=[VOCAB], stop=common_pb2.StopCriteria(max_new_tokens=2)), "vocabulary"),
]


@pytest.mark.parametrize("name,fields,needle", DRAFTER_CASES, ids=[c[0] for c in DRAFTER_CASES])
def test_malformed_drafter_request(cluster, healthy, name, fields, needle):
    with channel(cluster.dhost.address) as ch:
        stub = drafter_pb2_grpc.DrafterStub(ch)
        req = drafter_pb2.DraftGenerateRequest(session_id="bad", **fields)
        check_bad(healthy, lambda: list(stub.Generate(req, timeout=30)), grpc.StatusCode.INVALID_ARGUMENT, needle)
    assert cluster.drafter.admission.sessions <= 1  # only the healthy session holds a slot


# --- 4. one trace per request -------------------------------------------------------------


def test_one_trace_holds_every_round(cluster, spans):
    ids, events = generate(cluster.stub, PROMPTS[0], max_new_tokens=30)
    trace_id = int(events_of(events, "started")[0].trace_id, 16)
    rounds = {ev.stats.round: ev.stats for ev in events_of(events, "tokens")}
    n_rounds = finished(events).rounds
    assert sorted(rounds) == list(range(n_rounds + 1))

    def ours():
        return [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(s.name == "drafter.generate" for s in ours()):
        time.sleep(0.05)  # the drafter's span ends once its stream is closed
    got = ours()
    by_name: dict[str, list] = {}
    for s in got:
        by_name.setdefault(s.name, []).append(s)
    one = {name: by_name[name] for name in ("gateway.generate", "gateway.attempt", "drafter.generate",
                                            "verifier.prefill")}
    assert all(len(v) == 1 for v in one.values()), {k: len(v) for k, v in by_name.items()}
    gen, attempt, dgen, prefill = (one[n][0] for n in ("gateway.generate", "gateway.attempt", "drafter.generate",
                                                      "verifier.prefill"))
    assert gen.parent is None  # the request's root span
    assert attempt.parent.span_id == gen.context.span_id
    assert dgen.parent.span_id == attempt.context.span_id and dgen.parent.is_remote
    assert prefill.parent.span_id == dgen.context.span_id and prefill.parent.is_remote
    assert gen.attributes["gen_ai.usage.output_tokens"] == len(ids) == 30
    assert gen.attributes["gen_ai.usage.input_tokens"] == len(PROMPTS[0])
    assert gen.attributes["aerie.rounds"] == n_rounds

    def per_round(name):
        out = {}
        for s in by_name.get(name, []):
            r = s.attributes["aerie.round"]
            assert r not in out, f"two {name} spans for round {r}"
            out[r] = s
        return out

    g_rounds, d_rounds, v_rounds = per_round("gateway.round"), per_round("drafter.round"), per_round("verifier.round")
    assert sorted(g_rounds) == list(range(n_rounds + 1))  # round 0: the prefill's tokens
    assert sorted(d_rounds) == sorted(v_rounds) == list(range(1, n_rounds + 1))
    for r in range(1, n_rounds + 1):
        g, d, v = g_rounds[r], d_rounds[r], v_rounds[r]
        stats = rounds[r]
        assert g.parent.span_id == attempt.context.span_id
        assert d.parent.span_id == dgen.context.span_id
        assert v.parent.span_id == d.context.span_id and v.parent.is_remote
        a = d.attributes
        assert a["aerie.tree_size"] == stats.tree_size == v.attributes["aerie.tree_size"] > 0
        assert a["aerie.accepted"] == stats.accepted_draft == v.attributes["aerie.accepted"]
        assert a["aerie.committed"] == stats.committed == g.attributes["aerie.committed"]
        assert a["aerie.draft_ms"] == pytest.approx(stats.draft_ms) and a["aerie.draft_ms"] > 0
        assert a["aerie.verify_ms"] == pytest.approx(v.attributes["aerie.verify_ms"])
        assert a["aerie.verify_ms"] > 0
        assert a["aerie.wire_ms"] >= 0
        assert a["aerie.request_bytes"] == stats.request_bytes == v.attributes["aerie.request_bytes"] > 0
        assert a["aerie.response_bytes"] == stats.response_bytes == v.attributes["aerie.response_bytes"] > 0
        # The round spans nest in time: the verifier's inside the drafter's.
        assert d.start_time <= v.start_time <= v.end_time <= d.end_time


# --- 5. the session record ----------------------------------------------------------------


def test_redis_record_follows_the_stream(cluster, rprefix):
    client = rprefix.client
    seen: list[tuple[list[int], list[int]]] = []
    sid = f"rec-{uuid.uuid4().hex[:8]}"

    def on_event(ev, ids):
        if ev.WhichOneof("event") == "tokens":
            raw = client.hget(rprefix.key(sid), "generated_ids").decode()
            seen.append((list(ids), [int(x) for x in raw.split(",")] if raw else []))

    ids, events = generate(cluster.stub, PROMPTS[2], max_new_tokens=40, temperature=1.0, seed=4,
                           session_id=sid, on_event=on_event)
    assert events[0].session_id == sid
    # Rounds are written to the record before they are streamed.
    assert seen and all(stored[: len(streamed)] == streamed for streamed, stored in seen)
    record = cluster.store.get(sid)
    fin = finished(events)
    assert record.generated_ids == ids == list(fin.token_ids)
    assert (record.status, record.finish_reason, record.rounds) == (DONE, "length", fin.rounds)
    assert record.prompt_ids == PROMPTS[2] and record.params["seed"] == 4 and record.params["temperature"] == 1.0
    assert record.tau == pytest.approx(fin.tau)
    assert record.drafter == cluster.dhost.address and record.verifier == cluster.vhost.address
    assert record.trace_id == events_of(events, "started")[0].trace_id
    assert SESSION_TTL_S - 30 < client.ttl(rprefix.key(sid)) <= SESSION_TTL_S

    session = cluster.stub.GetSession(gateway_pb2.GetSessionRequest(session_id=sid), timeout=10)
    assert list(session.generated_ids) == ids and session.status == DONE
    assert 0 < session.ttl_s <= SESSION_TTL_S and session.rounds == fin.rounds
    assert session.text == fin.text


def test_client_gone_then_resume(cluster, engine, rprefix):
    """A client that goes away mid-stream leaves the session interrupted; Resume with replay
    sends it all, identical to an uninterrupted run."""
    sid = f"gone-{uuid.uuid4().hex[:8]}"
    max_new = 120
    params = SamplingParams(temperature=1.0, seed=9)
    want = reference(engine, PROMPTS[0], max_new, params)
    call = cluster.stub.Generate(gateway_pb2.GenerateRequest(
        prompt_ids=PROMPTS[0], max_new_tokens=max_new, session_id=sid,
        params=common_pb2.SamplingParams(temperature=1.0, seed=9)), timeout=60)
    got = 0
    for ev in call:
        got += len(ev.tokens.ids)
        if got >= 10:
            call.cancel()
            break
    deadline = time.monotonic() + 10
    while cluster.store.get(sid).status != INTERRUPTED and time.monotonic() < deadline:
        time.sleep(0.05)
    partial = cluster.store.get(sid)
    assert partial.status == INTERRUPTED and 10 <= len(partial.generated_ids) < max_new
    assert partial.generated_ids == want[: len(partial.generated_ids)]

    events = list(cluster.stub.Resume(gateway_pb2.ResumeRequest(session_id=sid, replay=True), timeout=60))
    ids = [t for ev in events_of(events, "tokens") for t in ev.ids]
    assert ids == want == list(finished(events).token_ids)
    assert cluster.store.get(sid).status == DONE
    # A finished session resumes to its result.
    again = list(cluster.stub.Resume(gateway_pb2.ResumeRequest(session_id=sid, replay=True), timeout=10))
    assert [t for ev in events_of(again, "tokens") for t in ev.ids] == want


def test_cancel_mid_stream(cluster, engine):
    sid = f"cancel-{uuid.uuid4().hex[:8]}"
    max_new = 200
    want = reference(engine, PROMPTS[1], max_new, mode="vanilla")
    ch, other = gateway_stub(cluster.ghost.address)

    def on_event(ev, ids):
        if ev.WhichOneof("event") == "tokens" and 5 <= len(ids) and not on_event.sent:
            on_event.sent = True
            assert other.Cancel(gateway_pb2.CancelRequest(session_id=sid), timeout=10).status == "cancelled"

    on_event.sent = False
    with ch:
        ids, events = generate(cluster.stub, PROMPTS[1], max_new_tokens=max_new, session_id=sid, on_event=on_event)
        fin = finished(events)
        assert fin.finish_reason == "cancelled"
        assert 5 <= len(ids) < max_new and ids == want[: len(ids)] == list(fin.token_ids)
        record = cluster.store.get(sid)
        assert record.status == "cancelled" and record.generated_ids == ids
        # Cancelling again is idempotent; a cancelled session resumes to its result.
        assert other.Cancel(gateway_pb2.CancelRequest(session_id=sid), timeout=10).status == "cancelled"
        again = list(cluster.stub.Resume(gateway_pb2.ResumeRequest(session_id=sid), timeout=10))
        assert finished(again).finish_reason == "cancelled" and list(finished(again).token_ids) == ids


# --- 6. health, reflection and the CLI ----------------------------------------------------


@pytest.mark.parametrize("which,service", [
    ("vhost", "aerie.v1.Verifier"), ("dhost", "aerie.v1.Drafter"), ("ghost", "aerie.v1.Gateway")])
def test_health_and_reflection(cluster, which, service):
    address = getattr(cluster, which).address
    with channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", service):
            resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)]
        listed, files = list(refl.ServerReflectionInfo(iter(reqs), timeout=5))
        names = {s.name for s in listed.list_services_response.service}
        assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
        from google.protobuf import descriptor_pb2

        protos = [descriptor_pb2.FileDescriptorProto.FromString(b)
                  for b in files.file_descriptor_response.file_descriptor_proto]
        main = next(p for p in protos if any(f"{p.package}.{s.name}" == service for s in p.service))
        assert main.name.startswith("aerie/v1/") and main.package == "aerie.v1"


def test_health_reports_not_serving_while_draining(tiny):
    model_dir, _ = tiny
    host, _ = start_verifier(model_dir)
    with channel(host.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        stopper = threading.Thread(target=host.stop, args=(1.0,))
        host.server.stop = _slow(host.server.stop)  # keep the server up briefly while draining
        stopper.start()
        time.sleep(0.2)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        stopper.join(10)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def _slow(stop):
    def slow(grace):
        time.sleep(0.6)
        return stop(grace)

    return slow


def test_cli_generate_via_gateway_matches_in_process(cluster, tiny, capsys):
    from aerie.cli import main

    model_dir, head_dir = tiny
    common = ["generate", "--prompt", "w3 w14 w15 w9 w26", "--no-chat", "--max-new-tokens", "24", "--json",
              "--temperature", "0.9", "--top-k", "5", "--top-p", "0.95", "--seed", "13"]
    assert main([*common, "--model", str(model_dir), "--head", str(head_dir)]) == 0
    local = json.loads(capsys.readouterr().out)
    proc = subprocess.run([str(Path(sys.executable).with_name("aerie")), *common, "--gateway", cluster.ghost.address],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    remote = json.loads(proc.stdout)
    keys = {"text", "token_ids", "new_tokens", "tau", "tokens_per_s", "rounds"}
    assert keys <= set(local) and keys <= set(remote)
    for key in ("text", "token_ids", "new_tokens", "rounds"):
        assert remote[key] == local[key], key
    assert remote["tau"] == pytest.approx(local["tau"])
    assert remote["new_tokens"] == 24 and remote["tokens_per_s"] > 0
    for key in keys:
        assert type(remote[key]) is type(local[key]), key


def test_generated_code_matches_the_protos():
    """aerie_rpc/v1 is protoc's output for protos/aerie/v1, never edited by hand."""
    from aerie_rpc import generate as gen

    assert gen.diff(gen.generate(), gen.current()) == "", "run `python -m aerie_rpc.generate`"


@pytest.mark.parametrize("module", ["common_pb2", "drafter_pb2", "gateway_pb2", "verifier_pb2"])
def test_each_generated_module_imports_alone(module):
    """A module's import of its dependencies registers them in the descriptor pool: in a fresh
    process it must load without anything imported before it."""
    proc = subprocess.run([sys.executable, "-c", f"from aerie_rpc.v1 import {module}, {module}_grpc"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_released_and_expired_sessions_give_their_kv_caches_back():
    from verify_service.service import SessionTable

    class Session:
        closed = 0

        def close(self):
            self.closed += 1

    table = SessionTable(max_sessions=4, max_tokens=1000, ttl_s=60.0)
    released, expired, kept = Session(), Session(), Session()
    for sid, session in (("a", released), ("b", expired), ("c", kept)):
        table.reserve(sid, 10)
        table.commit(sid, session)
    assert table.remove("a") and not table.remove("a")
    table.get("b").last_used -= 120  # idle past the TTL
    assert table.reap() == 1
    assert (released.closed, expired.closed, kept.closed) == (1, 1, 0)
    assert len(table) == 1 and table.reserved == 10


def test_the_gateway_module_loads_without_torch():
    """Request checks (sampling parameters, limits) and the lost-peer signals are torch-free:
    only a gateway that tokenizes text needs the model stack."""
    import subprocess
    import sys

    code = "import sys, gateway.service, gateway.http_api; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"
