"""The gateway: the client-facing gRPC API in front of the draft services.

A request becomes a session record (Redis or in process) and a call to a draft service, whose
rounds are written to the record before they are streamed on to the client. When the drafter
or its verifier is lost, the gateway calls a drafter again with the tokens generated so far
(a round boundary): the verifier prefills prompt + tokens afresh and the rounds continue with
the same per-position randomness, so the client's stream goes on as if nothing happened.

`GatewayServicer.generate`, `resume`, `get_session` and `cancel_session` are that path, free of
gRPC: the RPCs below wrap them, and so does the OpenAI-compatible HTTP API (gateway/http_api.py).
With API keys configured, every call names its caller (gateway/auth.py), is counted against
the caller's rate limit, and reaches only the sessions that caller created: another caller's
session is answered exactly as an unknown one (NOT_FOUND), so its existence is not revealed.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from aerie.errors import InputError
from aerie.params import SamplingParams
from aerie_rpc.config import service_main
from aerie_rpc.deadlines import Deadline, Deadlines
from aerie_rpc.server import ServiceHost, channel
from aerie_rpc.status import (
    LOST_DRAFTER,
    LOST_VERIFIER,
    Conflict,
    Exhausted,
    ServiceError,
    Unavailable,
    abort,
    rpc_code,
    rpc_details,
    status_of,
    trailing,
)
from aerie_rpc.telemetry import extract_grpc, metadata, setup_tracing, trace_id_hex, tracer
from aerie_rpc.tls import TlsSettings, load_tls
from aerie_rpc.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from gateway.auth import ANONYMOUS, ApiKeys, Principal, bearer_token, load_keys
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics, otlp_readers
from gateway.store import (
    CANCELLED,
    DONE,
    FAILED,
    INTERRUPTED,
    RUNNING,
    MemoryStore,
    RedisStore,
    SessionRecord,
    SessionStore,
    StatusConflict,
    not_found,
)

log = logging.getLogger("aerie.gateway")
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
DEFAULT_MAX_NEW_TOKENS = 128
_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# A drafter call failing with one of these lost a node, not the request: resume elsewhere.
_LOST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
         grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED)
RATE_WINDOW_S = 60.0
DRAFTER_HEALTH_TTL_S = 2.0


class PromptTooLong(Exhausted):
    """A prompt over --max-prompt-tokens (HTTP answers it as 400, not as a capacity limit)."""


class RateLimited(Exhausted):
    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DrafterPool:
    def __init__(self, addresses: tuple[str, ...], cooldown_s: float, tls: TlsSettings | None = None):
        self.addresses = list(addresses)
        self.cooldown_s = cooldown_s
        self.tls = tls
        self._stubs: dict[str, drafter_pb2_grpc.DrafterStub] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._down: dict[str, float] = {}
        self._next = 0
        self._healthy_until = 0.0
        self._lock = threading.Lock()

    def stub(self, address: str) -> drafter_pb2_grpc.DrafterStub:
        with self._lock:
            if address not in self._stubs:
                self._channels[address] = channel(address, self.tls)
                self._stubs[address] = drafter_pb2_grpc.DrafterStub(self._channels[address])
            return self._stubs[address]

    def mark_down(self, address: str) -> None:
        with self._lock:
            self._down[address] = time.monotonic() + self.cooldown_s

    def pick(self, avoid: set[str]) -> str:
        """Round-robin over drafters not avoided and not lost lately; then any not avoided;
        then any at all (a lost node may be back)."""
        with self._lock:
            now = time.monotonic()
            order = self.addresses[self._next:] + self.addresses[: self._next]
            self._next = (self._next + 1) % len(self.addresses)
            for ok in (lambda a: a not in avoid and self._down.get(a, 0) <= now, lambda a: a not in avoid,
                       lambda a: True):
                for a in order:
                    if ok(a):
                        return a
        raise Unavailable("no draft service configured")

    def any_serving(self, timeout_s: float = 1.0) -> bool:
        """Whether some drafter answers its health check SERVING (remembered briefly, so that
        frequent probes cost the drafters nothing)."""
        with self._lock:
            if time.monotonic() < self._healthy_until:
                return True
        for address in self.addresses:
            self.stub(address)
            try:
                resp = health_pb2_grpc.HealthStub(self._channels[address]).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout_s)
            except grpc.RpcError:
                continue
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                with self._lock:
                    self._healthy_until = time.monotonic() + DRAFTER_HEALTH_TTL_S
                return True
        return False

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()


class _Watchdog:
    """Cancels a call that stays silent longer than its current timeout."""

    def __init__(self, deadlines: Deadlines, call, timeout_s: float):
        self.deadlines = deadlines
        self.call = call
        self.fired = False
        self._pending: Deadline | None = None
        self.reset(timeout_s)

    def _fire(self) -> None:
        self.fired = True
        self.call.cancel()

    def reset(self, timeout_s: float) -> None:
        self.stop()
        self._pending = self.deadlines.schedule(timeout_s, self._fire)

    def stop(self) -> None:
        if self._pending is not None:
            self._pending.cancel()


@dataclass
class _Active:
    cancelled: threading.Event = field(default_factory=threading.Event)
    call: object = None


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, config: GatewayConfig, store: SessionStore, tokenizer: object | None = None,
                 model_name: str = "", keys: ApiKeys | None = None, metrics: GatewayMetrics | None = None):
        self.config = config
        self.store = store
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.keys = keys or ApiKeys({})
        self.metrics = metrics or GatewayMetrics()
        self.instance = f"gw-{uuid.uuid4().hex[:12]}"
        self.pool = DrafterPool(config.draft, config.drafter_cooldown_s, load_tls(config))
        self.draining = threading.Event()
        self.deadlines = Deadlines("gateway-watchdog")
        self._active: dict[str, _Active] = {}
        self._lock = threading.Lock()
        self.metrics.watch_active(lambda: len(self._active))

    def drain(self) -> None:
        self.draining.set()

    def readiness(self) -> str | None:
        """None when this gateway can serve a request now; otherwise why it cannot."""
        if self.draining.is_set():
            return "the gateway is shutting down"
        try:
            self.store.ping()
        except Exception as e:  # noqa: BLE001
            return f"the session store is unreachable: {e}"
        if not self.pool.any_serving():
            return "no draft service answers its health check"
        return None

    # --- callers -------------------------------------------------------------------------

    def authorize(self, token: str | None) -> Principal:
        """The caller presenting `token` (raises Unauthenticated), counted against its rate
        limit (raises RateLimited). Without keys every caller is one anonymous caller."""
        caller = self.keys.authenticate(token)
        rpm = self.config.rate_limit_rpm
        if rpm > 0:
            wait_s = self.store.rate_limit(caller.key_id or "anonymous", rpm, RATE_WINDOW_S)
            if wait_s > 0:
                raise RateLimited(f"rate limit of {rpm} requests per minute reached: retry in "
                                  f"{math.ceil(wait_s)} s", wait_s)
        return caller

    def _owned(self, session_id: str, caller: Principal) -> SessionRecord:
        record = self.store.get(session_id)
        if self.keys.enabled and record.key_id != caller.key_id:
            raise not_found(session_id)
        return record

    # --- admission and requests ----------------------------------------------------------

    def _admit(self, session_id: str) -> _Active:
        with self._lock:
            if len(self._active) >= self.config.max_sessions:
                raise Exhausted(f"gateway is serving its maximum of {self.config.max_sessions} sessions: "
                                "retry later or use another gateway")
            if session_id in self._active:
                raise Conflict(f"session '{session_id}' is already being generated by this gateway")
            active = _Active()
            self._active[session_id] = active
            return active

    def _leave(self, session_id: str) -> None:
        with self._lock:
            self._active.pop(session_id, None)

    def _tokenizer(self):
        if self.tokenizer is None:
            raise InputError("this gateway has no tokenizer: send token ids (prompt_ids), or start it with --model DIR")
        return self.tokenizer

    def encode(self, text: str, chat: bool) -> list[int]:
        """A text prompt's ids; `chat` wraps it as one user message in the chat template,
        when the model has one."""
        tok = self._tokenizer()
        if chat and getattr(tok, "chat_template", None):
            return self.encode_chat([{"role": "user", "content": text}])
        return list(tok(text).input_ids)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self._tokenizer()
        if not getattr(tok, "chat_template", None):
            raise InputError("this model has no chat template: send a plain prompt instead")
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template may raise anything on messages it refuses
            raise InputError(f"the model's chat template refused these messages: {e}") from None
        return list(tok(text, add_special_tokens=False).input_ids)

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None or not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _new_record(self, request: gateway_pb2.GenerateRequest, caller: Principal) -> SessionRecord:
        if request.prompt and request.prompt_ids:
            raise InputError("send either prompt (text) or prompt_ids, not both")
        if request.session_id and not _SESSION_ID.match(request.session_id):
            raise InputError("session_id must be 1 to 128 characters of letters, digits and . _ : -")
        p = request.params
        params = SamplingParams(float(p.temperature), float(p.top_p) if p.HasField("top_p") else 1.0,
                                int(p.top_k), int(p.seed))
        max_new = int(request.max_new_tokens) or DEFAULT_MAX_NEW_TOKENS
        if max_new > self.config.max_new_tokens_limit:
            raise InputError(f"max_new_tokens {max_new} is above this gateway's limit of "
                             f"{self.config.max_new_tokens_limit}")
        if request.prompt_ids:
            prompt = [int(i) for i in request.prompt_ids]
            if any(i < 0 for i in prompt):
                raise InputError("prompt_ids must be >= 0")
        elif request.prompt:
            prompt = self.encode(request.prompt, request.chat)
        else:
            raise InputError("prompt is empty: send prompt (text) or prompt_ids")
        if not prompt:
            raise InputError("prompt is empty after tokenization")
        if len(prompt) > self.config.max_prompt_tokens:
            raise PromptTooLong(f"prompt of {len(prompt)} tokens is longer than this gateway's limit of "
                            f"{self.config.max_prompt_tokens}")
        if any(i < 0 for i in request.stop_token_ids):
            raise InputError("stop_token_ids must be >= 0")
        return SessionRecord(
            session_id=request.session_id or uuid.uuid4().hex, prompt_ids=prompt,
            params={"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                    "seed": params.seed},
            max_new_tokens=max_new, stop_token_ids=[int(i) for i in request.stop_token_ids],
            ignore_eos=request.ignore_eos, status=RUNNING, owner=self.instance,
            lease_until=time.time() + self.config.lease_s, model=self.model_name, key_id=caller.key_id,
        )

    # --- the generation path, free of gRPC -----------------------------------------------

    def generate(self, request: gateway_pb2.GenerateRequest, caller: Principal = ANONYMOUS,
                 parent: otel_context.Context | None = None,
                 deadline: float | None = None) -> Iterator[gateway_pb2.GenerateEvent]:
        """Create a session and stream its events. Errors are raised (ServiceError, InputError),
        the first of them before any event; `deadline` is on time.monotonic()'s clock.
        Closing the iterator early leaves the session interrupted, hence resumable."""
        if self.draining.is_set():
            raise Unavailable("gateway is shutting down: use another gateway")
        record = self._new_record(request, caller)
        active = self._admit(record.session_id)
        try:
            self.store.create(record)
        except Exception:
            self._leave(record.session_id)
            raise
        yield from self._serve(record, active, parent, deadline, replay=False, fresh=True)

    def resume(self, session_id: str, replay: bool, caller: Principal = ANONYMOUS,
               parent: otel_context.Context | None = None,
               deadline: float | None = None) -> Iterator[gateway_pb2.GenerateEvent]:
        if self.draining.is_set():
            raise Unavailable("gateway is shutting down: use another gateway")
        record = self._owned(session_id, caller)
        if record.status in (DONE, CANCELLED):
            yield from self._replay_finished(record, replay)
            return
        active = self._admit(session_id)
        try:
            record = self.store.claim(session_id, self.instance, time.time() + self.config.lease_s)
        except Exception:
            self._leave(session_id)
            raise
        yield from self._serve(record, active, parent, deadline, replay=replay, fresh=False)

    def _replay_finished(self, record: SessionRecord, replay: bool) -> Iterator[gateway_pb2.GenerateEvent]:
        sid = record.session_id
        if replay and record.generated_ids:
            yield gateway_pb2.GenerateEvent(session_id=sid, tokens=gateway_pb2.Tokens(
                ids=record.generated_ids, text=self._decode(record.generated_ids),
                generated=len(record.generated_ids)))
        yield gateway_pb2.GenerateEvent(session_id=sid, finished=gateway_pb2.Finished(
            finish_reason=record.finish_reason or record.status, new_tokens=len(record.generated_ids),
            rounds=record.rounds, tau=record.tau, text=self._decode(record.generated_ids),
            token_ids=record.generated_ids, resumes=record.resumes))

    def get_session(self, session_id: str, caller: Principal = ANONYMOUS) -> gateway_pb2.Session:
        rec = self._owned(session_id, caller)
        ttl = self.store.ttl(session_id)
        return gateway_pb2.Session(
            session_id=rec.session_id, status=rec.status, prompt_ids=rec.prompt_ids,
            generated_ids=rec.generated_ids, params=_params_msg(rec.params),
            stop=common_pb2.StopCriteria(max_new_tokens=rec.max_new_tokens, stop_token_ids=rec.stop_token_ids,
                                         ignore_eos=rec.ignore_eos),
            drafter=rec.drafter, verifier=rec.verifier, owner=rec.owner, resumes=rec.resumes, rounds=rec.rounds,
            created_unix=rec.created, updated_unix=rec.updated, ttl_s=ttl, text=self._decode(rec.generated_ids),
            finish_reason=rec.finish_reason, error=rec.error,
        )

    def cancel_session(self, session_id: str, caller: Principal = ANONYMOUS) -> str:
        """Cancel a session wherever it runs (its record says so; the gateway generating it
        stops at its next round). Returns the session's status afterwards."""
        self._owned(session_id, caller)
        try:
            self.store.update(session_id, {"status": CANCELLED, "finish_reason": "cancelled"},
                              allowed=(RUNNING, INTERRUPTED, FAILED))
        except StatusConflict as e:
            if e.status in (DONE, CANCELLED):
                return e.status
            raise
        with self._lock:
            active = self._active.get(session_id)
        if active is not None:
            active.cancelled.set()
            if active.call is not None:
                active.call.cancel()
        return CANCELLED

    # --- RPCs ----------------------------------------------------------------------------

    def _caller(self, context) -> Principal:
        header = next((v for k, v in context.invocation_metadata() if k == "authorization"), None)
        return self.authorize(bearer_token(header if isinstance(header, str) else None))

    def _failed(self, context, method: str, exc: BaseException) -> None:
        code, _ = status_of(exc)
        self.metrics.error("grpc", method, code.name)
        if isinstance(exc, RateLimited):
            context.set_trailing_metadata((("retry-after", str(math.ceil(exc.retry_after_s))),))
        abort(context, exc)

    def Generate(self, request, context):
        self.metrics.request("grpc", "Generate")
        try:
            yield from self.generate(request, self._caller(context), extract_grpc(context), _deadline(context))
        except Exception as e:  # noqa: BLE001
            self._failed(context, "Generate", e)

    def Resume(self, request, context):
        self.metrics.request("grpc", "Resume")
        try:
            yield from self.resume(request.session_id, request.replay, self._caller(context),
                                   extract_grpc(context), _deadline(context))
        except Exception as e:  # noqa: BLE001
            self._failed(context, "Resume", e)

    def GetSession(self, request, context):
        self.metrics.request("grpc", "GetSession")
        try:
            return self.get_session(request.session_id, self._caller(context))
        except Exception as e:  # noqa: BLE001
            self._failed(context, "GetSession", e)
            return None

    def Cancel(self, request, context):
        self.metrics.request("grpc", "Cancel")
        try:
            return gateway_pb2.CancelResponse(status=self.cancel_session(request.session_id, self._caller(context)))
        except Exception as e:  # noqa: BLE001
            self._failed(context, "Cancel", e)
            return None

    # --- one session ---------------------------------------------------------------------

    def _serve(self, record: SessionRecord, active: _Active, parent: otel_context.Context | None,
               deadline: float | None, replay: bool, fresh: bool) -> Iterator[gateway_pb2.GenerateEvent]:
        sid = record.session_id
        cfg = self.config
        m = self.metrics
        span = tracer().start_span("gateway.generate", context=parent, kind=SpanKind.SERVER)
        p = record.params
        for key, value in (
            ("gen_ai.operation.name", "text_completion"), ("gen_ai.provider.name", "aerie"),
            ("gen_ai.request.model", record.model or self.model_name or "unknown"),
            ("gen_ai.request.temperature", float(p["temperature"])), ("gen_ai.request.top_p", float(p["top_p"])),
            ("gen_ai.request.top_k", int(p["top_k"])), ("gen_ai.request.seed", int(p["seed"])),
            ("gen_ai.request.max_tokens", record.max_new_tokens),
            ("gen_ai.usage.input_tokens", len(record.prompt_ids)), ("gen_ai.conversation.id", sid),
            ("aerie.session_id", sid), ("aerie.resumed_request", not fresh),
        ):
            span.set_attribute(key, value)
        trace_id = trace_id_hex(span)
        generated = list(record.generated_ids)
        _, text = text_delta("", self._decode(generated))
        t_start = time.perf_counter()
        start_len = len(generated)
        rounds = accepted = resumes = 0
        first_token_at = last_token_at = 0.0
        finish_reason = None
        completed = False
        try:
            if replay and generated:
                yield gateway_pb2.GenerateEvent(session_id=sid, tokens=gateway_pb2.Tokens(
                    ids=generated, text=text, generated=len(generated)))
            avoid_drafters: set[str] = set()
            avoid_verifiers: set[str] = set()
            announced = False
            attempt = 0
            last_failure = ("", "")
            while finish_reason is None:
                if active.cancelled.is_set():
                    finish_reason = "cancelled"
                    break
                drafter = self.pool.pick(avoid_drafters)
                attempt_span = tracer().start_span(
                    "gateway.attempt", context=trace.set_span_in_context(span), kind=SpanKind.CLIENT)
                attempt_span.set_attribute("aerie.attempt", attempt)
                attempt_span.set_attribute("aerie.drafter", drafter)
                attempt_span.set_attribute("aerie.from_token", len(generated))
                call = self.pool.stub(drafter).Generate(
                    drafter_pb2.DraftGenerateRequest(
                        session_id=sid, prompt_ids=record.prompt_ids, generated_ids=generated,
                        params=_params_msg(p), avoid_verifiers=sorted(avoid_verifiers),
                        stop=common_pb2.StopCriteria(max_new_tokens=record.max_new_tokens,
                                                     stop_token_ids=record.stop_token_ids,
                                                     ignore_eos=record.ignore_eos),
                    ),
                    timeout=_remaining(deadline, cfg.request_timeout_s),
                    metadata=metadata(trace.set_span_in_context(attempt_span)),
                )
                active.call = call
                if active.cancelled.is_set():
                    call.cancel()
                watchdog = _Watchdog(self.deadlines, call, cfg.first_event_timeout_s)
                round_done = False
                try:
                    for ev in call:
                        watchdog.reset(cfg.round_timeout_s)
                        kind = ev.WhichOneof("event")
                        if kind == "started":
                            st = ev.started
                            attempt_span.set_attribute("aerie.verifier", st.verifier)
                            self.store.update(sid, {"drafter": st.drafter, "verifier": st.verifier,
                                                    "trace_id": trace_id}, owner=self.instance)
                            if not announced and fresh and attempt == 0:
                                yield gateway_pb2.GenerateEvent(session_id=sid, started=gateway_pb2.Started(
                                    drafter=st.drafter, verifier=st.verifier, prompt_tokens=len(record.prompt_ids),
                                    trace_id=trace_id, model=record.model or self.model_name))
                            else:
                                yield gateway_pb2.GenerateEvent(session_id=sid, resumed=gateway_pb2.Resumed(
                                    reason=last_failure[1] or "resume requested", failed_node=last_failure[0],
                                    drafter=st.drafter, verifier=st.verifier, from_token=len(generated),
                                    attempt=attempt))
                            announced = True
                            tokens, stats, round_done = list(st.tokens), st.stats, st.done
                        elif kind == "round":
                            tokens, stats, round_done = list(ev.round.tokens), ev.round.stats, ev.round.done
                        elif kind == "done":
                            finish_reason = ev.done.finish_reason or "stop"
                            break
                        else:
                            continue
                        if not tokens and stats.round > 0:
                            continue
                        with tracer().start_as_current_span(
                                "gateway.round", context=trace.set_span_in_context(attempt_span)) as rspan:
                            t0 = time.perf_counter()
                            updates = {"status": DONE, "finish_reason": _reason(generated + tokens, record)} \
                                if round_done else None
                            self.store.append(sid, self.instance, len(generated), tokens,
                                              rounds=1 if stats.round > 0 else 0, accepted=stats.accepted_draft,
                                              lease_until=time.time() + cfg.lease_s, updates=updates)
                            rspan.set_attribute("aerie.round", stats.round)
                            rspan.set_attribute("aerie.committed", len(tokens))
                            rspan.set_attribute("aerie.store_ms", (time.perf_counter() - t0) * 1e3)
                        generated += tokens
                        if stats.round > 0:
                            rounds += 1
                            accepted += stats.accepted_draft
                            m.rounds.add(1)
                            m.accepted_length.record(stats.accepted_draft + 1)
                        if tokens:
                            last_token_at = time.perf_counter()
                            if not first_token_at:
                                first_token_at = last_token_at
                                m.ttft.record(first_token_at - t_start)
                            m.output_tokens.add(len(tokens))
                        delta, text = text_delta(text, self._decode(generated))
                        yield gateway_pb2.GenerateEvent(session_id=sid, tokens=gateway_pb2.Tokens(
                            ids=tokens, text=delta, stats=stats, generated=len(generated)))
                        if round_done:
                            finish_reason = _reason(generated, record)
                            break
                    if finish_reason is None:
                        raise _StreamEnded()
                except (grpc.RpcError, _StreamEnded) as e:
                    if active.cancelled.is_set():
                        finish_reason = "cancelled"
                        break
                    code = rpc_code(e) if isinstance(e, grpc.RpcError) else grpc.StatusCode.UNAVAILABLE
                    details = rpc_details(e) if isinstance(e, grpc.RpcError) else "the drafter ended the stream early"
                    if watchdog.fired:
                        code, details = grpc.StatusCode.UNAVAILABLE, f"drafter {drafter} went silent"
                    attempt_span.set_attribute("aerie.error", f"{code.name}: {details}")
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        avoid_drafters.add(drafter)
                        if avoid_drafters >= set(self.pool.addresses):
                            raise ServiceError(details, code) from None
                    elif code in _LOST:
                        lost_verifier = trailing(e, LOST_VERIFIER) if isinstance(e, grpc.RpcError) else None
                        lost_drafter = trailing(e, LOST_DRAFTER) if isinstance(e, grpc.RpcError) else None
                        if lost_verifier and not lost_drafter:
                            avoid_verifiers.add(lost_verifier)
                            last_failure = (lost_verifier, details)
                        else:
                            self.pool.mark_down(drafter)
                            avoid_drafters.add(drafter)
                            last_failure = (drafter, f"drafter {drafter}: {code.name}: {details}")
                        resumes += 1
                        m.resumes.add(1)
                        if resumes > cfg.max_resumes:
                            raise Unavailable(f"gave up after {cfg.max_resumes} resumes; last failure: "
                                              f"{last_failure[1]}") from None
                        log.warning("session %s: %s; resuming after %d tokens", sid, last_failure[1], len(generated))
                        self.store.update(sid, {"resumes": str(record.resumes + resumes)}, owner=self.instance)
                        time.sleep(min(1.0, 0.05 * resumes))
                    else:
                        raise ServiceError(details, code) from None
                finally:
                    watchdog.stop()
                    attempt_span.end()
                    active.call = None
                attempt += 1
            if finish_reason == "cancelled":
                try:
                    self.store.update(sid, {"status": CANCELLED, "finish_reason": "cancelled"},
                                      allowed=(RUNNING, CANCELLED))
                except StatusConflict:
                    pass
            else:
                self.store.update(sid, {"status": DONE, "finish_reason": finish_reason}, allowed=(RUNNING, DONE))
            seconds = time.perf_counter() - t_start
            final = self.store.get(sid)
            span.set_attribute("gen_ai.usage.output_tokens", len(generated))
            span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
            span.set_attribute("aerie.rounds", final.rounds)
            span.set_attribute("aerie.tau", final.tau)
            span.set_attribute("aerie.resumes", final.resumes)
            new = len(generated) - start_len
            completed = True
            yield gateway_pb2.GenerateEvent(session_id=sid, finished=gateway_pb2.Finished(
                finish_reason=finish_reason, new_tokens=len(generated), rounds=final.rounds, tau=final.tau,
                seconds=seconds, tokens_per_s=new / seconds if seconds > 0 else 0.0, text=self._decode(generated),
                token_ids=generated, resumes=final.resumes))
        except StatusConflict as e:
            # Cancelled (or taken over) through another gateway while we were generating.
            completed = True
            span.record_exception(e)
            raise
        except Exception as e:
            completed = True
            span.record_exception(e)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(e)))
            try:
                self.store.update(sid, {"status": FAILED, "error": str(e)[:500]}, allowed=(RUNNING,),
                                  owner=self.instance)
            except Exception:  # noqa: BLE001
                pass
            raise
        finally:
            if not completed:
                # The client went away (or we are draining): leave the session resumable.
                if active.call is not None:
                    active.call.cancel()
                try:
                    self.store.update(sid, {"status": INTERRUPTED, "lease_until": "0"}, allowed=(RUNNING,),
                                      owner=self.instance)
                except Exception:  # noqa: BLE001
                    pass
            self._leave(sid)
            span.end()
            new = len(generated) - start_len
            if new > 1:
                m.tpot.record((last_token_at - first_token_at) / (new - 1))
            if new > 0:
                m.token_rate.record(new / max(1e-9, last_token_at - t_start))


class _StreamEnded(Exception):
    pass


def text_delta(sent: str, full: str) -> tuple[str, str]:
    """The text to stream next, and all text streamed after it, given `sent` so far and the
    decoding `full` of every token so far. A trailing U+FFFD is a character whose bytes have
    not all come yet: it is held back until the next tokens complete it. Text the decoder
    changed after it went out cannot be taken back: streaming goes on after what still agrees."""
    ready = full.rstrip("\ufffd")
    common = len(sent) if ready.startswith(sent) else len(os.path.commonprefix([sent, ready]))
    return ready[common:], ready


def _reason(generated: list[int], record: SessionRecord) -> str:
    return "length" if len(generated) >= record.max_new_tokens else "stop"


def _params_msg(p: dict) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=float(p["temperature"]), top_p=float(p["top_p"]),
                                     top_k=int(p["top_k"]), seed=int(p["seed"]))


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None


def _remaining(deadline: float | None, limit: float) -> float:
    return min(limit, deadline - time.monotonic()) if deadline is not None else limit


# --- entry point -------------------------------------------------------------------------


def make_store(config: GatewayConfig) -> SessionStore:
    if config.redis:
        store = RedisStore(config.redis, prefix=config.redis_prefix, ttl_s=config.session_ttl_s)
        try:
            store.ping()
        except Exception as e:  # noqa: BLE001
            raise InputError(f"cannot reach Redis at {config.redis}: {e}") from None
        return store
    return MemoryStore(ttl_s=config.session_ttl_s)


def build_servicer(config: GatewayConfig, store: SessionStore | None = None,
                   metrics: GatewayMetrics | None = None) -> GatewayServicer:
    keys = ApiKeys(load_keys(config.api_keys_file, config.api_keys))
    tokenizer = None
    name = config.model_name or ""
    if config.model is not None:
        from aerie_rpc.models import has_tokenizer, resolve_model

        path = resolve_model(config.model)
        if has_tokenizer(path):
            from aerie_rpc.models import load_tokenizer

            tokenizer, _ = load_tokenizer(str(path))
        name = name or config.model
    return GatewayServicer(config, store or make_store(config), tokenizer, model_name=name, keys=keys,
                           metrics=metrics)


def start(
    config: GatewayConfig, servicer: GatewayServicer | None = None, metrics: GatewayMetrics | None = None
) -> tuple[ServiceHost, GatewayServicer]:
    """The gRPC server and, with --http-listen, the HTTP API beside it (`http_api(host)`).
    Without `servicer`, one is built (with `metrics`)."""
    from gateway.http_api import HttpApi

    tls = load_tls(config)  # before the tokenizer loads: a wrong path ends the start at once
    servicer = servicer or build_servicer(config, metrics=metrics)
    sidecars = [HttpApi(config.http_listen, servicer)] if config.http_listen else []
    host = ServiceHost(
        config.listen, lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, s), [SERVICE_NAME],
        workers=config.workers, on_drain=servicer.drain, sidecars=sidecars, tls=tls,
        health_listen=config.health_listen,
    )
    return host, servicer


def http_api(host: ServiceHost):
    """The HTTP API started beside `host`, or None."""
    from gateway.http_api import HttpApi

    return next((s for s in host.sidecars if isinstance(s, HttpApi)), None)


def run(config: GatewayConfig) -> int:
    provider = setup_tracing("aerie-gateway")
    host, servicer = start(config, metrics=GatewayMetrics(otlp_readers()))
    host.serve_until_signalled(config.grace_s)
    servicer.pool.close()
    servicer.metrics.shutdown()
    if provider is not None:
        provider.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    return service_main(GatewayConfig, "aerie serve gateway", "The aerie gateway (client API, sessions).", run, argv)
