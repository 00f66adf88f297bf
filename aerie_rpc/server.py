"""The server scaffold every aerie service runs in: a gRPC server with standard health
checking and reflection, keepalive settings, TLS when configured (aerie_rpc/tls.py), and a
graceful shutdown on SIGTERM (report NOT_SERVING, let in-flight rounds finish, then stop)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aerie_rpc.tls import TlsSettings

log = logging.getLogger("aerie.server")

# Dead peers on long streams are noticed through HTTP/2 keepalive pings.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
]
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
]


def channel(address: str, tls: TlsSettings | None = None) -> grpc.Channel:
    """A channel to `address`: over TLS when `tls` has a CA to check the server against."""
    if tls is None or not tls.dialing:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS + tls.channel_options())


class Sidecar(Protocol):
    """Another server of the same process (the gateway's HTTP API): started before the gRPC
    server, stopped after it, so that it drains alongside."""

    name: str
    address: str

    def stop(self, grace_s: float) -> None: ...


class ServiceHost:
    """A started gRPC server. `register(server)` adds the servicers; `service_names` are the
    full names reported by health checking and reflection. With `tls` serving, the port
    speaks TLS only (and asks for client certificates if `tls` has a client CA);
    `health_listen` adds a plaintext port that answers health checks and nothing else."""

    def __init__(
        self,
        listen: str,
        register: Callable[[grpc.Server], None],
        service_names: Sequence[str],
        workers: int = 32,
        on_drain: Callable[[], None] | None = None,
        sidecars: Sequence[Sidecar] = (),
        tls: TlsSettings | None = None,
        health_listen: str | None = None,
    ):
        self.sidecars = list(sidecars)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=SERVER_OPTIONS)
        register(self.server)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        self.tls = tls if tls is not None and tls.serving else None
        try:
            self.port = _listen(self.server, listen, self.tls)
        except OSError:
            self._stop_sidecars(0.0)
            raise
        self.address = f"{listen.rsplit(':', 1)[0]}:{self.port}"
        self.health_server: grpc.Server | None = None
        self.health_address: str | None = None
        if health_listen:
            # Its own small pool: probes are answered even while every worker above holds a stream.
            self.health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            port = _listen(self.health_server, health_listen, None)
            self.health_address = f"{health_listen.rsplit(':', 1)[0]}:{port}"
        self.on_drain = on_drain
        self._stopped = threading.Event()
        self.server.start()
        if self.health_server is not None:
            self.health_server.start()
        self._set_all(health_pb2.HealthCheckResponse.SERVING)

    def _set_all(self, status) -> None:
        for name in ["", *self.service_names]:
            self.health.set(name, status)

    def stop(self, grace_s: float = 10.0) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight rounds finish."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + grace_s
        if self.on_drain is not None:
            self.on_drain()
        self.server.stop(grace_s).wait()
        self._stop_sidecars(max(0.0, deadline - time.monotonic()))
        if self.health_server is not None:
            self.health_server.stop(0).wait()

    def _stop_sidecars(self, grace_s: float) -> None:
        for sidecar in self.sidecars:
            sidecar.stop(grace_s)

    def serve_until_signalled(self, grace_s: float) -> None:
        """Block until SIGTERM or SIGINT, then drain and return."""
        got = threading.Event()

        def handler(signum, frame):  # noqa: ARG001
            log.info("signal %s: draining", signum)
            got.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)
        extra = f" (health checks also on {self.health_address})" if self.health_address else ""
        print(f"serving {', '.join(self.service_names)} on {self.address}{' over TLS' if self.tls else ''}{extra}",
              file=sys.stderr, flush=True)
        for sidecar in self.sidecars:
            print(f"serving {sidecar.name} on {sidecar.address}", file=sys.stderr, flush=True)
        while not got.wait(0.5):
            pass
        self.stop(grace_s)
        print(f"stopped {', '.join(self.service_names)} on {self.address}", file=sys.stderr, flush=True)


def _listen(server: grpc.Server, listen: str, tls: TlsSettings | None) -> int:
    port = server.add_secure_port(listen, tls.server_credentials()) if tls else server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen!r}: address in use or not valid (use HOST:PORT)")
    return port


def wait_for_serving(address: str, timeout_s: float = 60.0, service: str = "", tls: TlsSettings | None = None) -> None:
    """Block until the health check at `address` answers SERVING."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    with channel(address, tls) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as e:
                last = e
            time.sleep(0.1)
    raise TimeoutError(f"{address} did not report SERVING within {timeout_s:.0f} s ({last})")
