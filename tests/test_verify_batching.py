"""The verify service with `--batch-sessions`: concurrent sessions' rounds in one forward, over
real gRPC servers on loopback (the tiny random Llama and EAGLE-3 head of tests/tiny.py).

- Four sessions at once through gateway, drafter and batched verifier: greedy output is plain
  decoding's, sampled output (seeded) the unbatched service's, and rounds really were batched
  (the verifier's spans record batch sizes above 1).
- A bad tree in one session of a batch is refused to that session only; the others' rounds
  in the same forward come out right.
- Rows are given back on release, on the idle TTL and on drain; the session limit is the
  row count, refused with RESOURCE_EXHAUSTED naming --batch-sessions.
- Prefill with resumed tokens works batched, as it does unbatched.
"""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import pytest
import torch

from aerie.engine import Engine
from aerie.sampling import SamplingParams
from aerie.stack import load_stack
from aerie.verifier import StopCriteria
from aerie_rpc import wire
from aerie_rpc.server import channel
from aerie_rpc.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc
from tests.services_support import (
    REDIS_URL,
    RedisPrefix,
    gateway_stub,
    generate,
    start_drafter,
    start_gateway,
    start_verifier,
)
from tests.tiny import VOCAB

PROMPTS = [[3, 14, 15, 9, 26, 5], [1, 2, 3], [60, 61, 7, 8, 9, 10, 11, 12, 40, 41, 42], [20, 21]]
MAX_TREE = 32
WINDOW_MS = 50.0  # generous on a loaded CI machine; a batch starts sooner once every session is pending


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny) -> Engine:
    stack = load_stack(*(str(p) for p in tiny))
    return Engine(stack.target, stack.head, stack.tree)


def reference(engine: Engine, prompt, max_new, params=SamplingParams(), mode="vanilla") -> list[int]:
    return engine.generate(list(prompt), params, StopCriteria(max_new), mode).token_ids


@pytest.fixture(scope="module")
def rprefix():
    p = RedisPrefix()
    yield p
    p.cleanup()


class Cluster:
    """Verify, draft and gateway servers in this process; `verify` overrides the verifier's config."""

    def __init__(self, tiny, rprefix: RedisPrefix, **verify):
        model_dir, head_dir = tiny
        self.vhost, self.verifier = start_verifier(model_dir, max_tree_nodes=MAX_TREE, **verify)
        self.dhost, _ = start_drafter(model_dir, head_dir, [self.vhost.address])
        self.ghost, _ = start_gateway([self.dhost.address], model_dir, store=rprefix.store(), redis=REDIS_URL,
                                      redis_prefix=rprefix.prefix)
        self.channel, self.stub = gateway_stub(self.ghost.address)

    def generate_all(self, prompts, params: list[SamplingParams], max_new: int) -> list[list[int] | str]:
        """Every prompt's generation at once, each on its own thread."""
        out: list[list[int] | str] = [""] * len(prompts)

        def one(i: int) -> None:
            p = params[i]
            msg = common_pb2.SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed)
            try:
                out[i], _ = generate(self.stub, prompts[i], max_new_tokens=max_new, params=msg, timeout=60)
            except grpc.RpcError as e:
                out[i] = f"{e.code().name}: {e.details()}"

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        return out

    def stop(self) -> None:
        self.channel.close()
        for host in (self.ghost, self.dhost, self.vhost):
            host.stop(0.5)


@pytest.fixture(scope="module")
def batched(tiny, rprefix, spans):
    c = Cluster(tiny, rprefix, batch_sessions=4, batch_window_ms=WINDOW_MS)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def unbatched(tiny, rprefix):
    c = Cluster(tiny, rprefix)
    yield c
    c.stop()


# --- raw verifier calls --------------------------------------------------------------------


def prefill(stub, prompt, params=None, max_new=40, resume=(), sid=None) -> verifier_pb2.PrefillResult:
    sid = sid or f"raw-{uuid.uuid4().hex[:8]}"
    msgs = [
        verifier_pb2.PrefillRequest(header=verifier_pb2.PrefillHeader(
            session_id=sid, params=params or common_pb2.SamplingParams(),
            features=common_pb2.FeatureSpec(kind="eagle1"),
            stop=common_pb2.StopCriteria(max_new_tokens=max_new, ignore_eos=True),
            prompt_tokens=len(prompt), resume_tokens=len(resume))),
        verifier_pb2.PrefillRequest(chunk=verifier_pb2.TokenChunk(prompt_ids=list(prompt), resume_ids=list(resume))),
    ]
    out = list(stub.Prefill(iter(msgs), timeout=30))
    assert out[0].WhichOneof("part") == "result"
    return out[0].result


def tree_request(sid, toks, pars) -> verifier_pb2.VerifyRequest:
    return verifier_pb2.VerifyRequest(
        session_id=sid, round=1, tokens=wire.encode(torch.tensor(toks, dtype=torch.int64)),
        parents=wire.encode(torch.tensor(pars, dtype=torch.int64)), logprobs=wire.encode(torch.zeros(len(toks))))


def verify_once(stub, req) -> verifier_pb2.VerifyResponse:
    (resp,) = list(stub.Verify(iter([req]), timeout=30))
    return resp


def chain_round(stub, sid, want, k) -> verifier_pb2.VerifyResponse:
    """A tree whose first draft token is right (want[k + 1]) and second wrong: greedy accepts
    one draft token and adds want[k + 2]."""
    return verify_once(stub, tree_request(sid, [want[k], want[k + 1], (want[k + 2] + 1) % VOCAB], [-1, 0, 1]))


def status_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.details()
    return err.value


# --- 1. the same output, batched --------------------------------------------------------


def test_concurrent_greedy_equals_plain_decoding_and_rounds_are_batched(batched, engine, spans):
    max_new = 40
    spans.clear()
    got = batched.generate_all(PROMPTS, [SamplingParams()] * len(PROMPTS), max_new)
    assert got == [reference(engine, p, max_new) for p in PROMPTS]
    rounds = [s for s in spans.get_finished_spans() if s.name == "verifier.round"]
    sizes = [s.attributes["aerie.batch_size"] for s in rounds]
    assert rounds and all(1 <= n <= 4 for n in sizes)
    assert max(sizes) > 1, sizes  # the rounds of concurrent sessions shared forwards
    assert all(s.attributes["aerie.verify_ms"] >= s.attributes["aerie.forward_ms"] > 0 for s in rounds)


def test_concurrent_sampling_equals_the_unbatched_service(batched, unbatched, engine):
    max_new = 40
    params = [SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=1.0, seed=8),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=3), SamplingParams()]
    got = batched.generate_all(PROMPTS, params, max_new)
    assert got == unbatched.generate_all(PROMPTS, params, max_new)
    assert got == [reference(engine, p, max_new, s, mode="eagle") for p, s in zip(PROMPTS, params)]


# --- 2. a bad tree is refused to its session only ----------------------------------------

BAD_TREES = {
    "cycle": lambda pending: ([pending, 1, 2], [-1, 2, 1]),
    "wrong-root": lambda pending: ([(pending + 1) % VOCAB, 1], [-1, 0]),
    "token-outside-vocab": lambda pending: ([pending, VOCAB + 5], [-1, 0]),
}


@pytest.mark.parametrize("case", list(BAD_TREES))
def test_bad_tree_in_a_batch_is_refused_to_its_session_only(batched, engine, spans, case):
    with channel(batched.vhost.address) as ch:
        stub = verifier_pb2_grpc.VerifierStub(ch)
        prompts = PROMPTS[:3]
        wants = [reference(engine, p, 9) for p in prompts]
        sids = [prefill(stub, p).session_id for p in prompts]
        bad = 1
        rounds_per_session = 3
        barrier = threading.Barrier(len(sids))
        errors: list[str] = []
        results: dict[int, list[int]] = {i: [wants[i][0]] for i in range(len(sids))}

        def drive(i: int) -> None:
            try:
                for r in range(rounds_per_session):
                    barrier.wait(10)
                    if i == bad and r == 1:
                        toks, pars = BAD_TREES[case](results[i][-1])
                        e = status_of(lambda: verify_once(stub, tree_request(sids[i], toks, pars)))
                        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
                        assert sids[i] in e.details() or "tree" in e.details() or "root" in e.details()
                    resp = chain_round(stub, sids[i], wants[i], len(results[i]) - 1)
                    assert resp.accepted_draft == 1
                    results[i] += list(resp.new_tokens)
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                errors.append(f"session {i}: {e!r}")
                barrier.abort()

        spans.clear()
        threads = [threading.Thread(target=drive, args=(i,)) for i in range(len(sids))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        # Every session, the refused one included, went on to the right tokens.
        assert [results[i] for i in range(len(sids))] == [w[: 1 + 2 * rounds_per_session] for w in wants]
        rounds = [s for s in spans.get_finished_spans() if s.name == "verifier.round"]
        # The refused round's span records its error and no batch: it was in none.
        sizes = [s.attributes["aerie.batch_size"] for s in rounds if "aerie.batch_size" in s.attributes]
        assert len(sizes) == len(sids) * rounds_per_session and max(sizes) > 1, sizes
        for sid in sids:
            assert stub.Release(verifier_pb2.ReleaseRequest(session_id=sid), timeout=5).released


# --- 3. rows are given back ----------------------------------------------------------------


def test_released_sessions_free_their_rows_and_the_limit_is_the_row_count(tiny, engine):
    host, servicer = start_verifier(tiny[0], batch_sessions=2, batch_window_ms=1.0, max_tree_nodes=MAX_TREE)
    try:
        with channel(host.address) as ch:
            stub = verifier_pb2_grpc.VerifierStub(ch)
            wants = [reference(engine, p, 9) for p in PROMPTS[:3]]
            a = prefill(stub, PROMPTS[0]).session_id
            b = prefill(stub, PROMPTS[1]).session_id
            e = status_of(lambda: prefill(stub, PROMPTS[2]))
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--batch-sessions" in e.details()
            assert stub.Info(verifier_pb2.VerifierInfoRequest(), timeout=5).max_sessions == 2
            assert list(chain_round(stub, b, wants[1], 0).new_tokens) == wants[1][1:3]
            # a leaves row 0; b's row (with its KV) moves into it; c takes the row freed.
            assert stub.Release(verifier_pb2.ReleaseRequest(session_id=a), timeout=5).released
            c = prefill(stub, PROMPTS[2])
            assert c.pending_token == wants[2][0]
            assert list(chain_round(stub, b, wants[1], 2).new_tokens) == wants[1][3:5]
            assert list(chain_round(stub, c.session_id, wants[2], 0).new_tokens) == wants[2][1:3]
            servicer.drain()  # drain frees every row
            (batch,) = servicer._batches.values()
            assert batch.verifier.rows == [] and batch.verifier.cache.in_use == 0
    finally:
        host.stop(0.5)


def test_a_silent_session_holds_up_one_round_only(tiny, engine):
    window_s = 1.5
    host, _ = start_verifier(tiny[0], batch_sessions=2, batch_window_ms=window_s * 1e3, max_tree_nodes=MAX_TREE)
    try:
        with channel(host.address) as ch:
            stub = verifier_pb2_grpc.VerifierStub(ch)
            want = reference(engine, PROMPTS[0], 9)
            a = prefill(stub, PROMPTS[0]).session_id
            silent = prefill(stub, PROMPTS[1]).session_id
            took = []
            for offset in (0, 2, 4):
                start = time.perf_counter()
                assert list(chain_round(stub, a, want, offset).new_tokens) == want[offset + 1 : offset + 3]
                took.append(time.perf_counter() - start)
            # The first round waits out the window for the silent session; the next ones do not.
            assert took[0] >= window_s * 0.9 and max(took[1:]) < window_s / 2, took
            # Once it speaks again it is waited for again, and its round is right.
            want_silent = reference(engine, PROMPTS[1], 9)
            assert list(chain_round(stub, silent, want_silent, 0).new_tokens) == want_silent[1:3]
    finally:
        host.stop(0.5)


def test_idle_sessions_past_the_ttl_free_their_rows(tiny):
    host, _ = start_verifier(tiny[0], batch_sessions=1, session_ttl_s=0.3, max_tree_nodes=MAX_TREE)
    try:
        with channel(host.address) as ch:
            stub = verifier_pb2_grpc.VerifierStub(ch)
            prefill(stub, PROMPTS[0])
            deadline = time.monotonic() + 10
            while True:
                try:
                    prefill(stub, PROMPTS[1])
                    break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                    assert time.monotonic() < deadline, "the idle session never gave its row back"
                    time.sleep(0.1)
    finally:
        host.stop(0.5)


# --- 4. resume ---------------------------------------------------------------------------


def test_resume_batched_equals_unbatched(batched, unbatched, engine):
    """A prefill with resumed tokens continues where they stopped: greedy, the plain decoding
    tokens; sampled, the same tokens as the unbatched verifier given the same trees."""
    prompt = PROMPTS[0]
    want = reference(engine, prompt, 20)
    sampled = common_pb2.SamplingParams(temperature=1.0, seed=5)
    with channel(batched.vhost.address) as bch, channel(unbatched.vhost.address) as uch:
        bstub, ustub = verifier_pb2_grpc.VerifierStub(bch), verifier_pb2_grpc.VerifierStub(uch)
        res = prefill(bstub, prompt, resume=want[:5])
        assert res.pending_token == want[4] and list(res.generated_ids) == [] and not res.done
        assert res.feature_rows == len(prompt) + 4
        for k in (4, 6):
            assert list(chain_round(bstub, res.session_id, want, k).new_tokens) == want[k + 1:k + 3]
        assert bstub.Release(verifier_pb2.ReleaseRequest(session_id=res.session_id), timeout=5).released

        resumed = reference(engine, prompt, 12, SamplingParams(temperature=1.0, seed=5), mode="eagle")[:6]
        sids = [prefill(stub, prompt, params=sampled, resume=resumed).session_id for stub in (bstub, ustub)]
        pending = [resumed[-1]] * 2
        for _ in range(3):
            out = []
            for stub, sid, p in zip((bstub, ustub), sids, pending):
                resp = verify_once(stub, tree_request(sid, [p, 7, 9, 11], [-1, 0, 1, 0]))
                out.append((list(resp.new_tokens), resp.accepted_draft))
            assert out[0] == out[1]
            pending = [out[0][0][-1]] * 2
        for stub, sid in zip((bstub, ustub), sids):
            stub.Release(verifier_pb2.ReleaseRequest(session_id=sid), timeout=5)


# --- 5. settings ---------------------------------------------------------------------------


def test_batch_settings_from_flags_and_environment():
    from aerie.errors import InputError
    from aerie_rpc.config import from_args, parser_for
    from verify_service.config import VerifyConfig

    args = parser_for(VerifyConfig, "verify", "").parse_args(["--batch-sessions", "8", "--max-sessions", "64"])
    config = from_args(VerifyConfig, args, environ={"AERIE_BATCH_WINDOW_MS": "0.5", "AERIE_BATCH_SESSIONS": "2"})
    assert (config.batch_sessions, config.batch_window_ms) == (8, 0.5)  # the flag beats the variable
    assert config.session_limit == (8, "--batch-sessions")
    assert VerifyConfig().session_limit == (64, "--max-sessions")  # unbatched by default
    assert VerifyConfig(batch_sessions=128, max_sessions=16).session_limit == (16, "--max-sessions")
    sharded = VerifyConfig(batch_sessions=4, tensor_parallel=2)  # batches over a sharded target
    assert (sharded.batch_sessions, sharded.tensor_parallel, sharded.session_limit) == (4, 2, (4, "--batch-sessions"))
    with pytest.raises(InputError, match="--batch-sessions"):
        VerifyConfig(batch_sessions=-1)
