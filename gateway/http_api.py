"""The gateway's OpenAI-compatible HTTP API (`--http-listen`), served from the gateway process
beside its gRPC server, on the standard library's threading HTTP server.

Every generation goes through `GatewayServicer.generate`, the path of the gRPC `Generate`:
the same session records, routing, admission limits and resumption on node loss. This module
only translates: OpenAI request bodies to a `GenerateRequest` (gateway/openai_schema.py),
gateway events to OpenAI responses or server-sent events, and errors to OpenAI's shape.

Stop strings are handled here, since the engine stops only at token ids: the text is cut
before the first stop string (held back while it may still be one) and the session is
cancelled, so its record ends `cancelled` holding the tokens generated up to the cut.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import secrets
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import grpc

from aerie.errors import InputError
from aerie.params import MAX_SEED
from aerie_rpc.status import status_of
from aerie_rpc.telemetry import extract
from aerie_rpc.v1 import common_pb2, gateway_pb2
from gateway.auth import Principal, Unauthenticated, bearer_token
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.metrics import render_prometheus
from gateway.openai_schema import (
    ApiError,
    GenerationRequest,
    StopScanner,
    chunk_body,
    completion_body,
    finish_reason,
    models_body,
    parse_chat,
    parse_completion,
    parse_json,
    response_id,
    sse,
    usage,
    usage_chunk,
)
from gateway.service import GatewayServicer, PromptTooLong, RateLimited

log = logging.getLogger("aerie.gateway.http")
DEFAULT_MODEL_NAME = "aerie"
SESSION_HEADER = "X-Aerie-Session-Id"
_CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)

# gRPC status -> (HTTP status, OpenAI error type, error code).
_BY_CODE: dict[grpc.StatusCode, tuple[int, str, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "permission_denied"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "invalid_request_error", "conflict"),
    # Capacity (sessions, every drafter full) rather than the caller's quota: try again soon.
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "server_error", "overloaded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (503, "server_error", "timeout"),
}


def api_error(exc: BaseException) -> ApiError:
    """The HTTP answer to an exception raised while serving a request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RateLimited):
        return ApiError(429, str(exc), "rate_limit_error", None, "rate_limit_exceeded",
                        {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))})
    if isinstance(exc, PromptTooLong):
        return ApiError(400, str(exc), "invalid_request_error", None, "context_length_exceeded")
    if isinstance(exc, Unauthenticated):
        return ApiError(401, str(exc), "authentication_error", None, "invalid_api_key")
    code, message = status_of(exc)
    status, type_, name = _BY_CODE.get(code, (500, "server_error", "internal_error"))
    return ApiError(status, message, type_, None, name, {"Retry-After": "1"} if status == 503 else None)


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise InputError(f"--http-listen: expected HOST:PORT, got {listen!r}")
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a stream still open at stop must not hold the process

    def __init__(self, address: tuple[str, int], api: HttpApi):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.api = api
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the OpenAI clients reuse connections
    server_version = "aerie"
    sys_version = ""
    timeout = 120  # seconds a socket read or write may block (idle keep-alive included)
    server: _Server
    body_read = False

    def _dispatch(self) -> None:
        self.server.api.handle(self)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)


Route = Callable[[_Handler], None]


class HttpApi:
    """The HTTP server; a sidecar of the gateway's gRPC ServiceHost (stopped after it)."""

    name = "the OpenAI-compatible HTTP API"

    def __init__(self, listen: str, servicer: GatewayServicer):
        self.servicer = servicer
        self.max_body = servicer.config.http_max_body_bytes
        self.server = _Server(split_listen(listen), self)
        host = self.server.server_address[0]
        self.address = f"[{host}]:{self.server.server_port}" if ":" in host else f"{host}:{self.server.server_port}"
        self._routes: dict[str, dict[str, Route]] = {
            "/v1/completions": {"POST": lambda h: self._generation(h, chat=False)},
            "/v1/chat/completions": {"POST": lambda h: self._generation(h, chat=True)},
            "/v1/models": {"GET": self._models},
            "/v1/models/{id}": {"GET": self._model},
            "/health": {"GET": self._health},
            "/metrics": {"GET": self._metrics},
        }
        self._inflight = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="aerie-http", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float) -> None:
        """Refuse new connections; give requests in flight up to `grace_s` to finish."""
        deadline = time.monotonic() + grace_s
        with self._idle:
            while self._inflight and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
        self.server.shutdown()
        self.server.server_close()

    @property
    def model(self) -> str:
        return self.servicer.model_name or DEFAULT_MODEL_NAME

    # --- dispatch ------------------------------------------------------------------------

    def _route(self, path: str) -> str | None:
        if path in self._routes:
            return path
        if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
            return "/v1/models/{id}"
        return None

    def handle(self, h: _Handler) -> None:
        route = self._route(urlsplit(h.path).path.rstrip("/") or "/")
        metrics = self.servicer.metrics
        h.body_read = False
        metrics.request("http", route or "unknown")
        with self._idle:
            self._inflight += 1
        try:
            if route is None:
                raise ApiError(404, f"unknown route: {h.command} {urlsplit(h.path).path}", code="unknown_route")
            action = self._routes[route].get(h.command)
            if action is None:
                allowed = ", ".join(self._routes[route])
                raise ApiError(405, f"{route} takes {allowed}, not {h.command}", code="method_not_allowed",
                               headers={"Allow": allowed})
            action(h)
        except Exception as e:  # noqa: BLE001 - every failure becomes an answer in OpenAI's shape
            err = api_error(e)
            if err.status >= 500 and not isinstance(e, ApiError):
                log.warning("%s %s: %s", h.command, h.path, err.message)
            metrics.error("http", route or "unknown", str(err.status))
            if not h.body_read and (h.headers.get("Content-Length", "0").strip() != "0"
                                    or "Transfer-Encoding" in h.headers):
                h.close_connection = True  # its unread body would be taken for the next request
            try:
                self._send_json(h, err.status, err.body(), err.headers)
            except OSError:
                h.close_connection = True
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def _send_json(self, h: _Handler, status: int, body: dict,
                   headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        if h.close_connection:
            h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(data)

    def _read_body(self, h: _Handler) -> bytes:
        length = h.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise ApiError(411 if length is None else 400, "send the request body with a Content-Length",
                           code="length_required")
        size = int(length)
        if size > self.max_body:
            raise ApiError(413, f"request body of {size} bytes is over this server's limit of {self.max_body}",
                           code="request_too_large")
        h.body_read = True
        return h.rfile.read(size)

    def _caller(self, h: _Handler) -> Principal:
        return self.servicer.authorize(bearer_token(h.headers.get("Authorization")))

    # --- routes --------------------------------------------------------------------------

    def _health(self, h: _Handler) -> None:
        reason = self.servicer.readiness()
        if reason is not None:
            raise ApiError(503, reason, "server_error", None, "unavailable")
        self._send_json(h, 200, {"status": "ok"})

    def _metrics(self, h: _Handler) -> None:
        data = render_prometheus(self.servicer.metrics.collect()).encode()
        h.send_response(200)
        h.send_header("Content-Type", METRICS_CONTENT_TYPE)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _models(self, h: _Handler) -> None:
        self._caller(h)
        self._send_json(h, 200, models_body([self.model], int(time.time())))

    def _model(self, h: _Handler) -> None:
        self._caller(h)
        wanted = urlsplit(h.path).path[len("/v1/models/"):].rstrip("/")
        self._check_model(wanted)
        self._send_json(h, 200, models_body([self.model], int(time.time()))["data"][0])

    def _check_model(self, model: str) -> None:
        if model != self.model:
            raise ApiError(404, f"the model '{model}' does not exist: this server serves '{self.model}'",
                           "invalid_request_error", "model", "model_not_found")

    def _generation(self, h: _Handler, chat: bool) -> None:
        raw = self._read_body(h)
        caller = self._caller(h)
        body = parse_json(raw)
        req = parse_chat(body) if chat else parse_completion(body)
        self._check_model(req.model)
        if chat:
            prompt_ids = self.servicer.encode_chat(req.messages)
        else:
            prompt_ids = req.prompt_ids or self.servicer.encode(req.prompt, chat=False)
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
        grpc_req = gateway_pb2.GenerateRequest(
            prompt_ids=prompt_ids, max_new_tokens=req.max_tokens,
            params=common_pb2.SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=seed))
        parent = extract({k.lower(): v for k, v in h.headers.items()})
        events = self.servicer.generate(grpc_req, caller, parent)
        # The first event comes only once the session exists and a drafter has taken it, so
        # a refusal still gets its own status code rather than a broken stream.
        first = next(events)
        stream = itertools.chain([first], events)
        try:
            if req.stream:
                self._stream(h, req, first.session_id, len(prompt_ids), stream, events, caller)
            else:
                self._complete(h, req, first.session_id, len(prompt_ids), stream, events, caller)
        finally:
            events.close()  # a no-op once finished; otherwise the session is left resumable

    def _cut(self, events: Iterator, session_id: str, caller: Principal) -> None:
        """A stop string came: cancel the session (its record says so), then let go of it."""
        try:
            self.servicer.cancel_session(session_id, caller)
        except Exception as e:  # noqa: BLE001 - the answer is complete either way
            log.warning("session %s: cancelling at a stop string failed: %s", session_id, e)
        events.close()

    def _complete(self, h: _Handler, req: GenerationRequest, sid: str, prompt_tokens: int,
                  stream: Iterator[gateway_pb2.GenerateEvent], events, caller: Principal) -> None:
        scanner = StopScanner(req.stop)
        pieces: list[str] = []
        produced, reason, text = 0, "", ""
        for ev in stream:
            kind = ev.WhichOneof("event")
            if kind == "tokens":
                produced = ev.tokens.generated
                pieces.append(scanner.feed(ev.tokens.text))
                if scanner.stopped:
                    self._cut(events, sid, caller)
                    break
            elif kind == "finished":
                produced, reason, text = ev.finished.new_tokens, ev.finished.finish_reason, ev.finished.text
        if scanner.stopped:
            text = "".join(pieces)
        body = completion_body(req, response_id(req.chat, sid), int(time.time()), text,
                               finish_reason(reason, scanner.stopped), usage(prompt_tokens, produced))
        self._send_json(h, 200, body, {SESSION_HEADER: sid})

    def _stream(self, h: _Handler, req: GenerationRequest, sid: str, prompt_tokens: int,
                stream: Iterator[gateway_pb2.GenerateEvent], events, caller: Principal) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("X-Accel-Buffering", "no")  # proxies must pass each event on at once
        h.send_header(SESSION_HEADER, sid)
        h.end_headers()
        rid, created = response_id(req.chat, sid), int(time.time())
        scanner = StopScanner(req.stop)
        produced, reason = 0, ""

        def send(obj) -> None:
            data = sse(obj)
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

        try:
            if req.chat:
                send(chunk_body(req, rid, created, "", None, first=True))
            for ev in stream:
                kind = ev.WhichOneof("event")
                if kind == "tokens":
                    produced = ev.tokens.generated
                    piece = scanner.feed(ev.tokens.text)
                    if piece:
                        send(chunk_body(req, rid, created, piece, None))
                    if scanner.stopped:
                        self._cut(events, sid, caller)
                        break
                elif kind == "finished":
                    produced, reason = ev.finished.new_tokens, ev.finished.finish_reason
            tail = scanner.flush()
            if tail:
                send(chunk_body(req, rid, created, tail, None))
            send(chunk_body(req, rid, created, None, finish_reason(reason, scanner.stopped)))
            if req.include_usage:
                send(usage_chunk(req, rid, created, usage(prompt_tokens, produced)))
            send("[DONE]")
        except _CLIENT_GONE:
            # As on gRPC: the session is left interrupted, resumable by its id.
            events.close()
            h.close_connection = True
            return
        except Exception as e:  # noqa: BLE001 - headers are sent: the error goes in the stream
            events.close()
            err = api_error(e)
            self.servicer.metrics.error("http", "/v1/chat/completions" if req.chat else "/v1/completions",
                                        str(err.status))
            try:
                send(err.body())
            except OSError:
                h.close_connection = True
                return
        try:
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            h.close_connection = True
