"""Enqueue jobs to their node's worker, and follow a running job to its end (SPEC §3, §8 `run`).

Shared by the beat scheduler (beat/scheduler.py) and `replq run`. A job is put on the queue
of the node that holds its guest (`replq.node.<name>`) only after it won a "queued" marker:
a Redis lock (SET NX with a TTL just past the message's `expires`) whose token is the task id.
So two beats, a beat and a manual run, or a tick that overlaps a finished run can never queue
one job twice; the worker clears the marker when it takes the job, and a marker whose message
was lost simply expires, after which the job is queued again.

Running is guarded separately by the per-job lock the worker holds for the whole run
(workers/tasks.py), and the guest lock the engine holds (replicate.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import redis
import redis.lock

from replq.app import TASK_REMOVE, TASK_REPLICATE, enqueue, enqueue_expires, make_app, new_task_id, ping_worker
from replq.errors import NotFound, ReplqError
from replq.output import human_bytes, progress_line
from replq.settings import tunable
from replq.store import JobRoute


def queued_ttl() -> float:
    """The marker outlives the message by a little, so it never expires while its message can still run."""
    return enqueue_expires() + 5


# ---- locks and markers (kept in the store; these name them for the runtime) ---------------------

Route = JobRoute


def job_routes(store: Any, job_ids: Sequence[str]) -> list[Route]:
    """For each job: where its guest lives, whether it is being removed, running or queued."""
    return store.job_routes(job_ids)


def job_lock(store: Any, job_id: str, ttl: float | None = None) -> redis.lock.Lock:
    """The per-job lock a worker holds for a whole run, renewed every third of its TTL: a dead
    worker's lock is gone after job_lock_ttl and the beat's sweeper then sees the interrupted run."""
    return store.lock("job", job_id, ttl or tunable("job_lock_ttl"))


def claim(store: Any, job_ids: Sequence[str], ttl: float | None = None) -> dict[str, str]:
    """Set the queued marker of each job that has none, in one round trip: {job_id: task_id} won."""
    return store.claim_queued({j: new_task_id(j) for j in job_ids}, ttl or queued_ttl())


def clear_queued(store: Any, job_id: str, task_id: str) -> bool:
    """Drop the job's queued marker if this task set it (a newer one belongs to another message)."""
    return store.release_queued(job_id, task_id)


def defer(store: Any, job_id: str, task_id: str, seconds: float) -> None:
    """Keep the scheduler off this job for `seconds` (guest busy, removal not possible yet)."""
    store.defer_queued(job_id, task_id, seconds)


# ---- enqueue -------------------------------------------------------------------------------------

@dataclass
class Enqueued:
    job_id: str
    node: str
    task_id: str
    task: str


def enqueue_routes(store: Any, app: Any, routes: Iterable[Route], force: bool = False,
                   notify: bool = True) -> list[Enqueued]:
    """Claim and publish every route that is neither running nor queued. All messages of a tick
    (and their task-sent events) go to Redis in one pipeline (kombu's producer batch); if that
    fails, the claims are released again, so a broker failure never blocks a job for an hour."""
    todo = [r for r in routes if r.node and not r.running and not r.queued]
    won = claim(store, [r.job_id for r in todo])
    out: list[Enqueued] = []
    if not won:
        return out
    try:
        with app.producer_or_acquire() as producer, producer.batch(max_size=4 * len(won) + 16):
            for r in todo:
                tid = won.get(r.job_id)
                if tid is None:
                    continue
                task = TASK_REMOVE if r.remove else TASK_REPLICATE
                assert r.node is not None
                enqueue(app, task, r.job_id, r.node, tid, force=force, producer=producer, notify=notify)
                out.append(Enqueued(r.job_id, r.node, tid, task))
    except BaseException:
        for j, tid in won.items():
            try:
                clear_queued(store, j, tid)
            except redis.exceptions.RedisError:
                pass  # expires by itself
        raise
    return out


# ---- replq run: enqueue and follow ----------------------------------------------------------------

@dataclass
class Followed:
    job_id: str
    node: str
    task_id: str | None
    started: float
    done: bool = False
    ok: bool = False
    message: str = ""


def _worker_alive(app: Any, node: str, timeout: float = 2.0) -> bool:
    try:
        return ping_worker(node, timeout, app=app)
    except Exception:  # noqa: BLE001 - no answer is the same as no worker for the caller
        return False


def run_remote(store: Any, job_ids: Sequence[str] | None, wait: bool, out: TextIO | None = None,
               redis_url: str | None = None, app: Any = None, poll: float = 0.5, mail: bool = False) -> int:
    """`replq run [--id J] [--no-wait] [--mail]`: enqueue the job(s) to the worker of the guest's node
    and, unless `wait` is False, follow them with a live progress line. Returns the exit code: 0 when
    every job succeeded (or, without wait, was queued), 1 otherwise. `mail`: a failure calls the
    notification hook (pvesr run --mail; scheduled runs always do)."""
    out = out or sys.stdout
    ids = list(job_ids or store.due_jobs())
    if not ids:
        print("no replication job is due", file=out)
        return 0
    for j in ids:
        store.get_job(j)  # an unknown job is an error before anything is queued
    app = app or make_app(redis_url)
    routes = job_routes(store, ids)
    followed: list[Followed] = []
    code = 0
    for r in routes:
        if r.node is None:
            raise NotFound(f"replication job '{r.job_id}' does not exist")
        if wait and not r.running and not _worker_alive(app, r.node):
            print(f"{r.job_id}: no replq worker answers on node '{r.node}' (start: replq worker --node {r.node})",
                  file=out)
            code = 1
            continue
        if r.running:
            st = store.get_state(r.job_id)
            print(f"{r.job_id}: already running ({st.worker or 'locked'}); following it", file=out)
            followed.append(Followed(r.job_id, r.node, st.task_id, time.time()))
            continue
        if r.queued:
            tid = store.queued_token(r.job_id)
            print(f"{r.job_id}: already queued on node '{r.node}' (task {tid})", file=out)
            followed.append(Followed(r.job_id, r.node, tid, time.time()))
            continue
        done = enqueue_routes(store, app, [r], force=True, notify=mail)
        if not done:  # someone queued it between our read and our claim
            tid = store.queued_token(r.job_id)
            print(f"{r.job_id}: already queued on node '{r.node}' (task {tid})", file=out)
            followed.append(Followed(r.job_id, r.node, tid, time.time()))
            continue
        e = done[0]
        print(f"{r.job_id}: queued on node '{e.node}' (task {e.task_id})", file=out)
        followed.append(Followed(r.job_id, e.node, e.task_id, time.time()))
    if not wait:
        return code
    return max(code, follow(store, app, followed, out, poll))


def follow(store: Any, app: Any, jobs: list[Followed], out: TextIO, poll: float = 0.5) -> int:
    """Print progress until every job ended; 0 if all succeeded."""
    tty = out.isatty()
    last_print = 0.0
    width = 0
    while not all(f.done for f in jobs):
        for f in jobs:
            if not f.done:
                _check_done(store, app, f)
                if f.done:
                    if tty and width:
                        out.write("\r" + " " * width + "\r")
                        width = 0
                    print(f"{f.job_id}: {f.message}", file=out)
        running = [f for f in jobs if not f.done]
        if not running:
            break
        now = time.monotonic()
        line = "  ".join(_progress_text(store, f) for f in running)
        if tty:
            out.write("\r" + line.ljust(width))
            width = len(line)
            out.flush()
        elif now - last_print >= 2:  # a log, not a terminal: a line every 2 s
            print(line, file=out)
            last_print = now
        time.sleep(poll)
    out.flush()
    return 0 if all(f.ok for f in jobs) else 1


def _check_done(store: Any, app: Any, f: Followed) -> None:
    if f.task_id is None:  # followed a run we did not queue (e.g. `run --local` elsewhere): watch its locks
        route = job_routes(store, [f.job_id])[0]
        if not route.running:
            st = store.get_state(f.job_id)
            f.done, f.ok = True, st.error is None
            f.message = "OK" if f.ok else f"error: {st.error}"
        return
    res = app.AsyncResult(f.task_id)
    try:
        state = res.state
    except redis.exceptions.RedisError:
        return
    if state in ("PENDING", "RECEIVED", "STARTED", "RETRY"):
        if state == "PENDING" and time.time() - f.started > enqueue_expires() + 10:
            f.done, f.ok, f.message = True, False, f"not started within {enqueue_expires()} s (is the worker of " \
                                                   f"node '{f.node}' running?)"
        return
    f.done = True
    if state == "SUCCESS" and isinstance(res.result, dict):
        r = res.result
        f.ok = bool(r.get("ok"))
        if f.ok:
            f.message = f"OK (sent {human_bytes(r.get('bytes'))} in {r.get('duration', 0):.1f} s)"
        else:
            f.message = f"{r.get('status', 'error')}: {r.get('error')}"
    elif state == "REVOKED":
        f.message = "error: the run was cancelled or its message expired"
    else:
        f.message = f"error: {state}: {res.result}"


def _progress_text(store: Any, f: Followed) -> str:
    try:
        st = store.get_state(f.job_id)
    except (ReplqError, redis.exceptions.RedisError):
        return f"{f.job_id}: ..."
    p = st.progress
    if not st.worker and not p:
        return f"{f.job_id}: queued on {f.node}"
    if not p:
        return f"{f.job_id}: starting on {f.node}"
    return f"{f.job_id}: {progress_line(p)}"


__all__ = ["run_remote", "follow", "enqueue_routes", "job_routes", "claim", "clear_queued", "defer", "job_lock",
           "Route", "Enqueued"]
