"""The server scaffold every aerie service runs in: a gRPC server with standard health
checking and reflection, keepalive settings, and a graceful shutdown on SIGTERM (report
NOT_SERVING, let in-flight rounds finish, then stop)."""

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


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


class Sidecar(Protocol):
    """Another server of the same process (the gateway's HTTP API): started before the gRPC
    server, stopped after it, so that it drains alongside."""

    name: str
    address: str

    def stop(self, grace_s: float) -> None: ...


class ServiceHost:
    """A started gRPC server. `register(server)` adds the servicers; `service_names` are the
    full names reported by health checking and reflection."""

    def __init__(
        self,
        listen: str,
        register: Callable[[grpc.Server], None],
        service_names: Sequence[str],
        workers: int = 32,
        on_drain: Callable[[], None] | None = None,
        sidecars: Sequence[Sidecar] = (),
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
        self.port = self.server.add_insecure_port(listen)
        if self.port == 0:
            self._stop_sidecars(0.0)
            raise OSError(f"cannot listen on {listen!r}: address in use or not valid (use HOST:PORT)")
        host = listen.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"
        self.on_drain = on_drain
        self._stopped = threading.Event()
        self.server.start()
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
        print(f"serving {', '.join(self.service_names)} on {self.address}", file=sys.stderr, flush=True)
        for sidecar in self.sidecars:
            print(f"serving {sidecar.name} on {sidecar.address}", file=sys.stderr, flush=True)
        while not got.wait(0.5):
            pass
        self.stop(grace_s)
        print(f"stopped {', '.join(self.service_names)} on {self.address}", file=sys.stderr, flush=True)


def wait_for_serving(address: str, timeout_s: float = 60.0, service: str = "") -> None:
    """Block until the health check at `address` answers SERVING."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    with channel(address) as ch:
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
