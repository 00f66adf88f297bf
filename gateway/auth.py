"""API keys: who is calling, for both the gRPC and the HTTP API.

Keys come from a file (`--api-keys-file`, one key per line, `name:key` or a bare key; blank
lines and `#` comments are skipped) and from `AERIE_API_KEYS` (the same items, comma
separated). Without any key, authentication is off and every caller is `ANONYMOUS`.

A caller is known by the name of its key; session records and rate-limit counters store
`key_id`, a hash of that name, so neither Redis nor a trace ever holds a key. A bare key's
name is a short fingerprint of the key itself, stable across reorderings of the file.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from aerie.errors import InputError
from aerie_rpc.status import ServiceError


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


@dataclass(frozen=True)
class Principal:
    name: str
    key_id: str  # what records store: a hash of `name`, '' for the anonymous caller


ANONYMOUS = Principal("", "")


def key_id(name: str) -> str:
    return hashlib.sha256(f"aerie-key-name:{name}".encode()).hexdigest()[:32]


def _digest(secret: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest from leaking a key's length.
    return hashlib.sha256(secret.encode()).digest()


def parse_key_items(items: Iterable[str], where: str) -> dict[str, str]:
    """`name:key` or bare `key` items -> {name: key}. Duplicate names or keys are refused:
    either would make two callers one."""
    out: dict[str, str] = {}
    seen: set[str] = set()
    for n, raw in enumerate(items, 1):
        item = raw.strip()
        if not item or item.startswith("#"):
            continue
        name, sep, key = item.partition(":")
        if not sep:
            name, key = f"key-{hashlib.sha256(item.encode()).hexdigest()[:12]}", item
        name, key = name.strip(), key.strip()
        if not name or not key:
            raise InputError(f"{where}, item {n}: expected 'name:key' or a bare key")
        if name in out:
            raise InputError(f"{where}: the key name '{name}' appears twice")
        if key in seen:
            raise InputError(f"{where}: one key appears twice (under '{name}' and another name)")
        out[name] = key
        seen.add(key)
    return out


def load_keys(path: str | None, env_items: Iterable[str]) -> dict[str, str]:
    """Keys from the file (if any) and the environment's list, merged."""
    keys: dict[str, str] = {}
    if path:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise InputError(f"--api-keys-file: cannot read '{path}': {e.strerror or e}") from None
        keys = parse_key_items(text.splitlines(), path)
        if not keys:
            # Failing closed: an empty mounted Secret must not turn authentication off.
            raise InputError(f"--api-keys-file '{path}' holds no keys")
    from_env = parse_key_items(env_items, "AERIE_API_KEYS")
    merged = parse_key_items([f"{n}:{k}" for n, k in (*keys.items(), *from_env.items())], "API keys")
    return merged


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (scheme case-insensitive)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class ApiKeys:
    """The configured keys; `authenticate` maps a presented token to its caller."""

    def __init__(self, keys: Mapping[str, str]):
        self._keys = [(Principal(name, key_id(name)), _digest(key)) for name, key in keys.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, token: str | None) -> Principal:
        if not self._keys:
            return ANONYMOUS
        if token is None:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        presented = _digest(token)
        found = ANONYMOUS
        # Every key is compared, so the time taken does not say which one (if any) matched.
        for principal, digest in self._keys:
            if hmac.compare_digest(presented, digest):
                found = principal
        if found is ANONYMOUS:
            raise Unauthenticated("invalid API key")
        return found
