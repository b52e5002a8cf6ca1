"""Every state transition of a replication job, and how a state reads (pvesr's ReplicationState).

The engine, the worker tasks and the beat's sweeper all record through these functions, so a
job's state means one thing wherever it is shown: `replq status` (text and JSON), the metrics,
the failure notification.

    record_job_start   a run (or removal) begins: last_try, last_node, worker; the log restarts
    record_sync_end    the new snapshot arrived everywhere: last_sync (before anything is deleted)
    record_job_end     success clears fail_count/error; failure adds one to fail_count
    record_refusal     a scheduled run refused before it started (counts as a failed attempt)
    record_interrupted a run whose worker died without a word (found by the beat's sweeper)
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from replq.model import Job, JobState
from replq.output import progress_line

STATES = ("ok", "error", "syncing")


# ---------------------------------------------------------------------------------- the log


def log_line(job_id: str, message: str, when: float | None = None) -> str:
    """`YYYY-MM-DD HH:MM:SS J: message` in local time (SPEC §5)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when if when is not None else time.time()))
    return f"{stamp} {job_id}: {message}"


def log(store: Any, job_id: str, message: str, when: float | None = None) -> str:
    """Append one line to the job's replication log; a log write never breaks the work itself."""
    line = log_line(job_id, message, when)
    with contextlib.suppress(Exception):
        store.append_log(job_id, line)
    return line


def one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------- transitions


def record_job_start(store: Any, job_id: str, start: int, node: str, worker: str | None,
                     task_id: str | None) -> None:
    """A run or removal begins: the log restarts, the attempt is recorded (next_sync moves on)."""
    store.clear_log(job_id)
    store.update_state(job_id, last_try=start, last_node=node, worker=worker, task_id=task_id)


def record_sync_end(store: Any, job_id: str, start: int) -> None:
    """The new snapshot is on the target: from now on it is the job's base, whatever happens next."""
    store.update_state(job_id, last_sync=start)


def record_job_end(store: Any, job_id: str, *, error: str | None, duration: float, bytes: int = 0,
                   storeids: list[str] | None = None, kept: list[str] | None = None) -> JobState:
    """The run ended: success (error None) clears the error state, a failure counts. `kept` names
    the diverged states a --discard-target-changes run kept aside (shown by status until replaced)."""
    with contextlib.suppress(Exception):  # progress is advisory; the state write below is not
        store.set_progress(job_id, None)
    fields: dict[str, Any] = {"duration": duration, "bytes": bytes, "worker": None, "task_id": None}
    if error is None:
        fields.update(fail_count=0, error=None)
        if storeids is not None:
            fields["storeid_list"] = storeids
        if kept:
            fields["kept"] = kept
        return store.update_state(job_id, **fields)
    return store.update_state(job_id, failed=True, error=one_line(error), **fields)


def try_record_job_end(store: Any, job_id: str, **kw: Any) -> bool:
    """record_job_end of a failed run that must not fail itself (the store may be what failed,
    e.g. a worker cut off from Redis): False if the state could not be written."""
    try:
        record_job_end(store, job_id, **kw)
        return True
    except Exception:  # noqa: BLE001 - the run's own error is the one to report
        return False


def record_refusal(store: Any, job_id: str, node: str, error: str, start: float | None = None) -> JobState:
    """A scheduled run refused before it started: recorded as a failed attempt, so the job waits
    retry_interval in error state instead of being queued again every second."""
    start = int(time.time() if start is None else start)
    store.clear_log(job_id)
    log(store, job_id, "start replication job", start)
    log(store, job_id, f"end replication job with error: {one_line(error)}")
    return store.update_state(job_id, last_try=start, last_node=node, failed=True, error=one_line(error))


INTERRUPTED = "replication interrupted: worker {worker} stopped during the run (no heartbeat since its lock expired)"


def record_interrupted(store: Any, job_id: str, worker: str | None) -> str:
    """A run whose worker died (its locks expired, its state still says running): a failed attempt."""
    error = INTERRUPTED.format(worker=worker or "?")
    store.set_progress(job_id, None)
    store.update_state(job_id, failed=True, error=error, worker=None, task_id=None)
    log(store, job_id, f"end replication job with error: {error}")
    return error


# ---------------------------------------------------------------------------------- reading a state


def running(state: JobState) -> bool:
    return bool(state.worker or state.progress)


def state_name(state: JobState) -> str:
    """ok / error / syncing: a running job is syncing even in error state; a job is in error state
    while fail_count > 0 (SPEC §3), whatever error text it carries."""
    if running(state):
        return "syncing"
    if state.fail_count or state.error:
        return "error"
    return "ok"


def state_text(state: JobState) -> str:
    """The State column of `replq status`: OK, SYNCING, or the error text (one line)."""
    name = state_name(state)
    if name == "syncing":
        return "SYNCING"
    if name == "error":
        return one_line(state.error) if state.error else f"error (fail count {state.fail_count})"
    return "OK"


def state_cell(state: JobState) -> str:
    """The State with replq's progress: while a job runs, SYNCING with its bytes, rate and ETA
    (`status --progress`, the web GUI's table)."""
    text = state_text(state)
    if text == "SYNCING" and state.progress:
        return f"SYNCING {progress_line(state.progress)}"
    return text


def status_row(job: Job, state: JobState, next_sync: float | None) -> dict[str, Any]:
    """One job in `status --output-format json` (SPEC §8 keys), times as epoch seconds."""
    row = {"id": job.id, "guest": job.guest, "jobnum": job.jobnum, "target": job.target, "source": job.source,
           "schedule": job.effective_schedule, "rate": job.rate, "enabled": not job.disable,
           "last_sync": state.last_sync or None, "last_try": state.last_try or None, "next_sync": next_sync,
           "duration": state.duration, "fail_count": state.fail_count, "error": state.error,
           "state": state_text(state), "bytes": state.bytes}
    if state.kept:
        row["kept"] = state.kept
    if running(state):
        row["progress"] = state.progress
    return row
