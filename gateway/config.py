"""Configuration of the gateway (flags mirrored by AERIE_* environment variables)."""

from __future__ import annotations

from dataclasses import dataclass

from aerie.errors import InputError
from aerie_rpc.config import option
from aerie_rpc.tls import TlsOptions


@dataclass
class GatewayConfig(TlsOptions):
    listen: str = option("127.0.0.1:50060", "address to serve on, HOST:PORT (port 0 picks a free one)")
    draft: tuple[str, ...] = option((), "draft services to route to, ADDR[,ADDR...] (required)")
    redis: str | None = option(None, "Redis URL for session records (default: an in-process store)")
    redis_prefix: str = option("aerie:", "key prefix of this deployment's records in Redis")
    model: str | None = option(None, "model directory whose tokenizer turns text prompts into ids (optional)")
    model_name: str | None = option(None, "model name reported to clients and traces (default: from --model)")
    session_ttl_s: float = option(86400.0, "session records expire this long after their last change")
    lease_s: float = option(60.0, "a running session whose gateway wrote nothing this long may be resumed elsewhere")
    max_new_tokens_limit: int = option(8192, "largest max_new_tokens a request may ask for")
    max_prompt_tokens: int = option(16384, "longest prompt a request may bring")
    max_sessions: int = option(256, "sessions generated at once by this gateway; beyond: RESOURCE_EXHAUSTED")
    max_resumes: int = option(4, "resumes on other nodes per request before giving up with UNAVAILABLE")
    first_event_timeout_s: float = option(180.0, "a drafter sending nothing this long after a call counts as lost")
    round_timeout_s: float = option(60.0, "a drafter silent this long between rounds counts as lost")
    request_timeout_s: float = option(3600.0, "deadline of one drafter call (a whole generation)")
    drafter_cooldown_s: float = option(10.0, "after losing a drafter, leave it out of new sessions this long")
    workers: int = option(64, "server threads (each open stream holds one)")
    grace_s: float = option(30.0, "on SIGTERM, how long in-flight generations may take to finish")
    http_listen: str = option("", "address of the OpenAI-compatible HTTP API, HOST:PORT (off when empty)")
    http_max_body_bytes: int = option(1 << 20, "largest HTTP request body accepted; beyond: 413")
    api_keys_file: str | None = option(None, "file of API keys, one 'name:key' (or bare key) per line; "
                                             "with any key configured, every request needs one")
    api_keys: tuple[str, ...] = option((), "API keys as 'name:key' items, comma separated (prefer the "
                                           "environment or --api-keys-file: flags show in ps)", secret=True)
    rate_limit_rpm: int = option(0, "requests per minute allowed to each API key (0: no limit); beyond: "
                                    "HTTP 429 / RESOURCE_EXHAUSTED")

    def __post_init__(self) -> None:
        if not self.draft:
            raise InputError("the gateway needs at least one draft service: --draft ADDR[,ADDR...]")
        for name in ("max_new_tokens_limit", "max_prompt_tokens", "max_sessions", "workers", "http_max_body_bytes"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_resumes < 0:
            raise InputError("--max-resumes must be >= 0")
        if self.rate_limit_rpm < 0:
            raise InputError("--rate-limit-rpm must be >= 0 (0 turns the limit off)")
