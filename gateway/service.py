"""The gateway: the client-facing gRPC API in front of the draft services.

A request becomes a session record (Redis or in process) and a call to a draft service, whose
rounds are written to the record before they are streamed on to the client. When the drafter
or its verifier is lost, the gateway calls a drafter again with the tokens generated so far
(a round boundary): the verifier prefills prompt + tokens afresh and the rounds continue with
the same per-position randomness, so the client's stream goes on as if nothing happened.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from aerie.errors import InputError
from aerie.sampling import SamplingParams
from aerie_rpc.config import service_main
from aerie_rpc.server import ServiceHost, channel
from aerie_rpc.status import (
    Conflict,
    Exhausted,
    ServiceError,
    Unavailable,
    abort,
    rpc_code,
    rpc_details,
    trailing,
)
from aerie_rpc.telemetry import extract_grpc, metadata, setup_tracing, trace_id_hex, tracer
from aerie_rpc.tls import TlsSettings, load_tls
from aerie_rpc.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from draft_service.service import LOST_DRAFTER, LOST_VERIFIER
from gateway.config import GatewayConfig
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
)

log = logging.getLogger("aerie.gateway")
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
DEFAULT_MAX_NEW_TOKENS = 128
_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# A drafter call failing with one of these lost a node, not the request: resume elsewhere.
_LOST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
         grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED)


class DrafterPool:
    def __init__(self, addresses: tuple[str, ...], cooldown_s: float, tls: TlsSettings | None = None):
        self.addresses = list(addresses)
        self.cooldown_s = cooldown_s
        self.tls = tls
        self._stubs: dict[str, drafter_pb2_grpc.DrafterStub] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._down: dict[str, float] = {}
        self._next = 0
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

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()


class _Watchdog:
    """Cancels a call that stays silent longer than its current timeout."""

    def __init__(self, call, timeout_s: float):
        self.call = call
        self.fired = False
        self._timer: threading.Timer | None = None
        self.reset(timeout_s)

    def _fire(self) -> None:
        self.fired = True
        self.call.cancel()

    def reset(self, timeout_s: float) -> None:
        self.stop()
        self._timer = threading.Timer(timeout_s, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


@dataclass
class _Active:
    cancelled: threading.Event = field(default_factory=threading.Event)
    call: object = None


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, config: GatewayConfig, store: SessionStore, tokenizer: object | None = None,
                 model_name: str = ""):
        self.config = config
        self.store = store
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.instance = f"gw-{uuid.uuid4().hex[:12]}"
        self.pool = DrafterPool(config.draft, config.drafter_cooldown_s, load_tls(config))
        self.draining = threading.Event()
        self._active: dict[str, _Active] = {}
        self._lock = threading.Lock()

    def drain(self) -> None:
        self.draining.set()

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

    def _encode(self, text: str, chat: bool) -> list[int]:
        tok = self.tokenizer
        if tok is None:
            raise InputError("this gateway has no tokenizer: send prompt_ids, or start it with --model DIR")
        if chat and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
            return list(tok(text, add_special_tokens=False).input_ids)
        return list(tok(text).input_ids)

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None or not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _new_record(self, request: gateway_pb2.GenerateRequest) -> SessionRecord:
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
            prompt = self._encode(request.prompt, request.chat)
        else:
            raise InputError("prompt is empty: send prompt (text) or prompt_ids")
        if not prompt:
            raise InputError("prompt is empty after tokenization")
        if len(prompt) > self.config.max_prompt_tokens:
            raise Exhausted(f"prompt of {len(prompt)} tokens is longer than this gateway's limit of "
                            f"{self.config.max_prompt_tokens}")
        if any(i < 0 for i in request.stop_token_ids):
            raise InputError("stop_token_ids must be >= 0")
        return SessionRecord(
            session_id=request.session_id or uuid.uuid4().hex, prompt_ids=prompt,
            params={"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                    "seed": params.seed},
            max_new_tokens=max_new, stop_token_ids=[int(i) for i in request.stop_token_ids],
            ignore_eos=request.ignore_eos, status=RUNNING, owner=self.instance,
            lease_until=time.time() + self.config.lease_s, model=self.model_name,
        )

    # --- RPCs ----------------------------------------------------------------------------

    def Generate(self, request, context):
        if self.draining.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "gateway is shutting down: use another gateway")
        try:
            record = self._new_record(request)
            active = self._admit(record.session_id)
        except Exception as e:  # noqa: BLE001
            abort(context, e)
            return
        try:
            self.store.create(record)
        except Exception as e:  # noqa: BLE001
            self._leave(record.session_id)
            abort(context, e)
            return
        yield from self._serve(record, active, context, replay=False, fresh=True)

    def Resume(self, request, context):
        if self.draining.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "gateway is shutting down: use another gateway")
        sid = request.session_id
        try:
            record = self.store.get(sid)
            if record.status in (DONE, CANCELLED):
                yield from self._replay_finished(record, request.replay)
                return
            active = self._admit(sid)
        except Exception as e:  # noqa: BLE001
            abort(context, e)
            return
        try:
            record = self.store.claim(sid, self.instance, time.time() + self.config.lease_s)
        except Exception as e:  # noqa: BLE001
            self._leave(sid)
            abort(context, e)
            return
        yield from self._serve(record, active, context, replay=request.replay, fresh=False)

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

    def GetSession(self, request, context):
        try:
            rec = self.store.get(request.session_id)
            ttl = self.store.ttl(request.session_id)
        except Exception as e:  # noqa: BLE001
            abort(context, e)
            return None
        return gateway_pb2.Session(
            session_id=rec.session_id, status=rec.status, prompt_ids=rec.prompt_ids,
            generated_ids=rec.generated_ids, params=_params_msg(rec.params),
            stop=common_pb2.StopCriteria(max_new_tokens=rec.max_new_tokens, stop_token_ids=rec.stop_token_ids,
                                         ignore_eos=rec.ignore_eos),
            drafter=rec.drafter, verifier=rec.verifier, owner=rec.owner, resumes=rec.resumes, rounds=rec.rounds,
            created_unix=rec.created, updated_unix=rec.updated, ttl_s=ttl, text=self._decode(rec.generated_ids),
            finish_reason=rec.finish_reason, error=rec.error,
        )

    def Cancel(self, request, context):
        sid = request.session_id
        try:
            self.store.update(sid, {"status": CANCELLED, "finish_reason": "cancelled"},
                              allowed=(RUNNING, INTERRUPTED, FAILED))
        except StatusConflict as e:
            if e.status in (DONE, CANCELLED):
                return gateway_pb2.CancelResponse(status=e.status)
            abort(context, e)
            return None
        except Exception as e:  # noqa: BLE001
            abort(context, e)
            return None
        with self._lock:
            active = self._active.get(sid)
        if active is not None:
            active.cancelled.set()
            if active.call is not None:
                active.call.cancel()
        return gateway_pb2.CancelResponse(status=CANCELLED)

    # --- one session ---------------------------------------------------------------------

    def _serve(self, record: SessionRecord, active: _Active, context, replay: bool, fresh: bool):
        sid = record.session_id
        cfg = self.config
        span = tracer().start_span("gateway.generate", context=extract_grpc(context), kind=SpanKind.SERVER)
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
        text = self._decode(generated)
        t_start = time.perf_counter()
        start_len = len(generated)
        rounds = accepted = resumes = 0
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
                    timeout=_remaining(context, cfg.request_timeout_s),
                    metadata=metadata(trace.set_span_in_context(attempt_span)),
                )
                active.call = call
                if active.cancelled.is_set():
                    call.cancel()
                watchdog = _Watchdog(call, cfg.first_event_timeout_s)
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
                        new_text = self._decode(generated)
                        delta = new_text[len(text):] if new_text.startswith(text) else new_text
                        text = new_text
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
            abort(context, e)
        except Exception as e:  # noqa: BLE001
            completed = True
            span.record_exception(e)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(e)))
            try:
                self.store.update(sid, {"status": FAILED, "error": str(e)[:500]}, allowed=(RUNNING,),
                                  owner=self.instance)
            except Exception:  # noqa: BLE001
                pass
            abort(context, e)
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


class _StreamEnded(Exception):
    pass


def _reason(generated: list[int], record: SessionRecord) -> str:
    return "length" if len(generated) >= record.max_new_tokens else "stop"


def _params_msg(p: dict) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=float(p["temperature"]), top_p=float(p["top_p"]),
                                     top_k=int(p["top_k"]), seed=int(p["seed"]))


def _remaining(context, limit: float) -> float:
    remaining = context.time_remaining()
    return min(limit, remaining) if remaining is not None else limit


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


def build_servicer(config: GatewayConfig, store: SessionStore | None = None) -> GatewayServicer:
    tokenizer = None
    name = config.model_name or ""
    if config.model is not None:
        from aerie_rpc.models import has_tokenizer, resolve_model

        path = resolve_model(config.model)
        if has_tokenizer(path):
            from aerie_rpc.models import load_tokenizer

            tokenizer, _ = load_tokenizer(str(path))
        name = name or config.model
    return GatewayServicer(config, store or make_store(config), tokenizer, model_name=name)


def start(config: GatewayConfig, servicer: GatewayServicer | None = None) -> tuple[ServiceHost, GatewayServicer]:
    tls = load_tls(config)  # before the tokenizer loads: a wrong path ends the start at once
    servicer = servicer or build_servicer(config)
    host = ServiceHost(
        config.listen, lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, s), [SERVICE_NAME],
        workers=config.workers, on_drain=servicer.drain, tls=tls, health_listen=config.health_listen,
    )
    return host, servicer



def run(config: GatewayConfig) -> int:
    provider = setup_tracing("aerie-gateway")
    host, servicer = start(config)
    host.serve_until_signalled(config.grace_s)
    servicer.pool.close()
    if provider is not None:
        provider.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    return service_main(GatewayConfig, "aerie serve gateway", "The aerie gateway (client API, sessions).", run, argv)
