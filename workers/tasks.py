"""Celery tasks run by the node workers: thin wrappers over replq.replicate.

`replq.replicate(job_id)` runs one job on the worker of the node holding the guest:

1. take the per-job lock (Redis, extended by a heartbeat thread): a redelivered message, a
   second beat or a manual run at the same time finds it held and does nothing;
2. drop the job's queued marker (set by whoever enqueued it), so the scheduler may queue the
   job again once this run has moved its next_sync;
3. refuse what is not this node's (the guest moved: the scheduler routes it anew) or no longer
   due (a stale message), unless the run was asked for by hand (`force`);
4. run the engine (which takes the guest lock and records state, log and progress);
5. on failure, call the notification hook (replq.notify).

A run is cancelled cleanly — the `zfs send` process group killed, the target rolled back, the
failure recorded — when the task is revoked with terminate (SIGTERM to the pool process) or the
worker is asked to stop (the main process sends SIGUSR2 to its pool processes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from celery import shared_task
from celery.signals import worker_process_init

from replq import context, dispatch, jobstate, notify, procs
from replq.app import TASK_REMOVE, TASK_REPLICATE
from replq.errors import GuestLocked, NotFound, ReplqError
from replq.locks import Heartbeat
from replq.removal import remove_job as run_removal
from replq.replicate import run_job
from replq.settings import tunable
from replq.store import Store

log = logging.getLogger("replq.worker")

CANCEL_SIGNAL = signal.SIGUSR2  # main process → pool process: cancel the running job, keep the process
KILL_AFTER = 10.0  # seconds a cancelled run gets to unwind before its child processes are killed
GUEST_BUSY_DEFER = 15.0  # scheduler retry delay while another job of the guest runs
UNEXPECTED_DEFER = 60.0  # ... and after a task crashed

_stores: dict[str, Any] = {}


def _store(app: Any) -> Any:
    """One store (connection pool) per pool process; created after the fork."""
    url = app.conf.get("replq_redis_url") or context.redis_url()
    if url not in _stores:
        _stores[url] = Store.from_url(url)
    return _stores[url]


def _node(app: Any) -> str:
    return app.conf.get("replq_node") or context.local_node()


# ---- cancellation of the running job ------------------------------------------------------------

@dataclass
class RunControl:
    job_id: str
    cancel: threading.Event = field(default_factory=threading.Event)
    die_after: bool = False  # SIGTERM (revoke --terminate): the pool process exits once the run unwound
    reason: str | None = None


_current: RunControl | None = None


def _kill_children_later(ctl: RunControl) -> None:
    def killer() -> None:
        if ctl.cancel.wait(0) and _current is ctl:
            time.sleep(KILL_AFTER)
            if _current is ctl:
                for pgid in procs.child_group_leaders(os.getpid()):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pgid, signal.SIGKILL)

    threading.Thread(target=killer, name="cancel-killer", daemon=True).start()


def _on_cancel_signal(signum: int, _frame: Any) -> None:
    ctl = _current
    if ctl is None:
        if signum == signal.SIGTERM:  # between runs: terminate as billiard's own handler would
            raise SystemExit(-(256 - signum))
        return
    if not ctl.cancel.is_set():
        ctl.reason = "task revoked" if signum == signal.SIGTERM else "worker stopping"
        ctl.die_after = signum == signal.SIGTERM
        ctl.cancel.set()
        _kill_children_later(ctl)


@worker_process_init.connect
def _install_cancel_handler(**_: Any) -> None:
    # SIGUSR2 is not among the signals billiard resets after this hook, so it stays ours; SIGTERM
    # is billiard's (exit the pool process) except while a run is in progress (_run_guarded).
    signal.signal(CANCEL_SIGNAL, _on_cancel_signal)


# ---- the job lock ------------------------------------------------------------------------------

class JobLock:
    """The per-job lock with a heartbeat. Losing it (expired while Redis was away) cancels the
    run: another worker may take the job now, and two runs must never overlap."""

    def __init__(self, store: Any, job_id: str, on_lost: Any) -> None:
        ttl = tunable("job_lock_ttl")
        self.lock = dispatch.job_lock(store, job_id, ttl)
        self.heartbeat = Heartbeat([self.lock], ttl, on_lost=on_lost, name="job-lock")

    def acquire(self) -> bool:
        if not self.lock.acquire(blocking=False):
            return False
        self.heartbeat.start()
        return True

    def release(self) -> None:
        self.heartbeat.stop()


# ---- tasks -------------------------------------------------------------------------------------

def _result(job_id: str, status: str, ok: bool = False, error: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"job": job_id, "status": status, "ok": ok, "error": error, **extra}


def _prologue(task: Any, job_id: str, force: bool) -> tuple[Any, Any, dict[str, Any] | None]:
    """Checks every task makes after taking the job lock; returns (job, guest, early result)."""
    store, node, tid = _store(task.app), _node(task.app), task.request.id
    dispatch.clear_queued(store, job_id, tid)
    try:
        job = store.get_job(job_id)
        guest = store.get_guest(job.guest)
    except NotFound as exc:
        return None, None, _result(job_id, "skipped", error=str(exc))
    if guest.node != node:
        # The scheduler queues by the guest's current node; this message predates a move.
        return job, guest, _result(job_id, "moved", error=f"guest {guest.vmid} now lives on node '{guest.node}', "
                                                          f"not '{node}'", node=guest.node)
    if not force:
        ns = store.next_sync(job_id)
        if ns is None or ns > time.time() + 1:
            return job, guest, _result(job_id, "skipped", ok=True, error="not due any more")
    return job, guest, None


def _run_guarded(task: Any, job_id: str, force: bool, body: Any) -> dict[str, Any]:
    """The job lock around the prologue and `body(store, node, ctl)`, with cancel handling."""
    global _current
    store = _store(task.app)
    ctl = RunControl(job_id)
    lock = JobLock(store, job_id, on_lost=ctl.cancel.set)
    if not lock.acquire():
        dispatch.clear_queued(store, job_id, task.request.id)
        return _result(job_id, "running", error=f"job {job_id} is already running (job lock held)")
    _current = ctl
    # While the run is in progress, SIGTERM (revoke with terminate) cancels it cleanly instead of
    # exiting mid-stream; afterwards the pool process exits as Celery expects of a terminated task.
    previous = signal.signal(signal.SIGTERM, _on_cancel_signal)
    try:
        job, guest, early = _prologue(task, job_id, force)
        if early is not None:
            return early
        return body(store, _node(task.app), ctl, job)
    except Exception:
        # Unexpected (a bug, Redis gone mid-run): Celery records the traceback; keep the scheduler
        # from queueing the job again at once, which would repeat the failure every second.
        if not force:
            with contextlib.suppress(Exception):
                dispatch.defer(store, job_id, task.request.id, UNEXPECTED_DEFER)
        raise
    finally:
        _current = None
        signal.signal(signal.SIGTERM, previous)
        lock.release()
        if ctl.die_after:
            os.kill(os.getpid(), signal.SIGTERM)


@shared_task(bind=True, name=TASK_REPLICATE)
def replicate(self: Any, job_id: str, force: bool = False, notify: bool = True) -> dict[str, Any]:
    """Run replication job `job_id` on this node (the argument is the job id, shown in Flower).
    `notify`: call the failure hook (scheduled runs, and `replq run --mail`)."""
    failed = _notifier(notify)

    def body(store: Any, node: str, ctl: RunControl, job: Any) -> dict[str, Any]:
        if job.remove_job:
            return _remove(self, store, node, ctl, job_id, force, notify)
        worker = f"{self.request.hostname or node}:{os.getpid()}"
        try:
            res = run_job(store, job_id, node, worker=worker, task_id=self.request.id, cancel=ctl.cancel)
        except GuestLocked as exc:
            if not force:
                dispatch.defer(store, job_id, self.request.id, GUEST_BUSY_DEFER)
            return _result(job_id, "guest-locked", error=str(exc))
        except ReplqError as exc:
            # Refused before the run started (e.g. the guest now lives on the target). A manual run
            # just reports it; a scheduled one records a failed attempt, so the job waits
            # retry_interval in error state instead of being queued again every second.
            if not force:
                jobstate.record_refusal(store, job_id, node, str(exc))
                failed(store, job_id)
            return _result(job_id, "refused", error=str(exc))
        if ctl.reason and not res.ok:
            jobstate.log(store, job_id, f"run cancelled: {ctl.reason}")
        if not res.ok:
            failed(store, job_id)
        return _result(job_id, "ok" if res.ok else "failed", ok=res.ok, error=res.error, bytes=res.bytes,
                       duration=res.duration, start=res.start)

    return _run_guarded(self, job_id, force, body)


def _notifier(enabled: bool) -> Any:
    """notify.job_failed, or nothing for a manual run without --mail (as pvesr's run without --mail)."""
    return notify.job_failed if enabled else (lambda _store, _job_id: None)


def _remove(task: Any, store: Any, node: str, ctl: RunControl, job_id: str, force: bool,
            notify_failure: bool = True) -> dict[str, Any]:
    worker = f"{task.request.hostname or node}:{os.getpid()}"
    try:
        res = run_removal(store, job_id, node, worker=worker, task_id=task.request.id, cancel=ctl.cancel)
    except ReplqError as exc:
        return _result(job_id, "failed", error=str(exc))
    if not res.ok:
        _notifier(notify_failure)(store, job_id)
    return _result(job_id, "removed" if res.ok else "failed", ok=res.ok, error=res.error)


@shared_task(bind=True, name=TASK_REMOVE)
def remove_job(self: Any, job_id: str, force: bool = False, notify: bool = True) -> dict[str, Any]:
    """Remove job `job_id` (remove_job=full/local): snapshots, target volumes, then config and state."""

    def body(store: Any, node: str, ctl: RunControl, job: Any) -> dict[str, Any]:
        if not job.remove_job:
            return _result(job_id, "skipped", error="job is not marked for removal")
        return _remove(self, store, node, ctl, job_id, force, notify)

    return _run_guarded(self, job_id, force, body)
