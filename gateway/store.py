"""Session records: in Redis (shared by any number of gateways) or in process (one gateway).

A record holds the prompt ids, the generated ids, the sampling parameters and seed, the nodes
serving it, its status and a TTL refreshed on every write. Every change is one atomic step:
Lua scripts on Redis, one lock in process. Appends carry the length the writer expects, so a
stale writer can never interleave tokens, and only the gateway owning a session (holding its
lease) may append. Both stores pass the same tests (tests/test_store.py).

Statuses: running -> done | cancelled | failed | interrupted; interrupted, failed (and
running with an expired lease) -> running again through `claim` (Resume).

The stores also keep the per-caller request counts of the rate limit (`rate_limit`): a
sliding window of request times per caller, checked and counted in one atomic step.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Protocol

from aerie_rpc.status import Conflict, NotFound

RUNNING, DONE, CANCELLED, FAILED, INTERRUPTED = "running", "done", "cancelled", "failed", "interrupted"
STATUSES = (RUNNING, DONE, CANCELLED, FAILED, INTERRUPTED)
CLAIMABLE = (INTERRUPTED, FAILED)


class StatusConflict(Conflict):
    """The session is not in a status that allows the change (or another gateway owns it)."""

    def __init__(self, session_id: str, status: str, wanted: str):
        super().__init__(f"session '{session_id}' is {status}: cannot {wanted}")
        self.status = status


class StaleWrite(Conflict):
    def __init__(self, session_id: str, expected: int, actual: int):
        super().__init__(f"session '{session_id}' holds {actual} generated tokens, the writer expected {expected}")


def not_found(session_id: str) -> NotFound:
    return NotFound(f"unknown session '{session_id}' (never created, or expired after its TTL)")


@dataclass
class SessionRecord:
    session_id: str
    prompt_ids: list[int]
    params: dict  # temperature, top_p, top_k, seed
    max_new_tokens: int
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    generated_ids: list[int] = field(default_factory=list)
    status: str = RUNNING
    owner: str = ""
    lease_until: float = 0.0
    drafter: str = ""
    verifier: str = ""
    resumes: int = 0
    rounds: int = 0
    accepted: int = 0  # draft tokens accepted over all rounds (tau = (accepted + rounds) / rounds)
    finish_reason: str = ""
    error: str = ""
    model: str = ""
    trace_id: str = ""
    key_id: str = ""  # the caller that created it: a hash of its API key's name ('' without auth)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    @property
    def tau(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 1.0

    def to_fields(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("prompt_ids", "generated_ids", "stop_token_ids"):
                out[f.name] = ",".join(str(int(i)) for i in v)
            elif f.name == "params":
                out[f.name] = json.dumps(v, sort_keys=True)
            elif isinstance(v, bool):
                out[f.name] = "1" if v else "0"
            else:
                out[f.name] = str(v)
        out["generated_len"] = str(len(self.generated_ids))
        return out

    @classmethod
    def from_fields(cls, raw: dict) -> SessionRecord:
        raw = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
               for k, v in raw.items()}
        kw: dict = {}
        for f in fields(cls):
            if f.name not in raw:
                continue
            v = raw[f.name]
            if f.name in ("prompt_ids", "generated_ids", "stop_token_ids"):
                kw[f.name] = [int(x) for x in v.split(",")] if v else []
            elif f.name == "params":
                kw[f.name] = json.loads(v)
            elif f.name == "ignore_eos":
                kw[f.name] = v == "1"
            elif f.name in ("max_new_tokens", "resumes", "rounds", "accepted"):
                kw[f.name] = int(v)
            elif f.name in ("lease_until", "created", "updated"):
                kw[f.name] = float(v)
            else:
                kw[f.name] = v
        return cls(**kw)


class SessionStore(Protocol):
    ttl_s: float

    def create(self, record: SessionRecord) -> None: ...
    def get(self, session_id: str) -> SessionRecord: ...
    def append(self, session_id: str, owner: str, expected_len: int, tokens: list[int], *, rounds: int = 0,
               accepted: int = 0, lease_until: float = 0.0, updates: dict[str, str] | None = None) -> int: ...
    def update(self, session_id: str, updates: dict[str, str], *, allowed: tuple[str, ...] = (),
               owner: str = "") -> str: ...
    def claim(self, session_id: str, owner: str, lease_until: float) -> SessionRecord: ...
    def ttl(self, session_id: str) -> float: ...
    def delete(self, session_id: str) -> None: ...
    def ping(self) -> None: ...
    def rate_limit(self, caller: str, limit: int, window_s: float) -> float: ...


def _apply(record: SessionRecord, updates: dict[str, str]) -> SessionRecord:
    merged = record.to_fields()
    merged.update(updates)
    return SessionRecord.from_fields(merged)


class MemoryStore:
    """The in-process store: one gateway, same interface and semantics as RedisStore."""

    def __init__(self, ttl_s: float = 86400.0):
        self.ttl_s = ttl_s
        self._records: dict[str, tuple[SessionRecord, float]] = {}
        self._hits: dict[str, deque[float]] = {}
        self._next_sweep = 0.0
        self._lock = threading.Lock()

    def held(self) -> int:
        """Records held, expired ones not yet swept included. (Not __len__: an empty store
        must stay truthy for `store or make_store(...)`.)"""
        with self._lock:
            return len(self._records)

    def _live(self, session_id: str) -> SessionRecord:
        item = self._records.get(session_id)
        if item is None or item[1] <= time.time():
            self._records.pop(session_id, None)
            raise not_found(session_id)
        return item[0]

    def _put(self, record: SessionRecord) -> None:
        now = time.time()
        record.updated = now
        self._records[record.session_id] = (record, now + self.ttl_s)
        if now >= self._next_sweep:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        # A finished session is rarely read again, so expiry on read alone would keep every
        # record for good: drop the expired ones on a write, at most once a minute (or TTL).
        for sid in [sid for sid, (_, expires) in self._records.items() if expires <= now]:
            del self._records[sid]
        self._next_sweep = now + min(60.0, self.ttl_s)

    def create(self, record: SessionRecord) -> None:
        with self._lock:
            try:
                self._live(record.session_id)
            except NotFound:
                self._put(_apply(record, {}))
                return
            raise Conflict(f"session '{record.session_id}' already exists: choose another id")

    def get(self, session_id: str) -> SessionRecord:
        with self._lock:
            return _apply(self._live(session_id), {})

    def append(self, session_id, owner, expected_len, tokens, *, rounds=0, accepted=0, lease_until=0.0,
               updates=None) -> int:
        with self._lock:
            rec = self._live(session_id)
            if rec.status != RUNNING:
                raise StatusConflict(session_id, rec.status, "append tokens")
            if rec.owner != owner:
                raise StatusConflict(session_id, f"owned by gateway {rec.owner}", "append tokens")
            if len(rec.generated_ids) != expected_len:
                raise StaleWrite(session_id, expected_len, len(rec.generated_ids))
            rec = _apply(rec, dict(updates or {}))
            rec.generated_ids = rec.generated_ids + [int(t) for t in tokens]
            rec.rounds += rounds
            rec.accepted += accepted
            rec.lease_until = lease_until or rec.lease_until
            self._put(rec)
            return len(rec.generated_ids)

    def update(self, session_id, updates, *, allowed=(), owner="") -> str:
        with self._lock:
            rec = self._live(session_id)
            if allowed and rec.status not in allowed:
                raise StatusConflict(session_id, rec.status, f"change it (needs {' or '.join(allowed)})")
            if owner and rec.owner != owner:
                raise StatusConflict(session_id, f"owned by gateway {rec.owner}", "change it")
            self._put(_apply(rec, updates))
            return rec.status

    def claim(self, session_id, owner, lease_until) -> SessionRecord:
        with self._lock:
            rec = self._live(session_id)
            if not (rec.status in CLAIMABLE or (rec.status == RUNNING and rec.lease_until < time.time())):
                raise StatusConflict(session_id, rec.status if rec.status != RUNNING else
                                     f"running on gateway {rec.owner}", "resume it")
            rec = _apply(rec, {"status": RUNNING, "owner": owner, "lease_until": str(lease_until), "error": ""})
            self._put(rec)
            return _apply(rec, {})

    def ttl(self, session_id) -> float:
        with self._lock:
            self._live(session_id)
            return self._records[session_id][1] - time.time()

    def delete(self, session_id) -> None:
        with self._lock:
            self._records.pop(session_id, None)

    def ping(self) -> None:
        return None

    def rate_limit(self, caller: str, limit: int, window_s: float) -> float:
        """Count one request of `caller` unless it made `limit` in the last `window_s`
        seconds; returns 0.0 when counted, else the seconds until it may try again."""
        now = time.monotonic()
        with self._lock:
            hits = self._hits.setdefault(caller, deque())
            while hits and hits[0] <= now - window_s:
                hits.popleft()
            if len(hits) >= limit:
                return max(1e-3, hits[0] + window_s - now)
            hits.append(now)
            return 0.0


# --- Redis -------------------------------------------------------------------------------

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# ARGV: ttl, owner, expected_len, tokens csv, count, rounds, accepted, lease_until, now, [field, value]...
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' then return {-3, status} end
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner ~= ARGV[2] then return {-4, owner} end
local n = tonumber(redis.call('HGET', KEYS[1], 'generated_len'))
if n ~= tonumber(ARGV[3]) then return {-2, tostring(n)} end
local count = tonumber(ARGV[5])
if count > 0 then
  local cur = redis.call('HGET', KEYS[1], 'generated_ids')
  if cur == '' then cur = ARGV[4] else cur = cur .. ',' .. ARGV[4] end
  redis.call('HSET', KEYS[1], 'generated_ids', cur, 'generated_len', n + count)
end
redis.call('HINCRBY', KEYS[1], 'rounds', ARGV[6])
redis.call('HINCRBY', KEYS[1], 'accepted', ARGV[7])
if ARGV[8] ~= '0' then redis.call('HSET', KEYS[1], 'lease_until', ARGV[8]) end
redis.call('HSET', KEYS[1], 'updated', ARGV[9])
if #ARGV > 9 then redis.call('HSET', KEYS[1], unpack(ARGV, 10)) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return {n + count, ''}
"""

# ARGV: ttl, allowed statuses csv ('' = any), owner ('' = any), now, [field, value]...
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
local status = redis.call('HGET', KEYS[1], 'status')
if ARGV[2] ~= '' then
  local ok = false
  for s in string.gmatch(ARGV[2], '[^,]+') do if s == status then ok = true end end
  if not ok then return {-3, status} end
end
if ARGV[3] ~= '' then
  local owner = redis.call('HGET', KEYS[1], 'owner')
  if owner ~= ARGV[3] then return {-4, owner} end
end
redis.call('HSET', KEYS[1], 'updated', ARGV[4])
if #ARGV > 4 then redis.call('HSET', KEYS[1], unpack(ARGV, 5)) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return {1, status}
"""

# ARGV: ttl, owner, lease_until, now
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
local status = redis.call('HGET', KEYS[1], 'status')
local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0') or 0
local ok = status == 'interrupted' or status == 'failed' or (status == 'running' and lease < tonumber(ARGV[4]))
if not ok then
  if status == 'running' then return {-3, 'running on gateway ' .. (redis.call('HGET', KEYS[1], 'owner') or '?')} end
  return {-3, status}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'owner', ARGV[2], 'lease_until', ARGV[3], 'error', '', 'updated', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return {1, status}
"""


# A sliding window in a sorted set scored by Redis's own clock (one clock for every gateway).
# ARGV: limit, window (microseconds), unique member. Returns 0 when counted, else the
# microseconds until the oldest counted request leaves the window.
_RATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
return 0
"""


class RedisStore:
    """Sessions as Redis hashes `<prefix>session:<id>`, changed only by Lua scripts; rate-limit
    windows as sorted sets `<prefix>rate:<caller>`."""

    def __init__(self, url: str, prefix: str = "aerie:", ttl_s: float = 86400.0, client=None):
        import redis

        self.client = client or redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._create = self.client.register_script(_CREATE)
        self._append = self.client.register_script(_APPEND)
        self._update = self.client.register_script(_UPDATE)
        self._claim = self.client.register_script(_CLAIM)
        self._rate = self.client.register_script(_RATE)

    def key(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def _ttl(self) -> int:
        return max(1, int(round(self.ttl_s)))

    def ping(self) -> None:
        self.client.ping()

    def create(self, record: SessionRecord) -> None:
        now = time.time()
        record = _apply(record, {"updated": str(now)})
        flat = [x for kv in record.to_fields().items() for x in kv]
        if not self._create(keys=[self.key(record.session_id)], args=[self._ttl(), *flat]):
            raise Conflict(f"session '{record.session_id}' already exists: choose another id")

    def get(self, session_id: str) -> SessionRecord:
        raw = self.client.hgetall(self.key(session_id))
        if not raw:
            raise not_found(session_id)
        return SessionRecord.from_fields(raw)

    def append(self, session_id, owner, expected_len, tokens, *, rounds=0, accepted=0, lease_until=0.0,
               updates=None) -> int:
        flat = [x for kv in (updates or {}).items() for x in kv]
        code, info = self._append(keys=[self.key(session_id)], args=[
            self._ttl(), owner, expected_len, ",".join(str(int(t)) for t in tokens), len(tokens), rounds, accepted,
            repr(float(lease_until)) if lease_until else "0", repr(time.time()), *flat,
        ])
        return self._check(session_id, code, info, "append tokens", expected_len)

    def update(self, session_id, updates, *, allowed=(), owner="") -> str:
        flat = [x for kv in updates.items() for x in kv]
        code, info = self._update(keys=[self.key(session_id)],
                                  args=[self._ttl(), ",".join(allowed), owner, repr(time.time()), *flat])
        self._check(session_id, code, info, f"change it (needs {' or '.join(allowed) or 'any status'})", 0)
        return info.decode() if isinstance(info, bytes) else info

    def claim(self, session_id, owner, lease_until) -> SessionRecord:
        code, info = self._claim(keys=[self.key(session_id)],
                                 args=[self._ttl(), owner, repr(float(lease_until)), repr(time.time())])
        self._check(session_id, code, info, "resume it", 0)
        return self.get(session_id)

    def _check(self, session_id: str, code: int, info, wanted: str, expected: int) -> int:
        info = info.decode() if isinstance(info, bytes) else info
        if code == -1:
            raise not_found(session_id)
        if code == -2:
            raise StaleWrite(session_id, expected, int(info))
        if code == -3:
            raise StatusConflict(session_id, info, wanted)
        if code == -4:
            raise StatusConflict(session_id, f"owned by gateway {info}", wanted)
        return int(code)

    def ttl(self, session_id) -> float:
        ms = self.client.pttl(self.key(session_id))
        if ms == -2:
            raise not_found(session_id)
        return ms / 1000.0 if ms >= 0 else float("inf")

    def delete(self, session_id) -> None:
        self.client.delete(self.key(session_id))

    def rate_limit(self, caller: str, limit: int, window_s: float) -> float:
        wait_us = self._rate(keys=[f"{self.prefix}rate:{caller}"],
                             args=[limit, int(window_s * 1e6), uuid.uuid4().hex])
        return int(wait_us) / 1e6
