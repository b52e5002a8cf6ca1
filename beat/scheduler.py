"""The beat scheduler: due jobs from the store's schedule index to their nodes' queues (SPEC §3).

`ReplqScheduler` is a Celery beat Scheduler (run by `replq beat`). Instead of a static
schedule, every tick (1 s) it

- asks the schedule index for the jobs whose next_sync has come (O(log N + due)),
- reads, in one pipelined round trip, where each job's guest lives and whether the job is
  running (job or guest lock held) or already queued (its queued marker),
- claims the queued marker of the rest (SET NX, one round trip) and publishes one message per
  claimed job to `replq.node.<node>` (replq.dispatch).

A job stays in the index until its run records the new attempt (next_sync then moves on), so
the marker is what keeps it from being queued again meanwhile; missed events collapse into one
run because next_sync is the first event after the last attempt, however old.

High availability: any number of beats may run; the one holding the Redis lock `beat/active`
works, renewing it every tick; the others try to take it every few seconds, so a standby takes
over within beat_lock_ttl (30 s) of the active one dying. A beat that loses the lock stops at
once; even if two briefly overlap, the markers keep every job queued once.

Interrupted runs: a worker killed mid-run (early ack: its message is gone) leaves the job's
state saying "running" (worker set) with nobody holding its locks. The active beat sweeps for
such jobs every sweep_interval and records the attempt as failed, which puts the job into error
state: it is retried `retry_interval` after that attempt, like any failure.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis
from celery._state import _set_task_join_will_block
from celery.beat import Scheduler

from replq import dispatch, jobstate, notify
from replq.settings import tunable
from replq.store import Store

log = logging.getLogger("replq.beat")

PAGE = 2000  # due jobs per pipelined read and publish batch


@dataclass
class TickReport:
    due: int = 0
    enqueued: list[dispatch.Enqueued] = field(default_factory=list)
    skipped_running: int = 0
    skipped_queued: int = 0
    unroutable: int = 0
    seconds: float = 0.0


class BeatCore:
    """One tick of scheduling, without Celery's loop or the HA lock (the benchmark calls it directly)."""

    def __init__(self, store: Any, app: Any, max_per_tick: int = PAGE) -> None:
        self.store = store
        self.app = app
        self.max_per_tick = max_per_tick

    def tick(self, now: float | None = None) -> TickReport:
        t0 = time.perf_counter()
        now = time.time() if now is None else now
        due = self.store.due_jobs(now)
        rep = TickReport(due=len(due))
        # All due jobs are looked at every tick (O(due)): a page limit would let a backlog of
        # queued jobs for a dead node starve the jobs behind it. Pages bound one pipeline's size.
        for i in range(0, len(due), self.max_per_tick):
            routes = dispatch.job_routes(self.store, due[i : i + self.max_per_tick])
            for r in routes:
                if r.node is None:
                    rep.unroutable += 1
                elif r.running:
                    rep.skipped_running += 1
                elif r.queued:
                    rep.skipped_queued += 1
            rep.enqueued += dispatch.enqueue_routes(self.store, self.app, routes)
        for e in rep.enqueued:
            log.info("job %s due: queued %s on node %s (task %s)", e.job_id, e.task, e.node, e.task_id)
        rep.seconds = time.perf_counter() - t0
        return rep


def no_result_waits() -> None:
    """Declare that this process never waits for a task result (a beat process): otherwise Celery's
    Redis result backend SUBSCRIBEs and UNSUBSCRIBEs to every task sent, two round trips per job."""
    _set_task_join_will_block(True)


class HALock:
    """The active-beat lock; its token names the holder (host:pid:uuid) for operators and tests."""

    def __init__(self, store: Any, ttl: float | None = None) -> None:
        ttl = ttl or tunable("beat_lock_ttl")
        self.lock = store.lock("beat", "active", ttl)
        self.ttl = ttl
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.active = False
        self._next_try = 0.0
        self._renewed = 0.0

    def hold(self) -> bool:
        """True while this beat is the active one (acquire as standby, renew as active)."""
        now = time.monotonic()
        if self.active:
            if now - self._renewed < min(5.0, self.ttl / 6):
                return True
            try:
                self.lock.extend(self.ttl, replace_ttl=True)
                self._renewed = now
                return True
            except redis.exceptions.LockNotOwnedError:
                log.warning("beat: lost the active lock; standing by")
                self.active = False
                self.lock.local.token = None
                return False
            except redis.exceptions.RedisError as exc:
                # Cannot renew: stop working once the lock may have expired for the others.
                if now - self._renewed > self.ttl * 0.8:
                    log.warning("beat: cannot renew the active lock (%s); standing by", exc)
                    self.active = False
                    self.lock.local.token = None
                    return False
                return True
        if now < self._next_try:
            return False
        self._next_try = now + min(5.0, self.ttl / 3)
        try:
            if self.lock.acquire(blocking=False, token=self.token):
                self.active, self._renewed = True, now
                log.info("beat: active (lock %s)", self.token)
                return True
        except redis.exceptions.RedisError as exc:
            log.warning("beat: Redis unavailable (%s)", exc)
        return False

    def release(self) -> None:
        if self.active:
            self.active = False
            try:
                self.lock.release()
            except redis.exceptions.RedisError:
                pass


class Sweeper:
    """Finds runs that ended without a word (worker killed) and records them as failed attempts."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def sweep(self) -> list[str]:
        repaired = []
        for job, state, _ns in self.store.jobs_with_state():
            if not (state.worker or state.progress):
                continue
            if self._repair(job, state):
                repaired.append(job.id)
        return repaired

    def _repair(self, job: Any, seen: Any) -> bool:
        # Hold both locks while repairing, so a run starting right now cannot have its fresh
        # state overwritten; if either is held, the run is alive (or just starting).
        jl = dispatch.job_lock(self.store, job.id, ttl=30)
        if not jl.acquire(blocking=False):
            return False
        gl = self.store.lock("guest", job.guest, 30)
        try:
            if not gl.acquire(blocking=False):
                return False
            try:
                state = self.store.get_state(job.id)
                if not (state.worker or state.progress) or state.task_id != seen.task_id \
                        or state.last_try != seen.last_try:
                    return False
                error = jobstate.record_interrupted(self.store, job.id, state.worker)
                log.warning("job %s: %s", job.id, error)
            finally:
                gl.release()
        finally:
            jl.release()
        notify.job_failed(self.store, job.id)
        return True


class ReplqScheduler(Scheduler):
    """Celery beat scheduler reading replq's schedule index (run with `replq beat`)."""

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        no_result_waits()
        self.store = Store.from_url(app.conf.get("replq_redis_url") or app.conf.broker_url)
        self.core = BeatCore(self.store, app)
        self.ha = HALock(self.store)
        self.sweeper = Sweeper(self.store)
        self._sweep_stop = threading.Event()
        self._sweep_thread: threading.Thread | None = None
        self.tick_interval = tunable("beat_tick")
        self.lock_ttl = self.ha.ttl
        self.sweep_interval = tunable("sweep_interval")
        kwargs.setdefault("max_interval", max(self.tick_interval, 5.0))
        super().__init__(app, *args, **kwargs)

    def setup_schedule(self) -> None:
        self.data = {}  # no static entries (not even Celery's backend cleanup: Redis expires results)

    @property
    def info(self) -> str:
        return f"replq schedule index (tick {self.tick_interval:g} s, HA lock ttl {self.lock_ttl:g} s)"

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if not self.ha.hold():
            return min(5.0, self.lock_ttl / 3)
        self._ensure_sweeper()
        try:
            rep = self.core.tick()
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("beat: tick failed (%s); retrying", exc)
            return self.tick_interval
        except Exception as exc:  # noqa: BLE001 - e.g. kombu OperationalError while Redis restarts
            log.warning("beat: tick failed (%s: %s); retrying", exc.__class__.__name__, exc)
            return self.tick_interval
        if rep.seconds > 0.5:
            log.warning("beat: slow tick: %d due, %d queued in %.3f s", rep.due, len(rep.enqueued), rep.seconds)
        return self.tick_interval

    def _ensure_sweeper(self) -> None:
        if self._sweep_thread is None or not self._sweep_thread.is_alive():
            self._sweep_thread = threading.Thread(target=self._sweep_loop, name="replq-sweeper", daemon=True)
            self._sweep_thread.start()

    def _sweep_loop(self) -> None:
        while not self._sweep_stop.wait(self.sweep_interval):
            if not self.ha.active:
                continue
            try:
                self.sweeper.sweep()
            except Exception as exc:  # noqa: BLE001 - Redis away: next sweep
                log.warning("beat: sweep for interrupted runs failed (%s)", exc)

    def close(self) -> None:
        self._sweep_stop.set()
        self.ha.release()  # a standby takes over at its next try, not after the TTL
        super().close()
