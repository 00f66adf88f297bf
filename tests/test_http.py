"""The gateway's OpenAI-compatible HTTP API, API keys, the rate limit and the metrics.

End to end: real verify, draft and gateway servers on loopback (the tiny random Llama, here
with a small chat template of its own), sessions and rate-limit counters in the real Redis,
and the official `openai` client. At temperature 0 every HTTP answer is checked against the
gRPC `Generate` of the same gateway for the same request. The pure parts (request parsing,
stop strings, key files, the Prometheus rendering) are tested on their own at the end.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from aerie.errors import InputError
from aerie_rpc.server import channel
from aerie_rpc.status import Exhausted, NotFound, Unavailable
from aerie_rpc.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from gateway.auth import ANONYMOUS, ApiKeys, Unauthenticated, bearer_token, key_id, load_keys, parse_key_items
from gateway.http_api import api_error, split_listen
from gateway.metrics import prometheus_name, render_prometheus
from gateway.openai_schema import ApiError, StopScanner, parse_chat, parse_completion, parse_json
from gateway.service import PromptTooLong, RateLimited, http_api
from tests.services_support import RedisPrefix, start_drafter, start_gateway, start_verifier
from tests.tiny import build_tiny_model

KEYS = {"alice": "sk-alice-2f9d1c7e5b", "bob": "sk-bob-8a4e6f0d3c"}
RPM = 4  # the rate-limited gateway's limit per key
MODEL = "tiny-chat"
PROMPT = "w3 w14 w15 w9 w26"
MAX_NEW = 24
# A chat template in the tiny tokenizer's words: w4 system, w1 user, w5 assistant, w2 end of
# a turn, w3 the generation prompt.
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}w4 {% elif m['role'] == 'user' %}w1 "
            "{% else %}w5 {% endif %}{{ m['content'] }} w2 {% endfor %}{% if add_generation_prompt %}w3{% endif %}")


# --- servers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory) -> tuple[Path, Path]:
    from transformers import AutoTokenizer

    model_dir, head_dir = build_tiny_model(tmp_path_factory.mktemp("tiny-chat"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(model_dir)
    return model_dir, head_dir


@pytest.fixture(scope="module")
def rprefix():
    p = RedisPrefix()
    yield p
    p.cleanup()


class Servers:
    """One verifier and one drafter; gateway `a` (keys from a file, no rate limit) and gateway
    `b` (keys from the environment's list, RPM requests per minute per key), both on Redis."""

    def __init__(self, tiny_chat, rprefix: RedisPrefix, tmp: Path):
        model_dir, head_dir = tiny_chat
        keys_file = tmp / "api-keys"
        keys_file.write_text("# name:key\n" + "".join(f"{n}:{k}\n" for n, k in KEYS.items()))
        self.vhost, _ = start_verifier(model_dir)
        self.dhost, _ = start_drafter(model_dir, head_dir, [self.vhost.address])
        common = {"store": rprefix.store(), "redis_prefix": rprefix.prefix, "model_name": MODEL,
                  "http_listen": "127.0.0.1:0"}
        self.ghost, self.gateway = start_gateway([self.dhost.address], model_dir, api_keys_file=str(keys_file),
                                                 **common)
        self.bhost, self.limited = start_gateway([self.dhost.address], model_dir, rate_limit_rpm=RPM,
                                                 api_keys=tuple(f"{n}:{k}" for n, k in KEYS.items()), **common)
        self.http = f"http://{http_api(self.ghost).address}"
        self.http_b = f"http://{http_api(self.bhost).address}"
        self.channel = channel(self.ghost.address)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def client(self, key: str = KEYS["alice"], base: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{base or self.http}/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.channel.close()
        for host in (self.bhost, self.ghost, self.dhost, self.vhost):
            host.stop(0.5)


@pytest.fixture(scope="module")
def servers(tiny_chat, rprefix, tmp_path_factory):
    s = Servers(tiny_chat, rprefix, tmp_path_factory.mktemp("keys"))
    yield s
    s.stop()


def auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def grpc_generate(stub, key: str = KEYS["alice"], **fields) -> tuple[str, gateway_pb2.Finished, list]:
    """One generation through the gRPC API: (streamed text, finished event, all events)."""
    events = list(stub.Generate(gateway_pb2.GenerateRequest(**fields), metadata=auth(key), timeout=60))
    text = "".join(ev.tokens.text for ev in events if ev.WhichOneof("event") == "tokens")
    finished = [ev.finished for ev in events if ev.WhichOneof("event") == "finished"]
    assert len(finished) == 1, events
    return text, finished[0], events


def reference(servers: Servers, prompt: str = PROMPT, chat: bool = False, max_new: int = MAX_NEW,
              temperature: float = 0.0, seed: int = 0, top_p: float = 1.0) -> tuple[str, gateway_pb2.Finished]:
    text, fin, _ = grpc_generate(
        servers.stub, prompt=prompt, chat=chat, max_new_tokens=max_new,
        params=common_pb2.SamplingParams(temperature=temperature, seed=seed, top_p=top_p))
    assert text == fin.text and fin.new_tokens == max_new
    return text, fin


def session_keys(rprefix: RedisPrefix) -> set[bytes]:
    return set(rprefix.client.scan_iter(match=f"{rprefix.prefix}session:*"))


def scrape(base: str) -> dict[str, float]:
    resp = httpx.get(f"{base}/metrics", timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    out: dict[str, float] = {}
    for line in resp.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def check_error(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["message"]  # something a person can act on
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


# --- 1. the same answers as the gRPC path --------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completion_equals_grpc(servers, stream):
    want, _ = reference(servers)
    client = servers.client()
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_NEW, "temperature": 0}
    if not stream:
        resp = client.completions.create(**kw)
        assert resp.object == "text_completion" and resp.model == MODEL and resp.id.startswith("cmpl-")
        (choice,) = resp.choices
        assert choice.text == want and choice.finish_reason == "length"
        usage = resp.usage
    else:
        chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        *choice_chunks, last = chunks
        assert last.choices == [] and last.usage is not None  # the usage chunk comes last
        assert all(c.usage is None for c in choice_chunks) and len({c.id for c in chunks}) == 1
        assert "".join(c.choices[0].text for c in choice_chunks) == want
        reasons = [c.choices[0].finish_reason for c in choice_chunks]
        assert reasons[-1] == "length" and not any(reasons[:-1])
        assert len(choice_chunks) > 2  # really streamed, round by round
        usage = last.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
        (len(PROMPT.split()), MAX_NEW, len(PROMPT.split()) + MAX_NEW)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_equals_grpc(servers, stream):
    want, _ = reference(servers, chat=True)
    client = servers.client()
    kw = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_NEW, "temperature": 0}
    if not stream:
        resp = client.chat.completions.create(**kw)
        assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
        (choice,) = resp.choices
        assert choice.message.role == "assistant" and choice.message.content == want
        assert choice.finish_reason == "length"
        usage = resp.usage
    else:
        chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        *choice_chunks, last = chunks
        assert choice_chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in choice_chunks) == want
        assert choice_chunks[-1].choices[0].finish_reason == "length"
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        usage = last.usage
    # The template wrapped the prompt: w1 <prompt> w2 w3.
    assert usage.prompt_tokens == len(PROMPT.split()) + 3 and usage.completion_tokens == MAX_NEW


def test_chat_template_takes_every_message(servers):
    messages = [{"role": "system", "content": "w7"}, {"role": "user", "content": "w8 w9"},
                {"role": "assistant", "content": "w10"}, {"role": "developer", "content": "w11"},
                {"role": "user", "content": [{"type": "text", "text": "w12 "}, {"type": "text", "text": "w13"}]}]
    # What the template makes of them, sent as token ids over gRPC ('developer' is a system turn).
    ids = [4, 7, 2, 1, 8, 9, 2, 5, 10, 2, 4, 11, 2, 1, 12, 13, 2, 3]
    events = list(servers.stub.Generate(gateway_pb2.GenerateRequest(prompt_ids=ids, max_new_tokens=12),
                                        metadata=auth(KEYS["alice"]), timeout=60))
    want = next(ev.finished.text for ev in events if ev.WhichOneof("event") == "finished")
    resp = servers.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert resp.choices[0].message.content == want
    assert resp.usage.prompt_tokens == len(ids)


def test_sampling_parameters_are_carried(servers):
    """temperature, top_p and seed reach the engine: the sampled text is the gRPC path's for
    the same seed, and another seed gives another text."""
    want, _ = reference(servers, temperature=1.0, seed=7, top_p=0.9, max_new=32)
    other, _ = reference(servers, temperature=1.0, seed=8, top_p=0.9, max_new=32)
    greedy, _ = reference(servers, max_new=32)
    assert len({want, other, greedy}) == 3
    resp = servers.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=1.0,
                                                top_p=0.9, seed=7)
    assert resp.choices[0].text == want


def test_completion_takes_token_ids(servers):
    want, _ = reference(servers)
    resp = servers.client().completions.create(model=MODEL, prompt=[3, 14, 15, 9, 26], max_tokens=MAX_NEW,
                                                temperature=0)
    assert resp.choices[0].text == want


# --- 2. stop strings -------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_string_cuts_and_cancels(servers, rprefix, stream):
    full, _ = reference(servers, max_new=60)
    words = full.split()
    # Two words (so two tokens) first seen past the start: the stop spans a token boundary.
    i = next(i for i in range(1, len(words) - 1) if words[i] not in words[:i])
    stop = f"{words[i]} {words[i + 1]}"
    want = full[: full.index(stop)]
    assert want
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 60, "temperature": 0, "stop": ["w999", stop]}
    with httpx.Client(timeout=60) as http:
        resp = http.post(f"{servers.http}/v1/completions", json={**kw, "stream": stream},
                         headers={"Authorization": f"Bearer {KEYS['alice']}"})
    assert resp.status_code == 200
    sid = resp.headers["x-aerie-session-id"]
    if stream:
        events = [line[len("data: "):] for line in resp.text.split("\n\n") if line]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        pieces = [c["choices"][0]["text"] for c in chunks]
        assert not any(stop in p for p in pieces)  # no part of the stop string ever went out
        assert "".join(pieces) == want and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    else:
        body = resp.json()
        assert body["choices"][0]["text"] == want and body["choices"][0]["finish_reason"] == "stop"
        assert 0 < body["usage"]["completion_tokens"] < 60
    record = rprefix.store().get(sid)
    assert record.status == "cancelled" and len(record.generated_ids) < 60


# --- 3. errors -------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("bad-temperature", "/v1/completions", {"prompt": "w1", "temperature": -1}, 400, "temperature"),
    ("n-2", "/v1/completions", {"prompt": "w1", "n": 2}, 400, "n"),
    ("max-tokens-0", "/v1/completions", {"prompt": "w1", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-text", "/v1/chat/completions", {"messages": [{"role": "user", "content": "w1"}],
                                                 "max_tokens": "9"}, 400, "max_tokens"),
    ("no-prompt", "/v1/completions", {}, 400, "prompt"),
    ("two-prompts", "/v1/completions", {"prompt": ["w1", "w2"]}, 400, "prompt"),
    ("no-messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("bad-role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "w1"}]}, 400,
     "messages[0].role"),
    ("unknown-field", "/v1/completions", {"prompt": "w1", "frobnicate": 1}, 400, "frobnicate"),
    ("unsupported", "/v1/completions", {"prompt": "w1", "logprobs": 3}, 400, "logprobs"),
    ("too-many-stops", "/v1/completions", {"prompt": "w1", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("over-the-limit", "/v1/completions", {"prompt": "w1", "max_tokens": 100_000}, 400, None),
    ("unknown-model", "/v1/completions", {"prompt": "w1", "model": "gpt-9"}, 404, "model"),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request(servers, rprefix, name, path, body, status, param):
    before = session_keys(rprefix)
    resp = httpx.post(f"{servers.http}{path}", json={"model": MODEL, **body}, timeout=30,
                      headers={"Authorization": f"Bearer {KEYS['alice']}"})
    err = check_error(resp, status, param=param)
    assert err["type"] == "invalid_request_error"
    assert session_keys(rprefix) == before  # no session was created


def test_bad_requests_leave_a_running_stream_alone(servers):
    """A stream in flight finishes right while bad requests come and go beside it."""
    want, _ = reference(servers, max_new=200)
    stream = servers.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, temperature=0,
                                                  stream=True)
    pieces = [next(stream).choices[0].text]
    for _, path, body, status, _ in BAD_REQUESTS:
        resp = httpx.post(f"{servers.http}{path}", json={"model": MODEL, **body}, timeout=30,
                          headers={"Authorization": f"Bearer {KEYS['bob']}"})
        assert resp.status_code == status
    pieces += [c.choices[0].text for c in stream]
    assert "".join(pieces) == want


def test_openai_client_raises_the_right_errors(servers):
    with pytest.raises(openai.BadRequestError) as err:
        servers.client().completions.create(model=MODEL, prompt="w1", n=2)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError) as err:
        servers.client().chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "w1"}])
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError) as err:
        servers.client(key="sk-wrong").completions.create(model=MODEL, prompt="w1")
    assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Basic xyz"},
                                     {"Authorization": f"Bearer {KEYS['alice']}x"}],
                         ids=["none", "wrong", "not-bearer", "longer"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/models"])
def test_http_needs_a_key(servers, rprefix, headers, path):
    before = session_keys(rprefix)
    body = {"/v1/completions": {"model": MODEL, "prompt": "w1"},
            "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "w1"}]}}.get(path)
    resp = httpx.request("POST" if body else "GET", f"{servers.http}{path}", json=body, headers=headers, timeout=30)
    err = check_error(resp, 401, code="invalid_api_key")
    assert err["type"] == "authentication_error"
    assert session_keys(rprefix) == before


def test_routes_methods_and_sizes(servers):
    alice = {"Authorization": f"Bearer {KEYS['alice']}"}
    check_error(httpx.get(f"{servers.http}/v1/nothing", headers=alice, timeout=10), 404, code="unknown_route")
    resp = httpx.get(f"{servers.http}/v1/completions", headers=alice, timeout=10)
    check_error(resp, 405, code="method_not_allowed")
    assert resp.headers["allow"] == "POST"
    big = b'{"model": "' + b"x" * (2 << 20) + b'"}'
    resp = httpx.post(f"{servers.http}/v1/completions", content=big, headers=alice, timeout=30)
    check_error(resp, 413, code="request_too_large")
    check_error(httpx.post(f"{servers.http}/v1/completions", content=b"{not json", headers=alice, timeout=10), 400,
                code="invalid_json")
    # Error answers keep the connection in step: the next request on it is read right, whether
    # the refused body was read (400) or not (405, 401).
    with httpx.Client(timeout=30, headers=alice) as http:
        check_error(http.post(f"{servers.http}/v1/completions", json={"model": MODEL}), 400)
        assert http.get(f"{servers.http}/v1/models").status_code == 200
        check_error(http.put(f"{servers.http}/v1/models", json={"model": MODEL}), 405)
        assert http.get(f"{servers.http}/v1/models").status_code == 200
        check_error(http.post(f"{servers.http}/v1/completions", json={"prompt": "w1" * 500},
                              headers={"Authorization": "Bearer no"}), 401)
        assert http.get(f"{servers.http}/v1/models").status_code == 200


def test_models_health_and_metrics_routes(servers):
    client = servers.client()
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    # Probes and scrapers need no key.
    resp = httpx.get(f"{servers.http}/health", timeout=10)
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}
    assert httpx.get(f"{servers.http}/metrics", timeout=10).status_code == 200


def test_health_is_503_when_the_gateway_cannot_serve(servers, tiny_chat):
    model_dir, _ = tiny_chat
    # No drafter answers at this address.
    host, _ = start_gateway(["127.0.0.1:9"], model_dir, http_listen="127.0.0.1:0", model_name=MODEL)
    try:
        base = f"http://{http_api(host).address}"
        check_error(httpx.get(f"{base}/health", timeout=10), 503, code="unavailable")
    finally:
        host.stop(0.5)
    host, gw = start_gateway([servers.dhost.address], model_dir, http_listen="127.0.0.1:0", model_name=MODEL)
    try:
        base = f"http://{http_api(host).address}"
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        gw.drain()
        err = check_error(httpx.get(f"{base}/health", timeout=10), 503)
        assert "shutting down" in err["message"]
        resp = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "w1"}, timeout=10)
        check_error(resp, 503)
        assert resp.headers["retry-after"] == "1"
    finally:
        host.stop(0.5)


# --- 4. API keys on gRPC, ownership ----------------------------------------------------------


@pytest.mark.parametrize("metadata", [(), auth("sk-wrong"), [("authorization", KEYS["alice"])]],
                         ids=["none", "wrong", "no-scheme"])
def test_grpc_needs_a_key(servers, rprefix, metadata):
    before = session_keys(rprefix)
    calls = [
        lambda: list(servers.stub.Generate(gateway_pb2.GenerateRequest(prompt_ids=[1, 2], max_new_tokens=4),
                                           metadata=metadata, timeout=10)),
        lambda: servers.stub.GetSession(gateway_pb2.GetSessionRequest(session_id="x"), metadata=metadata,
                                        timeout=10),
        lambda: servers.stub.Cancel(gateway_pb2.CancelRequest(session_id="x"), metadata=metadata, timeout=10),
        lambda: list(servers.stub.Resume(gateway_pb2.ResumeRequest(session_id="x"), metadata=metadata,
                                         timeout=10)),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    assert session_keys(rprefix) == before


def test_a_key_reaches_only_its_own_sessions(servers, rprefix):
    sid = f"own-{uuid.uuid4().hex[:8]}"
    text, fin, _ = grpc_generate(servers.stub, KEYS["alice"], prompt_ids=[1, 2, 3], max_new_tokens=8, session_id=sid)
    record = rprefix.store().get(sid)
    assert record.key_id == key_id("alice") != key_id("bob")
    raw = b" ".join(v for v in rprefix.client.hgetall(rprefix.key(sid)).values())
    assert KEYS["alice"].encode() not in raw and b"alice" not in raw  # neither the key nor its name

    bob = auth(KEYS["bob"])
    for call in (
        lambda: servers.stub.GetSession(gateway_pb2.GetSessionRequest(session_id=sid), metadata=bob, timeout=10),
        lambda: list(servers.stub.Resume(gateway_pb2.ResumeRequest(session_id=sid, replay=True), metadata=bob,
                                         timeout=10)),
        lambda: servers.stub.Cancel(gateway_pb2.CancelRequest(session_id=sid), metadata=bob, timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        # Answered as an unknown session, so bob learns nothing about alice's.
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "unknown session" in err.value.details()
    assert rprefix.store().get(sid).status == "done"  # bob's cancel changed nothing

    mine = servers.stub.GetSession(gateway_pb2.GetSessionRequest(session_id=sid), metadata=auth(KEYS["alice"]),
                                   timeout=10)
    assert mine.text == fin.text == text and mine.status == "done"
    replay = list(servers.stub.Resume(gateway_pb2.ResumeRequest(session_id=sid, replay=True),
                                      metadata=auth(KEYS["alice"]), timeout=10))
    assert [ev.finished.text for ev in replay if ev.WhichOneof("event") == "finished"] == [text]


def test_http_sessions_belong_to_their_key(servers):
    resp = servers.client().completions.with_raw_response.create(model=MODEL, prompt="w1 w2", max_tokens=4)
    sid = resp.headers["x-aerie-session-id"]
    assert resp.parse().id == f"cmpl-{sid}"
    with pytest.raises(grpc.RpcError) as err:
        servers.stub.GetSession(gateway_pb2.GetSessionRequest(session_id=sid), metadata=auth(KEYS["bob"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    got = servers.stub.GetSession(gateway_pb2.GetSessionRequest(session_id=sid), metadata=auth(KEYS["alice"]),
                                  timeout=10)
    assert got.text == resp.parse().choices[0].text


# --- 5. the rate limit (in Redis) ------------------------------------------------------------


def test_rate_limit_per_key(servers, rprefix):
    alice = servers.client(base=servers.http_b)
    for _ in range(RPM):
        assert [m.id for m in alice.models.list()] == [MODEL]
    resp = httpx.get(f"{servers.http_b}/v1/models", headers={"Authorization": f"Bearer {KEYS['alice']}"},
                     timeout=10)
    err = check_error(resp, 429, code="rate_limit_exceeded")
    assert err["type"] == "rate_limit_error"
    assert 1 <= int(resp.headers["retry-after"]) <= 60
    with pytest.raises(openai.RateLimitError):
        alice.completions.create(model=MODEL, prompt="w1", max_tokens=2)
    with grpc.insecure_channel(servers.bhost.address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        with pytest.raises(grpc.RpcError) as rpc_err:
            stub.GetSession(gateway_pb2.GetSessionRequest(session_id="x"), metadata=auth(KEYS["alice"]), timeout=10)
        assert rpc_err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(rpc_err.value.trailing_metadata())["retry-after"].isdigit()
        # Another key has a window of its own.
        with pytest.raises(grpc.RpcError) as rpc_err:
            stub.GetSession(gateway_pb2.GetSessionRequest(session_id="x"), metadata=auth(KEYS["bob"]), timeout=10)
        assert rpc_err.value.code() == grpc.StatusCode.NOT_FOUND
    assert [m.id for m in servers.client(KEYS["bob"], base=servers.http_b).models.list()] == [MODEL]
    # The counters live in Redis under the key's id, never the key; gateway `a` has no limit.
    key = f"{rprefix.prefix}rate:{key_id('alice')}"
    assert rprefix.client.zcard(key) == RPM
    assert not any(KEYS["alice"].encode() in k for k in rprefix.client.scan_iter(match=f"{rprefix.prefix}*"))
    assert servers.client().models.list().data


# --- 6. metrics ------------------------------------------------------------------------------


def test_metrics_move_with_a_request(servers, rprefix):
    before = scrape(servers.http)
    raw = servers.client().completions.with_raw_response.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_NEW,
                                                                 temperature=0)
    resp, record = raw.parse(), rprefix.store().get(raw.headers["x-aerie-session-id"])
    with pytest.raises(openai.AuthenticationError):
        servers.client(key="sk-wrong").completions.create(model=MODEL, prompt="w1")
    after = scrape(servers.http)

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert moved('aerie_gateway_requests_total{api="http",method="/v1/completions"}') == 2
    assert moved('aerie_gateway_errors_total{api="http",code="401",method="/v1/completions"}') == 1
    assert moved("aerie_gateway_output_tokens_total") == resp.usage.completion_tokens == MAX_NEW
    assert moved("aerie_gateway_time_to_first_token_seconds_count") == 1
    assert moved("aerie_gateway_time_per_output_token_seconds_count") == 1
    assert moved("aerie_gateway_tokens_per_second_count") == 1
    assert moved("aerie_gateway_rounds_total") == moved("aerie_gateway_accepted_length_count") == record.rounds
    assert 0 < record.rounds < MAX_NEW
    assert moved("aerie_gateway_accepted_length_sum") == record.accepted + record.rounds
    assert after['aerie_gateway_time_to_first_token_seconds_bucket{le="+Inf"}'] == \
        after["aerie_gateway_time_to_first_token_seconds_count"]
    assert after["aerie_gateway_active_sessions"] == 0


def test_metrics_count_grpc_errors_by_code(servers):
    before = scrape(servers.http)
    with pytest.raises(grpc.RpcError):
        servers.stub.GetSession(gateway_pb2.GetSessionRequest(session_id="nobody"), metadata=auth(KEYS["alice"]),
                                timeout=10)
    after = scrape(servers.http)
    name = 'aerie_gateway_errors_total{api="grpc",code="NOT_FOUND",method="GetSession"}'
    assert after[name] - before.get(name, 0.0) == 1


# --- 7. the command line with a key ----------------------------------------------------------


def test_cli_sends_the_key(servers, monkeypatch, capsys):
    from aerie.cli import main
    from gateway.cli import generate_via_gateway
    from gateway.client import GatewayError

    want, _ = reference(servers, max_new=12)
    with pytest.raises(GatewayError, match="UNAUTHENTICATED"):
        generate_via_gateway(servers.ghost.address, PROMPT, max_new_tokens=12, temperature=0, top_p=1, seed=0,
                             chat=False)
    got = generate_via_gateway(servers.ghost.address, PROMPT, max_new_tokens=12, temperature=0, top_p=1, seed=0,
                               chat=False, api_key=KEYS["bob"])
    assert got["text"] == want
    monkeypatch.setenv("AERIE_API_KEY", KEYS["alice"])
    assert main(["generate", "--prompt", PROMPT, "--no-chat", "--max-new-tokens", "12", "--json", "--gateway",
                 servers.ghost.address]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == want


# --- 8. the pure parts -----------------------------------------------------------------------


def test_parse_completion_defaults_and_values():
    req = parse_completion({"model": "m", "prompt": "hi"})
    assert (req.temperature, req.top_p, req.seed, req.max_tokens, req.stream, req.stop) == (1.0, 1.0, None, 0,
                                                                                            False, ())
    req = parse_completion({"model": "m", "prompt": [[5, 6]], "temperature": 0, "top_p": 0.5, "seed": 3,
                            "max_tokens": 9, "stop": "x", "stream": True, "stream_options": {"include_usage": True},
                            "user": "u1", "frequency_penalty": 0, "n": 1, "top_k": -1})
    assert (req.prompt_ids, req.temperature, req.top_p, req.seed, req.max_tokens, req.stop, req.include_usage,
            req.top_k) == ([5, 6], 0.0, 0.5, 3, 9, ("x",), True, 0)


def test_parse_chat_roles_and_token_limits():
    req = parse_chat({"model": "m", "messages": [{"role": "developer", "content": "a"},
                                                 {"role": "user", "content": [{"type": "text", "text": "b"}]}],
                      "max_completion_tokens": 7})
    assert req.messages == [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
    assert req.max_tokens == 7 and req.chat
    with pytest.raises(ApiError) as err:
        parse_chat({"model": "m", "messages": [{"role": "user", "content": "a"}], "max_tokens": 3,
                    "max_completion_tokens": 4})
    assert err.value.param == "max_completion_tokens"


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x"}, "model"),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "m", "prompt": "x", "seed": -1}, "seed"),
    ({"model": "m", "prompt": "x", "seed": 2**62}, "seed"),
    ({"model": "m", "prompt": "x", "temperature": True}, "temperature"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "m", "prompt": "x", "stop": [""]}, "stop"),
    ({"model": "m", "prompt": [1, -2]}, "prompt"),
    ({"model": "m", "prompt": ""}, "prompt"),
    ({"model": "m", "prompt": "x", "tools": [{"type": "function"}]}, "tools"),
], ids=["model", "top_p", "seed", "huge-seed", "bool-temperature", "options-without-stream", "empty-stop", "negative-id",
        "empty-prompt", "tools"])
def test_parse_errors_name_the_parameter(body, param):
    with pytest.raises(ApiError) as err:
        parse_completion(body)
    assert err.value.status == 400 and err.value.param == param


def test_parse_json_refuses_non_objects():
    assert parse_json(b'{"a": 1}') == {"a": 1}
    for raw in (b"[1]", b"\xff", b"{"):
        with pytest.raises(ApiError) as err:
            parse_json(raw)
        assert err.value.code == "invalid_json"


def test_stop_scanner_holds_back_a_possible_stop():
    s = StopScanner(("END", "xy"))
    assert s.feed("abc E") == "abc"  # " E" is held: it might end in "END"
    assert s.feed("N") == " "
    assert s.feed("D more") == "" and s.stopped  # "END" completed: nothing of it goes out
    assert s.flush() == ""
    s = StopScanner(("END",))
    assert s.feed("EN") + s.feed("x") + s.flush() == "ENx"  # held back, then released
    s = StopScanner(("bb", "abc"))
    assert s.feed("zabbc") == "za" and s.stopped  # the earliest stop wins
    s = StopScanner(())
    assert s.feed("anything") == "anything" and s.flush() == ""


def test_stop_scanner_output_is_the_text_before_the_stop():
    text, stop = "one two three four", "three"
    for size in range(1, len(text) + 1):
        s = StopScanner((stop,))
        out = "".join(s.feed(text[i : i + size]) for i in range(0, len(text), size)) + s.flush()
        assert out == "one two " and s.stopped, size


def test_key_items_and_files(tmp_path):
    assert parse_key_items(["# comment", "", "alice: k1 ", "k2"], "f") == {
        "alice": "k1", f"key-{hashlib.sha256(b'k2').hexdigest()[:12]}": "k2"}
    for bad in (["a:k1", "a:k2"], ["a:k1", "b:k1"], [":k"], ["a:"]):
        with pytest.raises(InputError):
            parse_key_items(bad, "f")
    path = tmp_path / "keys"
    path.write_text("alice:k1\n")
    assert load_keys(str(path), ["bob:k2"]) == {"alice": "k1", "bob": "k2"}
    with pytest.raises(InputError, match="twice"):
        load_keys(str(path), ["alice:k3"])
    path.write_text("# nothing\n")
    with pytest.raises(InputError, match="no keys"):
        load_keys(str(path), [])  # an empty file must not turn authentication off
    with pytest.raises(InputError, match="cannot read"):
        load_keys(str(tmp_path / "missing"), [])
    assert load_keys(None, []) == {}


def test_keys_stay_out_of_the_config_repr():
    from aerie_rpc.config import from_args
    from gateway.config import GatewayConfig

    config = from_args(GatewayConfig, None, {"AERIE_DRAFT": "d:1", "AERIE_API_KEYS": "alice:sk-env-1,bob:sk-env-2"})
    assert config.api_keys == ("alice:sk-env-1", "bob:sk-env-2")
    assert "sk-env" not in repr(config) and "rate_limit_rpm=0" in repr(config)


def test_api_keys_authenticate():
    keys = ApiKeys({"alice": "k1", "bob": "k2"})
    assert keys.authenticate("k2").name == "bob" and keys.authenticate("k2").key_id == key_id("bob")
    for token in (None, "k", "k1 ", "K1"):
        with pytest.raises(Unauthenticated):
            keys.authenticate(token)
    assert ApiKeys({}).authenticate(None) is ANONYMOUS and not ApiKeys({}).enabled
    assert bearer_token("Bearer abc") == bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None and bearer_token(None) is None


@pytest.mark.parametrize("exc,status,code", [
    (RateLimited("slow down", 2.2), 429, "rate_limit_exceeded"),
    (PromptTooLong("long"), 400, "context_length_exceeded"),
    (Unauthenticated("who"), 401, "invalid_api_key"),
    (InputError("bad"), 400, "invalid_value"),
    (NotFound("gone"), 404, "not_found"),
    (Exhausted("full"), 503, "overloaded"),
    (Unavailable("down"), 503, "unavailable"),
    (RuntimeError("bug"), 500, "internal_error"),
])
def test_errors_map_to_http(exc, status, code):
    err = api_error(exc)
    assert (err.status, err.code) == (status, code)
    if status == 429:
        assert err.headers == {"Retry-After": "3"}


def test_split_listen():
    assert split_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert split_listen("[::1]:0") == ("::1", 0)
    for bad in ("8080", ":8080", "host:http"):
        with pytest.raises(InputError):
            split_listen(bad)


def test_render_prometheus():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meter = provider.get_meter("t")
    counter = meter.create_counter("app.requests", description="requests\nreceived")
    counter.add(2, {"route": '/a"b', "code": "200"})
    counter.add(1, {"route": "/c", "code": "500"})
    hist = meter.create_histogram("app.latency", unit="s", description="latency",
                                  explicit_bucket_boundaries_advisory=[0.1, 1.0])
    for v in (0.05, 0.5, 0.7, 3.0):
        hist.record(v)
    meter.create_up_down_counter("app.open").add(3)
    text = render_prometheus(reader.get_metrics_data())
    lines = text.splitlines()
    assert lines[:2] == ["# HELP app_requests_total requests\\nreceived", "# TYPE app_requests_total counter"]
    assert 'app_requests_total{code="200",route="/a\\"b"} 2' in lines
    assert 'app_requests_total{code="500",route="/c"} 1' in lines
    assert "# TYPE app_latency_seconds histogram" in lines
    i = lines.index('app_latency_seconds_bucket{le="0.1"} 1')
    assert lines[i: i + 5] == ['app_latency_seconds_bucket{le="0.1"} 1', 'app_latency_seconds_bucket{le="1"} 3',
                               'app_latency_seconds_bucket{le="+Inf"} 4', "app_latency_seconds_sum 4.25",
                               "app_latency_seconds_count 4"]
    assert "# TYPE app_open gauge" in lines and "app_open 3" in lines
    assert text.endswith("\n") and render_prometheus(None) == ""
    provider.shutdown()


def test_prometheus_names():
    assert prometheus_name("aerie.gateway.rounds", "", counter=True) == "aerie_gateway_rounds_total"
    assert prometheus_name("a.b_seconds", "s", counter=False) == "a_b_seconds"
    assert prometheus_name("x-y", "{token}", counter=False) == "x_y"
