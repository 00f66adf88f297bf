"""The session stores: the in-process `MemoryStore` and the `RedisStore` (the real Redis on
127.0.0.1:6379) pass one parametrized suite. Each Redis test uses its own key prefix and
deletes its keys afterwards.

"Two writers" are two threads on one store in process (one gateway), and two `RedisStore`
objects with their own connections (two gateways) on Redis. The same holds for the rate
limit's counters, which the stores keep too."""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import pytest

from aerie_rpc.status import NotFound
from gateway.store import (
    CANCELLED,
    DONE,
    FAILED,
    INTERRUPTED,
    RUNNING,
    MemoryStore,
    RedisStore,
    SessionRecord,
    StaleWrite,
    StatusConflict,
)

REDIS_URL = "redis://127.0.0.1:6379/0"


class Stores:
    """Makes stores of one kind that share their records (a second writer, a shorter TTL)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.prefix = f"aerie-test-{uuid.uuid4().hex[:10]}:"
        self._memory: MemoryStore | None = None
        self._redis: list[RedisStore] = []

    def make(self, ttl_s: float = 600.0):
        if self.kind == "memory":
            if self._memory is None:
                self._memory = MemoryStore(ttl_s=ttl_s)
            self._memory.ttl_s = ttl_s
            return self._memory
        store = RedisStore(REDIS_URL, prefix=self.prefix, ttl_s=ttl_s)
        self._redis.append(store)
        return store

    def cleanup(self) -> None:
        for store in self._redis:
            keys = list(store.client.scan_iter(match=self.prefix + "*"))
            if keys:
                store.client.delete(*keys)
            store.client.close()


@pytest.fixture(params=["memory", "redis"])
def stores(request):
    s = Stores(request.param)
    if request.param == "redis":
        s.make().ping()  # a clear failure when Redis is not running
    yield s
    s.cleanup()


@pytest.fixture
def store(stores):
    return stores.make()


def record(sid: str | None = None, **kw) -> SessionRecord:
    base = dict(
        session_id=sid or uuid.uuid4().hex, prompt_ids=[5, 6, 7],
        params={"temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 11}, max_new_tokens=64,
        stop_token_ids=[3, 4], ignore_eos=True, owner="gw-a", lease_until=time.time() + 60, model="tiny",
        key_id="0123abcd",
    )
    base.update(kw)
    return SessionRecord(**base)


def test_create_get_round_trip(store):
    rec = record()
    store.create(rec)
    got = store.get(rec.session_id)
    for name in ("session_id", "prompt_ids", "params", "max_new_tokens", "stop_token_ids", "ignore_eos",
                 "status", "owner", "model", "generated_ids", "rounds", "accepted", "resumes", "key_id"):
        assert getattr(got, name) == getattr(rec, name), name
    assert got.generated_ids == [] and got.status == RUNNING and got.tau == 1.0
    assert got.lease_until == pytest.approx(rec.lease_until)
    assert abs(got.updated - time.time()) < 5


def test_create_twice_conflicts(store):
    rec = record()
    store.create(rec)
    with pytest.raises(Exception) as err:
        store.create(record(rec.session_id, prompt_ids=[9]))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert store.get(rec.session_id).prompt_ids == [5, 6, 7]  # the first record is untouched


def test_unknown_session_is_not_found(store):
    sid = "no-such-" + uuid.uuid4().hex
    calls = [
        lambda: store.get(sid),
        lambda: store.append(sid, "gw-a", 0, [1]),
        lambda: store.update(sid, {"status": DONE}),
        lambda: store.claim(sid, "gw-b", time.time() + 60),
        lambda: store.ttl(sid),
    ]
    for call in calls:
        with pytest.raises(NotFound) as err:
            call()
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert sid in str(err.value)


def test_append_checks_length_owner_and_status(store):
    rec = record()
    store.create(rec)
    sid = rec.session_id
    assert store.append(sid, "gw-a", 0, [10], rounds=0, accepted=0) == 1
    assert store.append(sid, "gw-a", 1, [11, 12, 13], rounds=1, accepted=2) == 4
    assert store.append(sid, "gw-a", 4, [], rounds=0) == 4  # an empty round changes nothing
    with pytest.raises(StaleWrite):
        store.append(sid, "gw-a", 1, [99])  # a writer that missed a round
    with pytest.raises(StatusConflict):
        store.append(sid, "gw-b", 4, [99])  # not the owner
    got = store.get(sid)
    assert got.generated_ids == [10, 11, 12, 13]
    assert (got.rounds, got.accepted, got.tau) == (1, 2, 3.0)
    # The last round and the status change land in one step.
    assert store.append(sid, "gw-a", 4, [14], rounds=1, accepted=0,
                        updates={"status": DONE, "finish_reason": "length"}) == 5
    with pytest.raises(StatusConflict) as err:
        store.append(sid, "gw-a", 5, [15])
    assert err.value.status == DONE
    got = store.get(sid)
    assert (got.generated_ids, got.status, got.finish_reason, got.rounds) == ([10, 11, 12, 13, 14], DONE, "length", 2)


def test_append_sets_the_lease(store):
    rec = record(lease_until=100.0)
    store.create(rec)
    store.append(rec.session_id, "gw-a", 0, [1], lease_until=12345.5)
    assert store.get(rec.session_id).lease_until == 12345.5
    store.append(rec.session_id, "gw-a", 1, [2])  # no lease given: unchanged
    assert store.get(rec.session_id).lease_until == 12345.5


def test_update_checks_status_and_owner(store):
    rec = record()
    store.create(rec)
    sid = rec.session_id
    assert store.update(sid, {"verifier": "v1:1"}) == RUNNING  # returns the status it found
    with pytest.raises(StatusConflict):
        store.update(sid, {"status": CANCELLED}, allowed=(INTERRUPTED,))
    with pytest.raises(StatusConflict):
        store.update(sid, {"status": CANCELLED}, owner="gw-b")
    assert store.get(sid).status == RUNNING
    assert store.update(sid, {"status": CANCELLED, "finish_reason": "cancelled"}, allowed=(RUNNING,),
                        owner="gw-a") == RUNNING
    got = store.get(sid)
    assert (got.status, got.finish_reason, got.verifier) == (CANCELLED, "cancelled", "v1:1")


@pytest.mark.parametrize("status,lease_in,ok", [
    (INTERRUPTED, 60, True), (FAILED, 60, True), (RUNNING, -5, True), (RUNNING, 60, False), (DONE, -5, False),
    (CANCELLED, -5, False),
])
def test_claim(store, status, lease_in, ok):
    rec = record(status=status, lease_until=time.time() + lease_in, error="boom")
    store.create(rec)
    if not ok:
        with pytest.raises(StatusConflict):
            store.claim(rec.session_id, "gw-b", time.time() + 60)
        got = store.get(rec.session_id)
        assert (got.status, got.owner) == (status, "gw-a")
        return
    lease = time.time() + 60
    got = store.claim(rec.session_id, "gw-b", lease)
    assert (got.status, got.owner, got.error) == (RUNNING, "gw-b", "")
    assert got.lease_until == pytest.approx(lease)
    assert store.get(rec.session_id).owner == "gw-b"
    with pytest.raises(StatusConflict):
        store.append(rec.session_id, "gw-a", 0, [1])  # the old owner may no longer write
    assert store.append(rec.session_id, "gw-b", 0, [1]) == 1


def test_ttl_is_set_refreshed_and_expires(stores):
    store = stores.make(ttl_s=3.0)
    rec = record()
    store.create(rec)
    first = store.ttl(rec.session_id)
    assert 1.5 < first <= 3.0
    time.sleep(1.2)
    assert store.ttl(rec.session_id) < first - 1.0
    store.append(rec.session_id, "gw-a", 0, [1])  # every write refreshes the TTL
    assert store.ttl(rec.session_id) > first - 0.5
    short = stores.make(ttl_s=1.0)
    gone = record()
    short.create(gone)
    time.sleep(1.4)
    with pytest.raises(NotFound):
        short.get(gone.session_id)


def test_two_writers_never_interleave(stores):
    """Two gateways append blocks of their own tokens, each retrying on a stale length: every
    accepted block is whole, none is lost, the counters add up."""
    writers = [stores.make(), stores.make()]
    rec = record(owner="gw")
    writers[0].create(rec)
    blocks_each, block = 25, 3
    stale = [0, 0]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def write(w: int) -> None:
        try:
            start.wait()
            done = 0
            while done < blocks_each:
                n = len(writers[w].get(rec.session_id).generated_ids)
                try:
                    writers[w].append(rec.session_id, "gw", n, [w + 1] * block, rounds=1, accepted=w)
                    done += 1
                except StaleWrite:
                    stale[w] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    got = writers[1].get(rec.session_id)
    ids = got.generated_ids
    assert len(ids) == 2 * blocks_each * block
    assert all(ids[i : i + block] == [ids[i]] * block for i in range(0, len(ids), block))
    assert ids.count(1) == ids.count(2) == blocks_each * block
    assert got.rounds == 2 * blocks_each
    assert got.accepted == blocks_each  # writer 0 adds 0, writer 1 adds 1 per block


def test_two_writers_one_claim_wins(stores):
    """Two gateways resume the same interrupted session at once: exactly one gets it."""
    writers = [stores.make(), stores.make()]
    for _ in range(10):
        rec = record(status=INTERRUPTED)
        writers[0].create(rec)
        won: list[str] = []
        start = threading.Barrier(2)

        def claim(w: int, sid=rec.session_id, won=won, start=start) -> None:
            start.wait()
            try:
                writers[w].claim(sid, f"gw-{w}", time.time() + 60)
                won.append(f"gw-{w}")
            except StatusConflict:
                pass

        threads = [threading.Thread(target=claim, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(won) == 1
        assert writers[1].get(rec.session_id).owner == won[0]


def test_redis_record_layout():
    """The Redis record is one hash under the prefix, with a TTL on the key."""
    stores = Stores("redis")
    try:
        _check_redis_layout(stores)
    finally:
        stores.cleanup()


def _check_redis_layout(stores: Stores) -> None:
    store = stores.make(ttl_s=120)
    rec = record()
    store.create(rec)
    store.append(rec.session_id, "gw-a", 0, [7, 8])
    key = f"{stores.prefix}session:{rec.session_id}"
    assert store.key(rec.session_id) == key
    raw = {k.decode(): v.decode() for k, v in store.client.hgetall(key).items()}
    assert raw["generated_ids"] == "7,8" and raw["generated_len"] == "2" and raw["status"] == RUNNING
    assert 0 < store.client.ttl(key) <= 120
    store.delete(rec.session_id)
    assert not store.client.exists(key)


# --- the rate limit's counters ---------------------------------------------------------------


def test_rate_limit_counts_within_a_sliding_window(store):
    caller, window = f"caller-{uuid.uuid4().hex[:8]}", 1.0
    t0 = time.monotonic()
    assert [store.rate_limit(caller, 3, window) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = store.rate_limit(caller, 3, window)  # the fourth within the window is refused...
    assert 0.0 < wait <= window
    assert store.rate_limit(f"{caller}-other", 3, window) == 0.0  # ...for this caller only
    # A refused request is not counted: the oldest one leaves the window when promised.
    time.sleep(max(0.0, t0 + window - time.monotonic()) + 0.1)
    assert store.rate_limit(caller, 3, window) == 0.0


def test_rate_limit_is_atomic_across_writers(stores):
    """Many threads on several stores (several gateways on Redis) against one caller's limit:
    exactly `limit` requests get through."""
    writers = [stores.make() for _ in range(3)]
    caller, limit, tries = f"busy-{uuid.uuid4().hex[:8]}", 7, 40
    allowed: list[int] = []
    start = threading.Barrier(tries)

    def hit(i: int) -> None:
        start.wait()
        if writers[i % len(writers)].rate_limit(caller, limit, 30.0) == 0.0:
            allowed.append(i)

    threads = [threading.Thread(target=hit, args=(i,)) for i in range(tries)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(allowed) == limit


def test_redis_rate_limit_layout():
    """One sorted set per caller under the prefix, expiring with its window."""
    stores = Stores("redis")
    try:
        store = stores.make()
        store.rate_limit("k1", 5, 20.0)
        store.rate_limit("k1", 5, 20.0)
        key = f"{stores.prefix}rate:k1"
        assert store.client.zcard(key) == 2
        assert 0 < store.client.pttl(key) <= 20_000
    finally:
        stores.cleanup()


def test_memory_store_drops_expired_records_nobody_reads():
    """Finished sessions are seldom read again: expiring them only on a read would let a
    long-running gateway's store grow without bound."""
    store = MemoryStore(ttl_s=0.2)
    for i in range(50):
        store.create(SessionRecord(session_id=f"old-{i}", prompt_ids=[1], params={}, max_new_tokens=4))
    assert store.held() == 50
    time.sleep(0.3)
    store.create(SessionRecord(session_id="new", prompt_ids=[1], params={}, max_new_tokens=4))
    assert store.held() == 1 and store.get("new").session_id == "new"
