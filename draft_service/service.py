"""The draft service: a thin gRPC adapter around `aerie.drafter.DraftSession`.

`Generate` opens a session on a verifier (Prefill), then runs the rounds over one Verify
stream exactly as `aerie.engine.Engine.stream` runs them in one process, and streams each
round's tokens and costs to its caller (the gateway). A verifier lost mid-generation ends the
stream with UNAVAILABLE and the trailing metadata `aerie-lost-verifier: ADDR`; the gateway
then resumes the session from its last round boundary, here or on another drafter.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import torch
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from aerie.drafter import DraftSession, precompile_head
from aerie.errors import InputError
from aerie.heads import DraftHead
from aerie.sampling import SamplingParams
from aerie.tree import TreeConfig
from aerie_rpc import wire
from aerie_rpc.config import service_main
from aerie_rpc.deadlines import Deadlines
from aerie_rpc.server import ServiceHost, channel
from aerie_rpc.status import (
    LOST_DRAFTER,
    LOST_VERIFIER,
    Exhausted,
    ServiceError,
    Unavailable,
    rpc_code,
    rpc_details,
    status_of,
)
from aerie_rpc.telemetry import extract_grpc, inject, metadata, setup_tracing, tracer
from aerie_rpc.tls import TlsSettings, load_tls
from aerie_rpc.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from draft_service.config import DraftConfig

log = logging.getLogger("aerie.draft")
SERVICE_NAME = drafter_pb2.DESCRIPTOR.services_by_name["Drafter"].full_name
# Errors of a verifier call that mean the verifier (not the request) is at fault.
_PEER_LOST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
              grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.NOT_FOUND)


class VerifierLost(Unavailable):
    def __init__(self, address: str, why: str):
        super().__init__(f"verifier {address} lost ({why}): resume the session from its last round")
        self.address = address


class Admission:
    """Bounded concurrent sessions and reserved head-KV tokens."""

    def __init__(self, max_sessions: int, max_tokens: int):
        self.max_sessions, self.max_tokens = max_sessions, max_tokens
        self.sessions = 0
        self.tokens = 0
        self._lock = threading.Lock()

    def acquire(self, tokens: int) -> None:
        with self._lock:
            if self.sessions >= self.max_sessions:
                raise Exhausted(f"drafter is drafting its maximum of {self.max_sessions} sessions: "
                                "retry later or use another drafter")
            if tokens > self.max_tokens or self.tokens + tokens > self.max_tokens:
                raise Exhausted(f"drafter KV budget: the session needs {tokens} tokens and {self.tokens} of "
                                f"{self.max_tokens} are reserved: retry later or shorten the request")
            self.sessions += 1
            self.tokens += tokens

    def release(self, tokens: int) -> None:
        with self._lock:
            self.sessions -= 1
            self.tokens -= tokens


class VerifierPool:
    """Verifier addresses, channels, model facts, and which ones were lost lately."""

    def __init__(self, addresses: tuple[str, ...], cooldown_s: float, tls: TlsSettings | None = None):
        self.addresses = list(addresses)
        self.cooldown_s = cooldown_s
        self.tls = tls
        self._stubs: dict[str, verifier_pb2_grpc.VerifierStub] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._info: dict[str, verifier_pb2.VerifierInfo] = {}
        self._down: dict[str, float] = {}
        self._next = 0
        self._lock = threading.Lock()

    def stub(self, address: str) -> verifier_pb2_grpc.VerifierStub:
        with self._lock:
            if address not in self._stubs:
                self._channels[address] = channel(address, self.tls)
                self._stubs[address] = verifier_pb2_grpc.VerifierStub(self._channels[address])
            return self._stubs[address]

    def info(self, address: str) -> verifier_pb2.VerifierInfo:
        if address not in self._info:
            self._info[address] = self.stub(address).Info(verifier_pb2.VerifierInfoRequest(), timeout=10.0)
        return self._info[address]

    def mark_down(self, address: str) -> None:
        with self._lock:
            self._down[address] = time.monotonic() + self.cooldown_s
            self._info.pop(address, None)  # it may come back with another model

    def candidates(self, avoid: set[str]) -> list[str]:
        """Addresses in round-robin order: healthy first, then recently lost ones."""
        with self._lock:
            now = time.monotonic()
            start = self._next
            self._next = (self._next + 1) % max(1, len(self.addresses))
            order = self.addresses[start:] + self.addresses[:start]
            fresh = [a for a in order if a not in avoid and self._down.get(a, 0) <= now]
            stale = [a for a in order if a not in avoid and a not in fresh]
            return fresh + stale

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()


class DrafterServicer(drafter_pb2_grpc.DrafterServicer):
    def __init__(self, head: DraftHead, tree: TreeConfig, config: DraftConfig, name: str | None = None):
        self.head = head
        self.tree = tree
        self.config = config
        self.name = name or config.listen
        self.vocab_size = int(head.config.vocab_size)
        self.target_hidden = head.target_hidden_size
        self.pool = VerifierPool(config.verifier, config.verifier_cooldown_s, load_tls(config))
        self.admission = Admission(config.max_sessions, config.max_tokens)
        self.compute = threading.Lock()
        self.draining = threading.Event()
        self.deadlines = Deadlines("drafter-round-timeouts")

    def drain(self) -> None:
        self.draining.set()

    def Info(self, request, context):
        spec = self.head.feature_spec
        return drafter_pb2.DrafterInfo(
            head_kind=self.head.kind, features=common_pb2.FeatureSpec(kind=spec.kind, layers=list(spec.layers)),
            vocab_size=self.vocab_size, tree_kind=self.tree.kind, tree_depth=self.tree.depth,
            tree_top_k=self.tree.top_k, tree_total_tokens=self.tree.total_tokens, verifiers=self.pool.addresses,
            max_sessions=self.config.max_sessions, active_sessions=self.admission.sessions,
        )

    # --- Generate ------------------------------------------------------------------------

    def Generate(self, request, context):
        if self.draining.is_set():
            context.set_trailing_metadata(((LOST_DRAFTER, self.name),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "drafter is shutting down: use another drafter")
        span = tracer().start_span("drafter.generate", context=extract_grpc(context), kind=SpanKind.SERVER)
        span.set_attribute("aerie.session_id", request.session_id)
        span.set_attribute("aerie.drafter", self.name)
        reserved = 0
        run: _Run | None = None
        try:
            with trace.use_span(span):
                prompt, generated, params = self._check(request)
                reserved = len(prompt) + int(request.stop.max_new_tokens) + self.tree.depth + 1
                self.admission.acquire(reserved)
                run = _Run(self, request, prompt, generated, params, context)
            # The generator body runs in gRPC's thread, span by span: each round's span is
            # made the current one only while that round runs.
            for event in run.events(span):
                yield event
                if self.draining.is_set() and not run.finished:
                    context.set_trailing_metadata(((LOST_DRAFTER, self.name),))
                    raise Unavailable(f"drafter {self.name} is shutting down: resume the session on another drafter")
        except VerifierLost as e:
            self.pool.mark_down(e.address)
            span.record_exception(e)
            context.set_trailing_metadata(((LOST_VERIFIER, e.address),))
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except Exception as e:  # noqa: BLE001 - every error becomes a status
            code, message = status_of(e)
            span.record_exception(e)
            span.set_status(trace.Status(trace.StatusCode.ERROR, message))
            context.abort(code, message)
        finally:
            if run is not None:
                run.close()
            if reserved:
                self.admission.release(reserved)
            span.end()

    def _check(self, request) -> tuple[list[int], list[int], SamplingParams]:
        if not request.prompt_ids:
            raise InputError("prompt is empty")
        prompt = wire.check_ids(request.prompt_ids, "prompt", self.vocab_size)
        generated = wire.check_ids(request.generated_ids, "generated ids", self.vocab_size)
        p = request.params
        params = SamplingParams(float(p.temperature), float(p.top_p) if p.HasField("top_p") else 1.0,
                                int(p.top_k), int(p.seed))
        if request.stop.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {request.stop.max_new_tokens}")
        if len(generated) >= request.stop.max_new_tokens:
            raise InputError(f"cannot resume after {len(generated)} tokens: max_new_tokens is "
                             f"{request.stop.max_new_tokens}")
        return prompt, generated, params


class _Run:
    """One generation: a verifier session and the rounds against it."""

    def __init__(self, owner: DrafterServicer, request, prompt: list[int], generated: list[int],
                 params: SamplingParams, context: grpc.ServicerContext):
        self.owner = owner
        self.config = owner.config
        self.request = request
        self.prompt = prompt
        self.generated = list(generated)
        self.params = params
        self.context = context
        self.verifier: str | None = None
        self.vsid = f"{request.session_id or 'anon'}-{uuid.uuid4().hex[:12]}"
        self.requests: queue.Queue = queue.Queue()
        self.call = None
        self.finished = False
        self.opened = False

    def _deadline(self, limit: float) -> float:
        remaining = self.context.time_remaining()
        return min(limit, remaining) if remaining is not None else limit

    # --- prefill -------------------------------------------------------------------------

    def _prefill_messages(self) -> Iterator[verifier_pb2.PrefillRequest]:
        r = self.request
        spec = self.owner.head.feature_spec
        yield verifier_pb2.PrefillRequest(header=verifier_pb2.PrefillHeader(
            session_id=self.vsid, params=r.params, stop=r.stop,
            features=common_pb2.FeatureSpec(kind=spec.kind, layers=list(spec.layers)),
            prompt_tokens=len(self.prompt), resume_tokens=len(self.generated),
        ))
        for chunk in wire.id_chunks(self.prompt):
            yield verifier_pb2.PrefillRequest(chunk=verifier_pb2.TokenChunk(prompt_ids=chunk))
        for chunk in wire.id_chunks(self.generated):
            yield verifier_pb2.PrefillRequest(chunk=verifier_pb2.TokenChunk(resume_ids=chunk))

    def _check_verifier(self, address: str) -> None:
        info = self.owner.pool.info(address)
        if info.vocab_size != self.owner.vocab_size or info.hidden_size != self.owner.target_hidden:
            raise ServiceError(
                f"verifier {address} serves '{info.model}' (vocabulary {info.vocab_size}, hidden size "
                f"{info.hidden_size}) but this drafter's head was built for vocabulary {self.owner.vocab_size}, "
                f"hidden size {self.owner.target_hidden}: point --verifier at the matching target",
                grpc.StatusCode.FAILED_PRECONDITION,
            )

    def _prefill(self) -> tuple[verifier_pb2.PrefillResult, torch.Tensor, float, int, int]:
        avoid = set(self.request.avoid_verifiers)
        tried: list[str] = []
        exhausted = ""  # a verifier refused for a limit: the caller gets that, not UNAVAILABLE
        for address in self.owner.pool.candidates(avoid):
            tried.append(address)
            try:
                self._check_verifier(address)
                t0 = time.perf_counter()
                messages = list(self._prefill_messages())
                sent = sum(m.ByteSize() for m in messages)
                responses = self.owner.pool.stub(address).Prefill(
                    iter(messages), timeout=self._deadline(self.config.prefill_timeout_s), metadata=metadata())
                result, features, received = _read_prefill(responses)
                self.verifier = address
                self.opened = True
                return result, features, (time.perf_counter() - t0) * 1e3, sent, received
            except grpc.RpcError as e:
                code = rpc_code(e)
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.RESOURCE_EXHAUSTED):
                    log.warning("verifier %s: %s: %s", address, code.name, rpc_details(e))
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        exhausted = f"verifier {address}: {rpc_details(e)}"
                    else:
                        self.owner.pool.mark_down(address)
                    continue  # nothing was emitted yet: the next verifier is tried at once
                raise ServiceError(f"verifier {address}: {rpc_details(e)}", code) from None
        if exhausted:
            raise Exhausted(exhausted)
        raise Unavailable(f"no verifier could take the session (tried {', '.join(tried) or 'none'}; "
                          f"avoided {', '.join(sorted(avoid)) or 'none'})")

    # --- rounds --------------------------------------------------------------------------

    def _request_stream(self) -> Iterator[verifier_pb2.VerifyRequest]:
        while True:
            item = self.requests.get()
            if item is None:
                return
            yield item

    def _round_trip(self, req: verifier_pb2.VerifyRequest) -> verifier_pb2.VerifyResponse:
        fired = threading.Event()

        def expire():
            fired.set()
            self.call.cancel()

        self.requests.put(req)
        timer = self.owner.deadlines.schedule(self.config.round_timeout_s, expire)
        try:
            return next(self.call)
        except StopIteration:
            raise VerifierLost(self.verifier, "the Verify stream ended early") from None
        except grpc.RpcError as e:
            code = rpc_code(e)
            if fired.is_set():
                raise VerifierLost(self.verifier, f"no answer within {self.config.round_timeout_s:.0f} s") from None
            if not self.context.is_active():
                raise ServiceError("the caller went away", grpc.StatusCode.CANCELLED) from None
            if code in _PEER_LOST:
                raise VerifierLost(self.verifier, f"{code.name}: {rpc_details(e)}") from None
            raise ServiceError(f"verifier {self.verifier}: {rpc_details(e)}", code) from None
        finally:
            timer.cancel()

    def events(self, parent: trace.Span) -> Iterator[drafter_pb2.DraftGenerateResponse]:
        owner, request = self.owner, self.request
        with trace.use_span(parent):
            result, features, prefill_ms, sent, received = self._prefill()
        parent.set_attribute("aerie.verifier", self.verifier)
        emitted = list(result.generated_ids)
        self.generated += emitted
        stats = common_pb2.RoundStats(
            round=0, committed=len(emitted), verify_ms=result.prefill_ms,
            wire_ms=max(0.0, prefill_ms - result.prefill_ms), request_bytes=sent, response_bytes=received,
        )
        yield drafter_pb2.DraftGenerateResponse(started=drafter_pb2.DraftStarted(
            drafter=owner.name, verifier=self.verifier, verifier_session=self.vsid, tokens=emitted,
            done=result.done, stats=stats,
        ))
        rounds = 0
        done = result.done
        if not done:
            drafter = DraftSession(owner.head, owner.tree)
            try:
                next_tokens = (self.prompt + self.generated)[1:]
                self.call = owner.pool.stub(self.verifier).Verify(
                    self._request_stream(), timeout=self._deadline(self.config.request_timeout_s),
                    metadata=metadata(trace.set_span_in_context(parent)))
                feature_dim = int(result.feature_dim)
                while not done:
                    rounds += 1
                    with tracer().start_as_current_span("drafter.round", context=trace.set_span_in_context(parent)) as span:
                        t0 = time.perf_counter()
                        with owner.compute:
                            tree = drafter.draft(features, next_tokens)
                        t1 = time.perf_counter()
                        req = verifier_pb2.VerifyRequest(
                            session_id=self.vsid, round=rounds, tokens=wire.encode(tree.tokens),
                            parents=wire.encode(tree.parents), logprobs=wire.encode(tree.logprobs.float()),
                            trace_context=inject(),
                        )
                        resp = self._round_trip(req)
                        t2 = time.perf_counter()
                        features = wire.decode(resp.features, "features", shape=(resp.accepted_draft + 1, feature_dim))
                        next_tokens = _next_tokens(resp)
                        done = resp.done
                        rtt_ms = (t2 - t1) * 1e3
                        stats = common_pb2.RoundStats(
                            round=rounds, tree_size=len(tree) - 1, accepted_draft=resp.accepted_draft,
                            committed=len(resp.new_tokens), draft_ms=(t1 - t0) * 1e3, verify_ms=resp.verify_ms,
                            wire_ms=max(0.0, rtt_ms - resp.verify_ms), request_bytes=req.ByteSize(),
                            response_bytes=resp.ByteSize(),
                        )
                        for key, value in (("round", rounds), ("tree_size", stats.tree_size),
                                           ("accepted", stats.accepted_draft), ("committed", stats.committed),
                                           ("draft_ms", stats.draft_ms), ("verify_ms", stats.verify_ms),
                                           ("wire_ms", stats.wire_ms), ("request_bytes", stats.request_bytes),
                                           ("response_bytes", stats.response_bytes)):
                            span.set_attribute(f"aerie.{key}", value)
                    self.generated += list(resp.new_tokens)
                    yield drafter_pb2.DraftGenerateResponse(
                        round=drafter_pb2.DraftRound(tokens=resp.new_tokens, stats=stats, done=done))
            finally:
                drafter.close()  # its KV cache (and graphs) go back to the head's pool
        self.finished = True
        last = self.generated[-1] if self.generated else None
        reason = "length" if len(self.generated) >= request.stop.max_new_tokens else "stop"
        if last is not None and reason == "length" and last in set(request.stop.stop_token_ids):
            reason = "stop"
        parent.set_attribute("aerie.rounds", rounds)
        yield drafter_pb2.DraftGenerateResponse(done=drafter_pb2.DraftDone(
            finish_reason=reason, rounds=rounds, generated=len(self.generated)))

    def close(self) -> None:
        """End the Verify stream and drop the verifier's session (best effort)."""
        self.requests.put(None)
        if self.call is not None and not self.finished:
            self.call.cancel()
        if self.opened and self.verifier is not None:
            try:
                self.owner.pool.stub(self.verifier).Release(
                    verifier_pb2.ReleaseRequest(session_id=self.vsid), timeout=2.0)
            except grpc.RpcError:
                pass  # a lost verifier drops its sessions anyway


def _next_tokens(resp: verifier_pb2.VerifyResponse) -> list[int]:
    """The tokens paired with the returned features, exactly as `Engine.stream` computes them:
    the accepted path (any branch of the tree) and the bonus token."""
    return list(resp.new_tokens)


def _read_prefill(responses) -> tuple[verifier_pb2.PrefillResult, torch.Tensor, int]:
    result = None
    features = None
    received = 0
    filled = 0
    for msg in responses:
        received += msg.ByteSize()
        if msg.WhichOneof("part") == "result":
            result = msg.result
            continue
        if result is None:
            raise ServiceError("verifier sent features before the prefill result", grpc.StatusCode.INTERNAL)
        chunk = msg.features
        rows = wire.decode(chunk.features, "prefill features", shape=(None, result.feature_dim))
        if features is None:
            features = torch.empty(result.feature_rows, result.feature_dim, dtype=rows.dtype)
        if chunk.row_offset + rows.shape[0] > result.feature_rows:
            raise ServiceError("verifier sent more feature rows than announced", grpc.StatusCode.INTERNAL)
        features[chunk.row_offset : chunk.row_offset + rows.shape[0]] = rows
        filled += rows.shape[0]
    if result is None or filled != result.feature_rows:
        raise ServiceError("verifier ended Prefill before sending all features", grpc.StatusCode.UNAVAILABLE)
    return result, features, received


# --- entry point -------------------------------------------------------------------------


def build_servicer(config: DraftConfig) -> DrafterServicer:
    from aerie_rpc.models import load_draft_head

    head, _, _ = load_draft_head(config.model, config.head, config.device, config.dtype)
    tree = config.tree(head)
    precompile_head(head, tree)  # at startup, not in the first sessions' rounds
    return DrafterServicer(head, tree, config)


def start(config: DraftConfig, servicer: DrafterServicer | None = None) -> tuple[ServiceHost, DrafterServicer]:
    tls = load_tls(config)  # before the head loads: a wrong path ends the start at once
    servicer = servicer or build_servicer(config)
    host = ServiceHost(
        config.listen, lambda s: drafter_pb2_grpc.add_DrafterServicer_to_server(servicer, s), [SERVICE_NAME],
        workers=config.workers, on_drain=servicer.drain, tls=tls, health_listen=config.health_listen,
    )
    if servicer.name in (config.listen,) or servicer.name.endswith(":0"):
        servicer.name = host.address
    return host, servicer



def run(config: DraftConfig) -> int:
    provider = setup_tracing("aerie-draft")
    host, servicer = start(config)
    host.serve_until_signalled(config.grace_s)
    servicer.pool.close()
    if provider is not None:
        provider.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    return service_main(DraftConfig, "aerie serve draft", "The aerie draft service (EAGLE head).", run, argv)
