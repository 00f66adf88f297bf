"""The verify service: a thin gRPC adapter around `aerie.verifier.VerifySession`, or, with
`--batch-sessions`, around `aerie.batch.BatchVerifier` (verify_service.batching).

Sessions are opened by `Prefill` and driven by `Verify`, one draft tree per round. Every
request is checked before it touches a KV cache, so a malformed tree is answered with
INVALID_ARGUMENT and the session it named goes on unharmed. Forwards are serialised on the
one model (a GPU runs them one after another anyway); batched, the rounds of concurrent
sessions share one forward.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch
from opentelemetry.trace import SpanKind

from aerie.batch.cache import BatchKVCache
from aerie.batch.verify import BatchVerifier
from aerie.errors import AerieError, InputError
from aerie.sampling import SamplingParams
from aerie.target import FeatureSpec, Target
from aerie.tree import DraftTree
from aerie.verifier import StopCriteria, VerifySession
from aerie_rpc import wire
from aerie_rpc.config import service_main
from aerie_rpc.server import ServiceHost
from aerie_rpc.status import Exhausted, NotFound, ServiceError, abort
from aerie_rpc.telemetry import extract, extract_grpc, setup_tracing, tracer
from aerie_rpc.tls import load_tls
from aerie_rpc.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc
from verify_service.batching import BatchedSession, SessionBatch
from verify_service.config import VerifyConfig

log = logging.getLogger("aerie.verify")
SERVICE_NAME = verifier_pb2.DESCRIPTOR.services_by_name["Verifier"].full_name
MAX_SESSION_ID = 200
BATCH_INITIAL_CAPACITY = 256  # KV slots per row of a batch at first; doubled as sessions grow


@dataclass
class _Entry:
    session: VerifySession | BatchedSession
    reserved: int  # KV tokens counted against max_tokens
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = field(default_factory=time.monotonic)


class SessionTable:
    """Bounded sessions: count, reserved KV tokens and idle TTL. Thread-safe."""

    def __init__(self, max_sessions: int, max_tokens: int, ttl_s: float, limit_flag: str = "--max-sessions"):
        self.max_sessions, self.max_tokens, self.ttl_s = max_sessions, max_tokens, ttl_s
        self.limit_flag = limit_flag  # the setting to name when the session limit is reached
        self._entries: dict[str, _Entry] = {}
        self._pending: dict[str, int] = {}  # reservations of sessions still in prefill
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _used(self) -> int:
        return sum(e.reserved for e in self._entries.values()) + sum(self._pending.values())

    def reserve(self, session_id: str, tokens: int) -> None:
        with self._lock:
            self._reap_locked()
            if session_id in self._entries or session_id in self._pending:
                raise ServiceError(f"session '{session_id}' already exists on this verifier",
                                   grpc.StatusCode.ALREADY_EXISTS)
            if len(self._entries) + len(self._pending) >= self.max_sessions:
                raise Exhausted(
                    f"verifier holds its maximum of {self.max_sessions} sessions: retry later, "
                    f"use another verifier, or raise {self.limit_flag}"
                )
            if tokens > self.max_tokens:
                raise Exhausted(
                    f"the session needs {tokens} KV tokens (prompt + max_new_tokens + tree), more than this "
                    f"verifier's --max-tokens {self.max_tokens}: shorten the prompt or max_new_tokens"
                )
            if self._used() + tokens > self.max_tokens:
                raise Exhausted(
                    f"verifier KV budget is full ({self._used()} of {self.max_tokens} tokens reserved): retry later "
                    "or use another verifier"
                )
            self._pending[session_id] = tokens

    def commit(self, session_id: str, session: VerifySession | BatchedSession) -> None:
        with self._lock:
            tokens = self._pending.pop(session_id)
            self._entries[session_id] = _Entry(session=session, reserved=tokens)

    def cancel(self, session_id: str) -> None:
        with self._lock:
            self._pending.pop(session_id, None)

    def get(self, session_id: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(session_id)
        if entry is None:
            raise NotFound(
                f"unknown session '{session_id}' on this verifier (never prefilled, released, or idle past the TTL): "
                "prefill it again"
            )
        return entry

    def remove(self, session_id: str) -> bool:
        with self._lock:
            entry = self._entries.pop(session_id, None)
        if entry is None:
            return False
        with entry.lock:  # after a round in flight, never under it
            entry.session.close()
        return True

    def drop(self, session_id: str) -> None:
        """Remove a session whose round failed, by the stream holding its lock (`remove`
        would wait for that lock)."""
        with self._lock:
            entry = self._entries.pop(session_id, None)
        if entry is not None:
            entry.session.close()

    def reap(self) -> int:
        with self._lock:
            return self._reap_locked()

    def _reap_locked(self) -> int:
        now = time.monotonic()
        stale = [k for k, e in self._entries.items() if now - e.last_used > self.ttl_s and not e.lock.locked()]
        for k in stale:
            # Unlocked, so no round is using it: its KV cache goes back to the target's pool.
            self._entries.pop(k).session.close()
        return len(stale)

    @property
    def reserved(self) -> int:
        with self._lock:
            return self._used()


class VerifierServicer(verifier_pb2_grpc.VerifierServicer):
    def __init__(self, model: torch.nn.Module, config: VerifyConfig, eos_ids: frozenset[int] = frozenset(),
                 model_name: str = "", make_target: Callable[[FeatureSpec], Target] | None = None):
        self.model = model
        # The target for a feature spec: a plain one, or one that mirrors its calls on the
        # other ranks of a sharded model (verify_service.tensor_parallel).
        self._make_target = make_target or (lambda spec: Target(model, spec, static=config.static_kv(model.device)))
        self.config = config
        self.eos_ids = eos_ids
        self.model_name = model_name
        limit, limit_flag = config.session_limit
        self.sessions = SessionTable(limit, config.max_tokens, config.session_ttl_s, limit_flag)
        self.compute = threading.Lock()
        self.draining = threading.Event()
        self._targets: dict[FeatureSpec, Target] = {}
        # With --batch-sessions: one batch per feature spec (its features come out of the forward).
        self._batches: dict[FeatureSpec, SessionBatch] = {}
        self._batches_lock = threading.Lock()
        if make_target is None:
            # Compile the forward (where the static path compiles it) before serving, not in
            # the first session's rounds: every feature spec's target runs the same model.
            self._make_target(FeatureSpec("eagle1")).precompile()
        probe = Target(model, FeatureSpec("eagle1"))
        self.vocab_size = probe.vocab_size
        self.max_positions = probe.max_positions
        self.num_layers = int(model.config.num_hidden_layers)
        self.hidden_size = int(model.config.hidden_size)
        self._reaper = threading.Thread(target=self._reap_loop, name="verify-reaper", daemon=True)
        self._reaper.start()

    # --- helpers -------------------------------------------------------------------------

    def _reap_loop(self) -> None:
        period = max(0.05, min(30.0, self.config.session_ttl_s / 4))
        while not self.draining.wait(period):
            n = self.sessions.reap()
            if n:
                log.info("dropped %d idle sessions", n)

    def _target(self, spec: common_pb2.FeatureSpec) -> Target:
        kind = spec.kind or "eagle3"
        if kind not in ("eagle1", "eagle3"):
            raise InputError(f"feature kind must be eagle1 or eagle3, got {kind!r}")
        layers = tuple(int(i) for i in spec.layers) if kind == "eagle3" else ()
        if kind == "eagle3":
            if len(layers) != 3:
                raise InputError(f"eagle3 features need 3 layers (low, mid, high), got {list(layers)}")
            if not all(0 <= i <= self.num_layers for i in layers):
                raise InputError(f"feature layers {list(layers)} out of range for a target of {self.num_layers} layers")
        key = FeatureSpec(kind, layers)
        if key not in self._targets:
            self._targets[key] = self._make_target(key)
        return self._targets[key]

    def _batch(self, target: Target) -> SessionBatch:
        with self._batches_lock:
            batch = self._batches.get(target.features)
            if batch is None:
                rows = self.config.batch_sessions
                cache = BatchKVCache(self.num_layers, rows, BATCH_INITIAL_CAPACITY, target.device,
                                     cuda_graphs=self.config.cuda_graphs)
                verifier = BatchVerifier(target, cache, max_tree_nodes=self.config.max_tree_nodes)
                batch = SessionBatch(verifier, self.compute, self.config.batch_window_ms / 1e3,
                                     name=f"batch-{target.features.kind}")
                self._batches[target.features] = batch
            return batch

    def drain(self) -> None:
        self.draining.set()
        with self._batches_lock:
            batches = list(self._batches.values())
        for batch in batches:  # the rounds queued finish; then the rows are freed
            batch.close(self.config.grace_s)

    # --- RPCs ----------------------------------------------------------------------------

    def Info(self, request, context):
        return verifier_pb2.VerifierInfo(
            model=self.model_name, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            num_layers=self.num_layers, dtype=str(self.model.dtype).removeprefix("torch."),
            device=str(self.model.device), max_positions=self.max_positions,
            max_tree_nodes=self.config.max_tree_nodes, max_sessions=self.sessions.max_sessions,
            active_sessions=len(self.sessions), eos_token_ids=sorted(self.eos_ids),
        )

    def Prefill(self, request_iterator, context):
        if self.draining.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "verifier is shutting down: use another verifier")
        span = tracer().start_span("verifier.prefill", context=extract_grpc(context), kind=SpanKind.SERVER)
        reserved_id = None
        try:
            header, prompt, resume, request_bytes = self._read_prefill(request_iterator)
            sid = header.session_id
            span.set_attribute("aerie.session_id", sid)
            span.set_attribute("aerie.prompt_tokens", len(prompt))
            span.set_attribute("aerie.resume_tokens", len(resume))
            params = _params(header.params)
            stop = self._stop(header.stop)
            target = self._target(header.features)
            self.sessions.reserve(sid, len(prompt) + len(resume) + stop.max_new_tokens + self.config.max_tree_nodes)
            reserved_id = sid
            t0 = time.perf_counter()
            if self.config.batch_sessions:
                batch = self._batch(target)
                joined = batch.join(sid, prompt, resume, params, stop)
                session = BatchedSession(batch, sid)
                features, pending, done = joined.features, joined.token, joined.done
            else:
                session = VerifySession(target, params, stop, prompt, max_tree_nodes=self.config.max_tree_nodes,
                                        resume_tokens=resume)
                with self.compute:
                    features, pending = session.prefill()
                done = session.done
            prefill_ms = (time.perf_counter() - t0) * 1e3
            self.sessions.commit(sid, session)
            reserved_id = None
            span.set_attribute("aerie.verify_ms", prefill_ms)
            result = verifier_pb2.PrefillResult(
                session_id=sid, pending_token=pending, generated_ids=[] if resume else [pending],
                done=done, feature_rows=features.shape[0], feature_dim=features.shape[1],
                prefill_ms=prefill_ms, max_tree_nodes=self.config.max_tree_nodes,
            )
            out = [verifier_pb2.PrefillResponse(result=result)]
            for offset, rows in wire.row_chunks(features):
                out.append(verifier_pb2.PrefillResponse(
                    features=verifier_pb2.FeatureChunk(row_offset=offset, features=wire.encode(rows))))
            span.set_attribute("aerie.request_bytes", request_bytes)
            span.set_attribute("aerie.response_bytes", sum(m.ByteSize() for m in out))
        except Exception as e:  # noqa: BLE001 - every error becomes a status
            if reserved_id is not None:
                self.sessions.cancel(reserved_id)
            span.record_exception(e)
            span.end()
            abort(context, e)
            return
        span.end()
        yield from out

    def _read_prefill(self, request_iterator) -> tuple[verifier_pb2.PrefillHeader, list[int], list[int], int]:
        header = None
        prompt: list[int] = []
        resume: list[int] = []
        size = 0
        for req in request_iterator:
            size += req.ByteSize()
            if header is None:
                if req.WhichOneof("part") != "header":
                    raise InputError("the first Prefill message must be a header")
                header = req.header
                if not header.session_id or len(header.session_id) > MAX_SESSION_ID:
                    raise InputError(f"session_id must be 1 to {MAX_SESSION_ID} characters")
                if header.prompt_tokens < 1:
                    raise InputError("prompt is empty: prompt_tokens must be >= 1")
                total = header.prompt_tokens + header.resume_tokens
                if total > self.config.max_prompt_tokens:
                    raise Exhausted(
                        f"prompt of {header.prompt_tokens} tokens plus {header.resume_tokens} resumed tokens exceeds "
                        f"this verifier's --max-prompt-tokens {self.config.max_prompt_tokens}"
                    )
            elif req.WhichOneof("part") == "chunk":
                prompt += req.chunk.prompt_ids
                resume += req.chunk.resume_ids
                if len(prompt) > header.prompt_tokens or len(resume) > header.resume_tokens:
                    raise InputError(
                        f"more tokens than announced: header says {header.prompt_tokens} prompt and "
                        f"{header.resume_tokens} resumed tokens"
                    )
            else:
                raise InputError("only the first Prefill message may be a header")
            if len(prompt) == header.prompt_tokens and len(resume) == header.resume_tokens:
                break
        if header is None:
            raise InputError("empty Prefill stream: send a header, then the prompt in chunks")
        if len(prompt) != header.prompt_tokens or len(resume) != header.resume_tokens:
            raise InputError(
                f"Prefill stream ended after {len(prompt)} of {header.prompt_tokens} prompt tokens and "
                f"{len(resume)} of {header.resume_tokens} resumed tokens"
            )
        prompt = wire.check_ids(prompt, "prompt", self.vocab_size)
        resume = wire.check_ids(resume, "resumed tokens", self.vocab_size)
        return header, prompt, resume, size

    def _stop(self, stop: common_pb2.StopCriteria) -> StopCriteria:
        if stop.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {stop.max_new_tokens}")
        ids = set(int(i) for i in stop.stop_token_ids)
        if not stop.ignore_eos:
            ids |= self.eos_ids
        return StopCriteria(int(stop.max_new_tokens), frozenset(ids))

    def Verify(self, request_iterator, context):
        stream_ctx = extract_grpc(context)
        for req in request_iterator:
            if self.draining.is_set():
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              "verifier is shutting down: resume the session on another verifier")
            try:
                entry = self.sessions.get(req.session_id)
                tree = _decode_tree(req)
            except Exception as e:  # noqa: BLE001
                abort(context, e)
                return
            if not entry.lock.acquire(blocking=False):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"session '{req.session_id}' is being verified by another stream")
            parent = extract(req.trace_context) if req.trace_context else stream_ctx
            span = tracer().start_span("verifier.round", context=parent)
            try:
                span.set_attribute("aerie.session_id", req.session_id)
                span.set_attribute("aerie.round", req.round)
                span.set_attribute("aerie.tree_size", len(tree) - 1)
                t0 = time.perf_counter()
                session = entry.session
                try:
                    if isinstance(session, BatchedSession):
                        batched = session.verify(tree)
                        result, generated, batch_size = batched.result, batched.generated, batched.batch_size
                        span.set_attribute("aerie.queue_ms", batched.queued_ms)
                        span.set_attribute("aerie.forward_ms", batched.forward_ms)
                    else:
                        with self.compute:
                            result = session.verify(tree)
                        generated, batch_size = len(session.generated), 1
                except (AerieError, ValueError, ServiceError):
                    raise  # checked before the cache was touched (or refused while draining): intact
                except Exception:
                    # Failed mid-forward: the cache may be half-written, so the session goes.
                    self.sessions.drop(req.session_id)
                    raise
                # Batched, this includes the wait for the other sessions' rounds: the time the
                # round spent on the verifier, which is what the drafter's budget should see.
                verify_ms = (time.perf_counter() - t0) * 1e3
                resp = verifier_pb2.VerifyResponse(
                    session_id=req.session_id, round=req.round, new_tokens=result.new_tokens,
                    accepted_draft=result.accepted_draft, features=wire.encode(result.features),
                    done=result.done, verify_ms=verify_ms, generated=generated,
                )
                span.set_attribute("aerie.batch_size", batch_size)
                span.set_attribute("aerie.accepted", result.accepted_draft)
                span.set_attribute("aerie.verify_ms", verify_ms)
                span.set_attribute("aerie.request_bytes", req.ByteSize())
                span.set_attribute("aerie.response_bytes", resp.ByteSize())
            except Exception as e:  # noqa: BLE001
                span.record_exception(e)
                span.end()
                entry.lock.release()
                abort(context, e)
                return
            entry.last_used = time.monotonic()
            entry.lock.release()
            span.end()
            yield resp

    def Release(self, request, context):
        return verifier_pb2.ReleaseResponse(released=self.sessions.remove(request.session_id))


def _params(p: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=float(p.temperature), top_p=float(p.top_p) if p.HasField("top_p") else 1.0,
        top_k=int(p.top_k), seed=int(p.seed),
    )


def _decode_tree(req: verifier_pb2.VerifyRequest) -> DraftTree:
    if not req.HasField("tokens") or not req.HasField("parents"):
        raise InputError("a tree needs tokens and parents")
    tokens = wire.decode(req.tokens, "tree tokens", dtypes=("int64", "int32"), shape=(None,))
    n = tokens.shape[0]
    parents = wire.decode(req.parents, "tree parents", dtypes=("int64", "int32"), shape=(None,))
    if parents.shape[0] != n:
        raise InputError(f"tree has {n} tokens but {parents.shape[0]} parents")
    if req.HasField("logprobs") and req.logprobs.dtype:
        logprobs = wire.decode(req.logprobs, "tree logprobs", dtypes=("float32",), shape=(n,))
        if not bool(torch.isfinite(logprobs).all()):
            raise InputError("tree logprobs must be finite")
    else:
        logprobs = torch.zeros(n, dtype=torch.float32)
    return DraftTree(tokens=tokens.long(), parents=parents.long(), logprobs=logprobs)


# --- entry point -------------------------------------------------------------------------


def build_servicer(config: VerifyConfig) -> VerifierServicer:
    from aerie.models import eos_token_ids
    from aerie_rpc.models import load_target_model

    model, tokenizer, path = load_target_model(config.model, config.device, config.dtype)
    eos = eos_token_ids(tokenizer, getattr(model, "generation_config", None))
    return VerifierServicer(model, config, eos, model_name=config.model or path.name)


def start(config: VerifyConfig, servicer: VerifierServicer | None = None) -> tuple[ServiceHost, VerifierServicer]:
    tls = load_tls(config)  # before the model loads: a wrong path ends the start at once
    servicer = servicer or build_servicer(config)
    host = ServiceHost(
        config.listen, lambda s: verifier_pb2_grpc.add_VerifierServicer_to_server(servicer, s), [SERVICE_NAME],
        workers=config.workers, on_drain=servicer.drain, tls=tls, health_listen=config.health_listen,
    )
    return host, servicer



def run(config: VerifyConfig) -> int:
    if config.tensor_parallel > 1:
        from verify_service import tensor_parallel

        return tensor_parallel.run(config)
    provider = setup_tracing("aerie-verify")
    host, _ = start(config)
    host.serve_until_signalled(config.grace_s)
    if provider is not None:
        provider.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    return service_main(VerifyConfig, "aerie serve verify", "The aerie verify service (target model).", run, argv)


