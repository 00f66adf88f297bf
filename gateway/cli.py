"""Hooks for the `aerie` command line: `aerie serve verify|draft|gateway` and
`aerie generate --gateway ADDR`."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from aerie_rpc.config import add_arguments, from_args
from aerie_rpc.tls import TlsSettings

SERVE_HELP = {
    "verify": "the verify service: the target model and the sessions' KV caches",
    "draft": "the draft service: the EAGLE head, driving rounds against verify services",
    "gateway": "the gateway: the client API, session records (Redis or in process), resumption",
}


def _services() -> dict[str, tuple[type, Callable]]:
    from draft_service.config import DraftConfig
    from gateway.config import GatewayConfig
    from verify_service.config import VerifyConfig

    def run_verify(config):
        from verify_service.service import run

        return run(config)

    def run_draft(config):
        from draft_service.service import run

        return run(config)

    def run_gateway(config):
        from gateway.service import run

        return run(config)

    return {"verify": (VerifyConfig, run_verify), "draft": (DraftConfig, run_draft),
            "gateway": (GatewayConfig, run_gateway)}


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve verify|draft|gateway`; every flag is mirrored by AERIE_<FLAG>."""
    serve = subparsers.add_parser("serve", help="run one of the services (verify, draft, gateway)")
    sub = serve.add_subparsers(dest="service", required=True)
    for name, (cls, runner) in _services().items():
        p = sub.add_parser(name, help=SERVE_HELP[name], description=SERVE_HELP[name] +
                           ". Every flag can also be set as the environment variable AERIE_<FLAG>.")
        add_arguments(p, cls)
        p.set_defaults(handler=_make_handler(cls, runner))
    return serve


def add_loadtest_parser(subparsers) -> argparse.ArgumentParser:
    """Register `loadtest` (gateway/loadtest.py)."""
    from gateway import loadtest

    p = subparsers.add_parser("loadtest", help="concurrent sessions through verify, draft and gateway processes on "
                              "loopback (a tiny target on the CPU), optionally killing a verifier midway")
    loadtest.add_arguments(p)
    p.set_defaults(handler=loadtest.run_command)
    return p


def _make_handler(cls: type, runner: Callable) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        return runner(from_args(cls, args))

    return handler


def generate_via_gateway(
    address: str, prompt: str, *, max_new_tokens: int, temperature: float, top_p: float, seed: int,
    chat: bool, top_k: int = 0, timeout_s: float = 3600.0, api_key: str | None = None,
    tls: TlsSettings | None = None,
) -> dict:
    """Stream one answer through a running gateway. Returns the fields of in-process
    generation (text, token_ids, new_tokens, tau, tokens_per_s, rounds) plus session_id,
    trace_id, resumes and finish_reason."""
    from gateway import client

    req = client.request(prompt=prompt, chat=chat, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, top_k=top_k, seed=seed)
    out = client.collect(client.stream(address, req, timeout_s, api_key, tls))
    keep = ("text", "token_ids", "new_tokens", "tau", "tokens_per_s", "rounds", "session_id", "trace_id",
            "resumes", "finish_reason")
    return {k: out[k] for k in keep if k in out}
