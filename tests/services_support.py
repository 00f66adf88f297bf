"""Shared by the service tests: servers started in this process on free loopback ports, and
service processes (the tiny model they serve is built by tests/tiny.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis

from aerie_rpc.server import ServiceHost, channel, wait_for_serving
from aerie_rpc.tls import TlsSettings
from aerie_rpc.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.store import RedisStore

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/0"


class RedisPrefix:
    """A key prefix of its own in the real Redis, deleted afterwards."""

    def __init__(self, ttl_s: float = 600.0):
        self.prefix = f"aerie-test-{uuid.uuid4().hex[:10]}:"
        self.ttl_s = ttl_s
        self.client = redis.Redis.from_url(REDIS_URL)
        self.client.ping()

    def store(self) -> RedisStore:
        return RedisStore(REDIS_URL, prefix=self.prefix, ttl_s=self.ttl_s)

    def key(self, sid: str) -> str:
        return f"{self.prefix}session:{sid}"

    def cleanup(self) -> None:
        keys = list(self.client.scan_iter(match=self.prefix + "*"))
        if keys:
            self.client.delete(*keys)
        self.client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """In-process verify, draft and gateway servers."""

    hosts: list[ServiceHost] = field(default_factory=list)
    verifiers: list[object] = field(default_factory=list)
    drafters: list[object] = field(default_factory=list)
    gateway: object = None
    gateway_address: str = ""

    def stop(self) -> None:
        for host in reversed(self.hosts):
            host.stop(0.5)


def start_verifier(model_dir: Path, **overrides):
    from verify_service.config import VerifyConfig
    from verify_service.service import start

    return start(VerifyConfig(listen="127.0.0.1:0", model=str(model_dir), **overrides))


def start_drafter(model_dir: Path, head_dir: Path, verifiers: list[str], **overrides):
    from draft_service.config import DraftConfig
    from draft_service.service import start

    return start(DraftConfig(listen="127.0.0.1:0", model=str(model_dir), head=str(head_dir),
                             verifier=tuple(verifiers), **overrides))


def start_gateway(drafters: list[str], model_dir: Path | None = None, store=None, **overrides):
    from gateway.config import GatewayConfig
    from gateway.service import build_servicer, start

    config = GatewayConfig(listen="127.0.0.1:0", draft=tuple(drafters),
                           model=str(model_dir) if model_dir else None, **overrides)
    return start(config, build_servicer(config, store))


def gateway_stub(address: str, tls: TlsSettings | None = None) -> tuple[grpc.Channel, gateway_pb2_grpc.GatewayStub]:
    ch = channel(address, tls)
    return ch, gateway_pb2_grpc.GatewayStub(ch)


def generate(stub, prompt_ids, max_new_tokens=40, temperature=0.0, seed=0, timeout=60.0, on_event=None,
             params=None, **kw):
    """Stream one generation; return (token ids, events). `params` (a SamplingParams message)
    replaces temperature and seed."""
    from aerie_rpc.v1 import common_pb2

    req = gateway_pb2.GenerateRequest(
        prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
        params=params or common_pb2.SamplingParams(temperature=temperature, seed=seed), **kw)
    ids: list[int] = []
    events = []
    for ev in stub.Generate(req, timeout=timeout):
        events.append(ev)
        if ev.WhichOneof("event") == "tokens":
            ids += list(ev.tokens.ids)
        if on_event is not None:
            on_event(ev, ids)
    return ids, events


def spawn(module: str, args: list[str], env: dict | None = None, log: Path | None = None,
          command: list[str] | None = None) -> subprocess.Popen:
    """A service in its own process (for kill tests): `python -m module args`, or `command +
    args`. Its output goes to the file `log` (a pipe nobody reads could fill and block it)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OTEL_TRACES_EXPORTER": "none", **(env or {})}
    if log is None:
        fd, name = tempfile.mkstemp(prefix=f"aerie-{module}-", suffix=".log")
        os.close(fd)
        log = Path(name)
    with open(log, "wb") as out:
        proc = subprocess.Popen([*(command or [sys.executable, "-m", module]), *args], cwd=ROOT, env=full_env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proc.log_path = log  # type: ignore[attr-defined]
    return proc


def process_log(proc: subprocess.Popen) -> str:
    path = getattr(proc, "log_path", None)
    return Path(path).read_text(errors="replace")[-3000:] if path and Path(path).is_file() else ""


def wait_all(addresses: list[str], procs: list[subprocess.Popen], timeout_s: float = 120.0,
             tls: TlsSettings | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    for address, proc in zip(addresses, procs):
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{address} exited with status {proc.returncode}:\n{process_log(proc)}")
            try:
                wait_for_serving(address, timeout_s=1.0, tls=tls)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{address} did not start within {timeout_s:.0f} s:\n{process_log(proc)}") from None
