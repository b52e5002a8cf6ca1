"""Keeping Redis locks alive while work runs (job lock, guest lock, migrate lock).

A lock is taken with a short TTL so that a dead process's lock expires by itself, and a
heartbeat thread extends it while the work goes on. If an extension finds the lock gone
(it expired while Redis was away, and another process may hold it now), the work must stop:
`on_lost` is called once, so that two runs of one job or guest never overlap.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from types import TracebackType

import redis
import redis.lock

log = logging.getLogger(__name__)


class Heartbeat:
    """Extend `locks` every ttl/3 until stopped; release them on exit."""

    def __init__(self, locks: Sequence[redis.lock.Lock], ttl: float, on_lost: Callable[[], None] | None = None,
                 name: str = "lock-heartbeat") -> None:
        self.locks = list(locks)
        self.ttl = ttl
        self.on_lost = on_lost
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=name, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            for lock in self.locks:
                try:
                    lock.extend(self.ttl, replace_ttl=True)
                except redis.exceptions.LockNotOwnedError:
                    log.error("lock %s lost: stopping the work it guards", lock.name)
                    self.lost.set()
                    if self.on_lost is not None:
                        self.on_lost()
                    return
                except redis.exceptions.RedisError:
                    continue  # Redis away for a moment: the TTL still covers the next attempt

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if release:
            for lock in reversed(self.locks):
                with contextlib.suppress(redis.exceptions.RedisError):
                    lock.release()

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
