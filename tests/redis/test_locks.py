"""The lock heartbeat and the lease: keep a lock past its TTL, stop the work when the lock is lost or
cannot be renewed, and check the fencing token before every destructive step."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis

from replq.errors import LockLost
from replq.locks import Heartbeat, Lease
from replq.store import Store
from tests.support.redisproc import RedisProcess


def test_heartbeat_keeps_the_lock_and_releases_it(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    lock = client.lock("t:lock", timeout=0.6, thread_local=False)
    assert lock.acquire(blocking=False)
    with Heartbeat([lock], 0.6):
        time.sleep(1.5)  # well past the TTL: still held, by us
        assert lock.owned()
        assert not client.lock("t:lock", timeout=5).acquire(blocking=False)
    assert client.get("t:lock") is None  # released on exit


def test_lost_lock_calls_on_lost_once(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    lock = client.lock("t:lost", timeout=0.6, thread_local=False)
    assert lock.acquire(blocking=False)
    cancelled = threading.Event()
    calls: list[int] = []

    def on_lost() -> None:
        calls.append(1)
        cancelled.set()

    beat = Heartbeat([lock], 0.6, on_lost=on_lost).start()
    try:
        client.set("t:lost", "someone-else")  # expired while Redis was away, and taken over
        assert cancelled.wait(5)
        assert beat.lost.is_set()
        time.sleep(0.5)
        assert calls == [1]
    finally:
        beat.stop()
    assert client.get("t:lost") == b"someone-else"  # never releases another owner's lock


# ---- Lease: fencing tokens and the check before a destructive step (SPEC §10) -----------------

def _store(redis_url: str) -> Store:
    return Store.from_url(redis_url)


def test_lease_takes_all_locks_or_none_with_increasing_fencing_tokens(redis_url: str) -> None:
    store = _store(redis_url)
    other = store.lock("guest", 100, 30)
    assert other.acquire(blocking=False)
    lease = Lease(store, [("migrate", 100), ("guest", 100)], 30, name="guest 100")
    assert not lease.acquire() and lease.blocked_by == ("guest", 100)
    assert store.redis.get(store.k("lock", "migrate", 100)) is None  # the one taken was given back
    other.release()
    first = Lease(store, [("guest", 101)], 30)
    assert first.acquire()
    second = Lease(store, [("guest", 102)], 30)
    assert second.acquire()
    (t1,), (t2,) = first.tokens, second.tokens
    assert int(t2.split(":")[0]) > int(t1.split(":")[0])
    assert store.redis.get(store.k("lock", "guest", 101)) == t1  # the lock's value is the token


def test_check_confirms_and_extends_the_lock_right_before_the_step(redis_url: str) -> None:
    store = _store(redis_url)
    lease = Lease(store, [("guest", 100)], 30)
    assert lease.acquire()
    store.redis.pexpire(store.k("lock", "guest", 100), 2000)
    with lease:
        lease.check("rolling back")
        assert store.redis.pttl(store.k("lock", "guest", 100)) > 25_000  # a full TTL for the step


def test_check_refuses_the_step_once_the_lock_is_someone_elses(redis_url: str) -> None:
    store = _store(redis_url)
    lost: list[int] = []
    lease = Lease(store, [("guest", 100)], 30, on_lost=lambda: lost.append(1), name="guest 100")
    assert lease.acquire()
    with lease:
        # It expired while this holder was cut off, and another took it (or a failover lost it).
        store.redis.set(store.k("lock", "guest", 100), "9:someone-else")
        with pytest.raises(LockLost, match="guest 100 lost .*; not destroying rpool/data/x"):
            lease.check("destroying rpool/data/x")
        with pytest.raises(LockLost):
            lease.check("anything else")
    assert lost == [1] and lease.lost.is_set()
    assert store.redis.get(store.k("lock", "guest", 100)) == "9:someone-else"  # never released another's


def test_check_refuses_when_the_lock_vanished(redis_url: str) -> None:
    """A Redis failover that lost the key: the holder must not continue."""
    store = _store(redis_url)
    lease = Lease(store, [("guest", 100)], 30)
    assert lease.acquire()
    with lease:
        store.redis.delete(store.k("lock", "guest", 100))
        with pytest.raises(LockLost):
            lease.check("receiving")


def test_check_refuses_when_redis_cannot_be_asked(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path / "redis", aof=False)
    server.start()
    try:
        store = Store(redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=1,
                                           socket_connect_timeout=1))
        lease = Lease(store, [("guest", 100)], 30)
        assert lease.acquire()
        with lease:
            server.kill()
            with pytest.raises(LockLost, match="could not be confirmed"):
                lease.check("rolling back")
    finally:
        server.stop()
