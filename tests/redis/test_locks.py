"""The lock heartbeat: keeps a lock past its TTL, and stops the work when the lock is lost."""

from __future__ import annotations

import threading
import time

import redis

from replq.locks import Heartbeat


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
