"""A small client of the gateway: stream one generation and sum it up."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import grpc

from aerie.errors import AerieError
from aerie_rpc.server import channel
from aerie_rpc.status import rpc_code, rpc_details
from aerie_rpc.tls import TlsSettings
from aerie_rpc.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


class GatewayError(AerieError):
    """The gateway answered with an error status (the message names the status; `code` is it,
    or None when the stream ended without a result)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


def request(
    *, prompt: str | None = None, prompt_ids: Sequence[int] | None = None, chat: bool = True,
    max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
    session_id: str = "",
) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        prompt=prompt or "", prompt_ids=list(prompt_ids or []), chat=chat, max_new_tokens=max_new_tokens,
        params=common_pb2.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
        session_id=session_id,
    )


def stream(address: str, req: gateway_pb2.GenerateRequest, timeout_s: float = 3600.0,
           api_key: str | None = None, tls: TlsSettings | None = None) -> Iterator[gateway_pb2.GenerateEvent]:
    """One generation on a channel of its own (TLS when `tls` has a CA); `api_key` is sent
    as `authorization: Bearer <key>`."""
    with channel(address, tls) as ch:
        yield from stream_on(gateway_pb2_grpc.GatewayStub(ch), req, timeout_s, address, api_key)


def stream_on(stub: gateway_pb2_grpc.GatewayStub, req: gateway_pb2.GenerateRequest, timeout_s: float = 3600.0,
              name: str = "", api_key: str | None = None) -> Iterator[gateway_pb2.GenerateEvent]:
    """One generation on a channel the caller keeps (many concurrent ones share it)."""
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
    try:
        yield from stub.Generate(req, timeout=timeout_s, metadata=metadata)
    except grpc.RpcError as e:
        code = rpc_code(e)
        raise GatewayError(f"gateway {name}: {code.name}: {rpc_details(e)}", code) from None


def collect(events: Iterator[gateway_pb2.GenerateEvent],
            on_text: Callable[[str], None] | None = None) -> dict:
    """Consume a stream into the fields in-process generation reports, plus per-round costs,
    the ids as streamed (`streamed_ids`) and the time to the first of them (`first_token_s`)."""
    t0 = time.perf_counter()
    out: dict = {"text": "", "streamed_ids": [], "rounds_detail": [], "resumed": [], "first_token_s": None}
    finished = None
    for ev in events:
        kind = ev.WhichOneof("event")
        out["session_id"] = ev.session_id
        if kind == "started":
            out["trace_id"] = ev.started.trace_id
            out["drafter"], out["verifier"] = ev.started.drafter, ev.started.verifier
        elif kind == "tokens":
            if out["first_token_s"] is None and ev.tokens.ids:
                out["first_token_s"] = time.perf_counter() - t0
            out["streamed_ids"] += list(ev.tokens.ids)
            if on_text is not None and ev.tokens.text:
                on_text(ev.tokens.text)
            s = ev.tokens.stats
            out["rounds_detail"].append({
                "round": s.round, "tree_size": s.tree_size, "accepted": s.accepted_draft, "committed": s.committed,
                "draft_ms": s.draft_ms, "verify_ms": s.verify_ms, "wire_ms": s.wire_ms,
                "request_bytes": s.request_bytes, "response_bytes": s.response_bytes,
            })
        elif kind == "resumed":
            out["resumed"].append({"failed_node": ev.resumed.failed_node, "reason": ev.resumed.reason,
                                   "drafter": ev.resumed.drafter, "verifier": ev.resumed.verifier,
                                   "from_token": ev.resumed.from_token})
        elif kind == "finished":
            finished = ev.finished
    seconds = time.perf_counter() - t0
    if finished is None:
        raise GatewayError("the gateway stream ended without a result")
    out.update(
        text=finished.text, token_ids=list(finished.token_ids), new_tokens=finished.new_tokens,
        tau=finished.tau, tokens_per_s=finished.new_tokens / seconds if seconds > 0 else 0.0,
        rounds=finished.rounds, seconds=seconds, finish_reason=finished.finish_reason, resumes=finished.resumes,
    )
    return out
