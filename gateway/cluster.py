"""Verify, draft and gateway services as local processes on free loopback ports (the demo, the
network benchmark and the load test use this; so can a person trying the split on one machine)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from aerie_rpc.server import wait_for_serving

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("verify", "draft", "gateway")
STOP_ORDER = ("gateway", "draft", "verify")  # callers before the services they call


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def role_of(name: str) -> str:
    """"verify1" -> "verify"."""
    return name.rstrip("0123456789")


class LocalCluster:
    """`with LocalCluster(...) as c:` starts `verifiers` verify services, `drafters` draft
    services each driving all the verifiers, and a gateway over all the drafters, and stops
    them on exit (SIGTERM, so each drains, then SIGKILL after `grace_s`). Processes are named
    verify0.., draft0.., gateway. `extra_args` adds flags per role ("verify", "draft",
    "gateway"). Spans go to JSON-lines files unless `trace_files` is off."""

    def __init__(self, model: str | None, head: str | None, device: str = "cpu", dtype: str = "float32",
                 model_dir: str | None = None, extra_env: dict[str, str] | None = None, startup_s: float = 300.0,
                 verifiers: int = 1, drafters: int = 1, extra_args: Mapping[str, Sequence[str]] | None = None,
                 trace_files: bool = True):
        self.model, self.head, self.device, self.dtype = model, head, device, dtype
        self.model_dir = model_dir  # resolved directory (tokenizer for the gateway)
        self.extra_env = extra_env or {}
        self.extra_args = {role: list((extra_args or {}).get(role, ())) for role in ROLES}
        self.startup_s = startup_s
        self.trace_files = trace_files
        self.tmp = Path(tempfile.mkdtemp(prefix="aerie-cluster-"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.verify_addresses = [f"127.0.0.1:{free_port()}" for _ in range(verifiers)]
        self.draft_addresses = [f"127.0.0.1:{free_port()}" for _ in range(drafters)]
        self.gateway_address = f"127.0.0.1:{free_port()}"
        self.addresses = {**{f"verify{i}": a for i, a in enumerate(self.verify_addresses)},
                          **{f"draft{i}": a for i, a in enumerate(self.draft_addresses)},
                          "gateway": self.gateway_address}

    @property
    def verify_address(self) -> str:
        return self.verify_addresses[0]

    @property
    def draft_address(self) -> str:
        return self.draft_addresses[0]

    def _spawn(self, name: str, module: str, args: list[str]) -> None:
        env = {
            **os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "OTEL_SERVICE_NAME": f"aerie-{name}", **self.extra_env,
        }
        if self.trace_files:
            env["AERIE_TRACE_FILE"] = str(self.tmp / f"{name}.spans.jsonl")
        env.setdefault("OTEL_TRACES_EXPORTER", "none")
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def start(self) -> LocalCluster:
        model_args = ["--model", self.model] if self.model else []
        target_args = ["--model", self.model_dir] if self.model_dir else model_args
        common = ["--device", self.device, "--dtype", self.dtype]
        for i, address in enumerate(self.verify_addresses):
            self._spawn(f"verify{i}", "verify_service",
                        ["--listen", address, *target_args, *common, *self.extra_args["verify"]])
        for i, address in enumerate(self.draft_addresses):
            self._spawn(f"draft{i}", "draft_service",
                        ["--listen", address, "--verifier", ",".join(self.verify_addresses), *model_args,
                         *(["--head", self.head] if self.head else []), *common, *self.extra_args["draft"]])
        self._spawn("gateway", "gateway",
                    ["--listen", self.gateway_address, "--draft", ",".join(self.draft_addresses), *target_args,
                     *self.extra_args["gateway"]])
        deadline = time.monotonic() + self.startup_s
        for name, address in self.addresses.items():
            while True:
                proc = self.procs[name]
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"the {name} service exited with status {proc.returncode}:\n{self.log(name)}")
                try:
                    wait_for_serving(address, timeout_s=1.0)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"the {name} service did not start in {self.startup_s:.0f} s:\n"
                                           f"{self.log(name)}") from None
        return self

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.procs.items()}

    def kill(self, name: str) -> int:
        """SIGKILL one service (a crash: no draining); returns its exit status."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        return proc.wait(30)

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text()[-3000:] if path.is_file() else ""

    def stop(self, grace_s: float = 15.0) -> dict[str, int | None]:
        """SIGTERM all (gateway first, then drafters, then verifiers), wait, SIGKILL
        stragglers; return exit codes."""
        for name in sorted(self.procs, key=lambda n: STOP_ORDER.index(role_of(n))):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes

    def spans(self, trace_id: str | None = None) -> list[dict]:
        out: list[dict] = []
        for path in sorted(self.tmp.glob("*.spans.jsonl")):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if trace_id is None or row["trace_id"] == trace_id:
                    out.append(row)
        return out

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def round_summary(spans: list[dict]) -> dict:
    """Per-round means read from the drafter's and verifier's round spans of one trace."""
    rounds = [s for s in spans if s["name"] == "drafter.round"]
    verify = [s for s in spans if s["name"] == "verifier.round"]
    if not rounds:
        return {"rounds": 0}

    def mean(key: str) -> float:
        return sum(float(s["attributes"].get(key, 0.0)) for s in rounds) / len(rounds)

    round_ms = sum((s["end_ns"] - s["start_ns"]) / 1e6 for s in rounds) / len(rounds)
    return {
        "rounds": len(rounds),
        "verifier_spans": len(verify),
        "round_ms": round_ms,
        "draft_ms": mean("aerie.draft_ms"),
        "verify_ms": mean("aerie.verify_ms"),
        "wire_ms": mean("aerie.wire_ms"),
        "tree_size": mean("aerie.tree_size"),
        "accepted": mean("aerie.accepted"),
        "request_bytes": mean("aerie.request_bytes"),
        "response_bytes": mean("aerie.response_bytes"),
    }
