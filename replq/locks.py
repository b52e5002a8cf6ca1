"""Locks that guard work: a heartbeat that stops the work in time, and a fencing check (SPEC §10).

A lock is a Redis key with a short TTL, so a dead process's lock expires by itself. While the
work goes on, a heartbeat extends it every third of the TTL. Two things can go wrong, and in
both the work must stop before anyone else can take the lock:

- the lock is gone or belongs to someone else (it expired while Redis was away, a Redis failover
  lost it): the next extension says so;
- the lock cannot be extended at all (Redis unreachable, the network cut): after 0.8 x TTL
  without a successful extension the work counts the lock as lost, because at TTL it expires
  for the others. A watchdog thread decides this, so an extension stuck on a dead connection
  cannot delay it.

Either way `on_lost` is called once (the engine sets its cancel event: the transfer is killed).

`Lease` is what the engine holds (guest lock, migrate lock): its locks are taken with a fencing
token (`<counter>:<random>`: the counter orders holders, the random part keeps two holders
distinct even if a failover loses counter increments), and `check(step)` is called immediately
before every destructive step (a receive that may roll back, a rollback, a destroy, a prune, a
removal, a migration's delta and its source destroy). It confirms atomically in Redis that every
lock still holds this holder's token, extends them for a full TTL, and refuses if the heartbeat
has gone stale meanwhile; otherwise it raises LockLost and the step is not taken. A holder whose
lock vanished (expired, taken over, lost in a failover) therefore never continues.

    lease = Lease(store, [("guest", 100)], ttl, on_lost=cancel.set, name="guest 100")
    if not lease.acquire():
        ...                       # held by someone else
    with lease:                   # heartbeat running; released on exit
        lease.check("rolling back rpool/data/subvol-100-disk-0 on node2")
        ...
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import redis
import redis.lock

from replq.errors import LockLost

log = logging.getLogger(__name__)

STALE_SHARE = 0.8  # of the TTL without a successful extension: the lock counts as lost


class Heartbeat:
    """Extend `locks` every ttl/3 until stopped; release them on exit. A lock found gone, or not
    extended for 0.8 x ttl, is lost: `on_lost` is called once and `lost` is set."""

    def __init__(self, locks: Sequence[redis.lock.Lock], ttl: float, on_lost: Callable[[], None] | None = None,
                 name: str = "lock-heartbeat") -> None:
        self.locks = list(locks)
        self.ttl = ttl
        self.on_lost = on_lost
        self.name = name
        self.lost = threading.Event()
        self.reason = ""
        self.last_ok = time.monotonic()
        self._once = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=name, daemon=True)
        self._watch = threading.Thread(target=self._watchdog, name=f"{name}-watchdog", daemon=True)

    def renewed(self) -> None:
        """Every lock was confirmed and extended just now (by the heartbeat or a fencing check)."""
        self.last_ok = time.monotonic()

    def stale(self) -> float | None:
        """Seconds since the last renewal when that is 0.8 x TTL or more, else None."""
        idle = time.monotonic() - self.last_ok
        return idle if idle >= STALE_SHARE * self.ttl else None

    def lose(self, reason: str) -> None:
        with self._once:
            if self.lost.is_set():
                return
            self.reason = reason
            self.lost.set()
        log.error("%s: stopping the work it guards", reason)
        if self.on_lost is not None:
            self.on_lost()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                for lock in self.locks:
                    lock.extend(self.ttl, replace_ttl=True)
            except redis.exceptions.LockNotOwnedError:
                self.lose(f"lock of {self.name} lost (expired or taken over)")
                return
            except redis.exceptions.RedisError:
                continue  # the watchdog gives up at 0.8 x TTL without a renewal
            self.renewed()

    def _watchdog(self) -> None:
        while not self._stop.wait(min(1.0, self.ttl / 20)):
            idle = self.stale()
            if idle is not None:
                self.lose(f"lock of {self.name} not renewed for {idle:.1f} s (TTL {self.ttl:g} s; Redis "
                          "unreachable?)")
                return

    def start(self) -> Heartbeat:
        self.renewed()
        self._thread.start()
        self._watch.start()
        return self

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        for t in (self._thread, self._watch):
            if t.is_alive():
                t.join(timeout=5)
        if release:
            for lock in reversed(self.locks):
                with contextlib.suppress(redis.exceptions.RedisError):
                    lock.release()

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class Lease:
    """Locks held for one piece of work: all-or-nothing acquisition with fencing tokens, a
    heartbeat, and `check(step)` before every destructive step (see the module docstring)."""

    def __init__(self, store: Any, names: Sequence[tuple[str, str | int]], ttl: float,
                 on_lost: Callable[[], None] | None = None, name: str = "lock") -> None:
        self.store = store
        self.ttl = ttl
        self.name = name
        self.names = list(names)
        self.locks = [store.lock(kind, ident, ttl) for kind, ident in self.names]
        self.tokens: list[str] = []
        self.blocked_by: tuple[str, str | int] | None = None  # the lock held by someone else
        self.heartbeat = Heartbeat(self.locks, ttl, on_lost=on_lost, name=name)

    @property
    def lost(self) -> threading.Event:
        return self.heartbeat.lost

    @property
    def reason(self) -> str:
        return self.heartbeat.reason

    def acquire(self) -> bool:
        """Take every lock (each with a new fencing token), or none; False if one is held."""
        taken: list[redis.lock.Lock] = []
        for lock, name in zip(self.locks, self.names, strict=True):
            token = self.store.fencing_token()
            if not lock.acquire(blocking=False, token=token):
                self.blocked_by = name
                for t in reversed(taken):
                    with contextlib.suppress(redis.exceptions.RedisError):
                        t.release()
                return False
            taken.append(lock)
            self.tokens.append(token)
        return True

    def check(self, step: str) -> None:
        """Confirm in Redis, atomically, that every lock still holds our token (and extend them),
        right before `step`; raise LockLost (the step must not be taken) if not, if Redis cannot
        be asked, or if the heartbeat went stale meanwhile."""
        if self.lost.is_set():
            raise LockLost(f"{self.reason}; not {step}")
        try:
            held = self.store.confirm_locks([lock.name for lock in self.locks], self.tokens, self.ttl)
        except redis.exceptions.RedisError as exc:
            self.heartbeat.lose(f"lock of {self.name} could not be confirmed ({exc.__class__.__name__}: {exc})")
            raise LockLost(f"{self.reason}; not {step}") from None
        if not held:
            self.heartbeat.lose(f"lock of {self.name} lost (expired or taken over)")
        elif (idle := self.heartbeat.stale()) is not None:
            # The confirmation itself took that long: by now the lock may be someone else's.
            self.heartbeat.lose(f"lock of {self.name} not renewed for {idle:.1f} s (TTL {self.ttl:g} s)")
        else:
            self.heartbeat.renewed()
            return
        raise LockLost(f"{self.reason}; not {step}")

    def __enter__(self) -> Lease:
        self.heartbeat.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # A lost lock may be someone else's now: release only what still holds our token
        # (redis-py's release compares the token).
        self.heartbeat.stop(release=True)
