"""Verify, draft and gateway services as three local processes on free loopback ports (the
demo and the network benchmark use this; so can a person trying the split on one machine)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aerie_rpc.server import wait_for_serving

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """`with LocalCluster(...) as c:` starts the three services and stops them on exit
    (SIGTERM, so each drains, then SIGKILL after `grace_s`). Spans go to JSON-lines files."""

    def __init__(self, model: str | None, head: str | None, device: str = "cpu", dtype: str = "float32",
                 model_dir: str | None = None, extra_env: dict[str, str] | None = None, startup_s: float = 300.0):
        self.model, self.head, self.device, self.dtype = model, head, device, dtype
        self.model_dir = model_dir  # resolved directory (tokenizer for the gateway)
        self.extra_env = extra_env or {}
        self.startup_s = startup_s
        self.tmp = Path(tempfile.mkdtemp(prefix="aerie-cluster-"))
        self.procs: dict[str, subprocess.Popen] = {}
        ports = [free_port() for _ in range(3)]
        self.verify_address, self.draft_address, self.gateway_address = (f"127.0.0.1:{p}" for p in ports)

    def _spawn(self, name: str, module: str, args: list[str]) -> None:
        env = {
            **os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "AERIE_TRACE_FILE": str(self.tmp / f"{name}.spans.jsonl"), "OTEL_SERVICE_NAME": f"aerie-{name}",
            **self.extra_env,
        }
        env.setdefault("OTEL_TRACES_EXPORTER", "none")
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def start(self) -> LocalCluster:
        model_args = ["--model", self.model] if self.model else []
        common = ["--device", self.device, "--dtype", self.dtype]
        self._spawn("verify", "verify_service",
                    ["--listen", self.verify_address, *(["--model", self.model_dir] if self.model_dir else model_args),
                     *common])
        self._spawn("draft", "draft_service",
                    ["--listen", self.draft_address, "--verifier", self.verify_address, *model_args,
                     *(["--head", self.head] if self.head else []), *common])
        self._spawn("gateway", "gateway",
                    ["--listen", self.gateway_address, "--draft", self.draft_address,
                     *(["--model", self.model_dir] if self.model_dir else model_args)])
        deadline = time.monotonic() + self.startup_s
        for name, address in (("verify", self.verify_address), ("draft", self.draft_address),
                              ("gateway", self.gateway_address)):
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

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text()[-3000:] if path.is_file() else ""

    def stop(self, grace_s: float = 15.0) -> dict[str, int | None]:
        """SIGTERM all (gateway first), wait, SIGKILL stragglers; return exit codes."""
        for name in ("gateway", "draft", "verify"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
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
