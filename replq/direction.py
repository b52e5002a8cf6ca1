"""The direction of a guest's replication jobs follows the guest (SPEC §6).

When a guest moves (migrate, guest move, an HA manager), a job that targeted the guest's new
node now targets the node it came from, and every job's source becomes the new node. The
decision is pure (`switched`); the store writes a guest-wide change in one transaction.
`lazy_switch` is the engine's check before each run: a job whose guest lives elsewhere than
its source switches first, then goes on incrementally from the newest common snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from replq.errors import Conflict
from replq.model import Job, job_id_sort_key, trusted
from replq.store import GuestChange


def switched(job: Job, old: str | None, new: str) -> Job:
    """The job after its guest moved from `old` to `new` (pure): a job that targeted `new` now
    targets `old`; every job's source becomes `new`."""
    cfg = job.config()
    if job.target == new:
        if not old or old == new:
            raise Conflict(
                f"replication job '{job.id}' targets node '{new}', where guest {job.guest} now lives, and the node "
                "it came from is unknown: cannot switch its direction (delete the job and create it anew)"
            )
        cfg["target"] = old
    cfg["source"] = new
    return trusted(Job, **cfg)


def _check_targets(vmid: int, new: str, jobs: dict[str, Job]) -> None:
    seen: dict[str, str] = {}
    for j in sorted(jobs, key=job_id_sort_key):
        t = jobs[j].target
        if t == new:
            raise Conflict(f"replication job '{j}' would target node '{new}', where guest {vmid} lives")
        if t in seen:
            raise Conflict(f"cannot switch the direction of replication job '{j}': job '{seen[t]}' of guest {vmid} "
                           f"already targets node '{t}'")  # fmt: skip
        seen[t] = j


def commit_switch(store: Any, vmid: int, new: str, *, move_from: str | None = None, only: Sequence[str] | None = None,
                  fallback_old: str | None = None) -> list[tuple[Job, Job]]:  # fmt: skip
    """Switch the direction of the guest's jobs (all, or `only` these) to source `new`, and with
    `move_from` move the guest record from that node to `new` in the same transaction.

    Returns (before, after) of each job that changed. The decision is made here (pure, on what
    the store read under WATCH); the store writes it atomically.
    """

    def decide(guest: Any, jobs: dict[str, Job]) -> GuestChange:
        if move_from is not None:
            if guest.node != move_from:
                raise Conflict(f"guest {vmid} moved meanwhile: it lives on node '{guest.node}' now")
        elif guest.node != new:
            raise Conflict(f"guest {vmid} lives on node '{guest.node}', not '{new}'")
        changes = []
        for j, job in jobs.items():
            if only is not None and j not in only:
                continue
            if move_from is None and job.source == new and job.target != new:
                continue  # switched already (a concurrent run)
            after = switched(job, move_from or job.source or fallback_old, new)
            if after.config() != job.config():
                changes.append((job, after))
        final = {**jobs, **{after.id: after for _, after in changes}}
        if only is None:
            _check_targets(vmid, new, final)
        else:  # the other jobs switch at their own runs (one may still target `new`): ours must not collide
            taken = {x.target: j for j, x in final.items() if j not in only}
            for _, after in changes:
                if after.target in taken:
                    raise Conflict(f"cannot switch the direction of replication job '{after.id}': job "
                                   f"'{taken[after.target]}' of guest {vmid} already targets node '{after.target}'")
        return GuestChange(new if move_from is not None else None, [after for _, after in changes], changes)

    return store.change_guest_and_jobs(vmid, decide)


def lazy_switch(store: Any, job: Job, guest: Any, persist: bool = True) -> tuple[Job, str | None]:
    """The engine's check before a run on the guest's node: when the guest lives elsewhere than the
    job's source (or on its target), switch the job's direction. Returns (job, log message or None).
    With persist=False (dry run) the switched job is only computed."""
    new = guest.node
    if job.target != new and job.source in (None, new):
        return job, None  # the common case: nothing moved (an unset source is filled by the run)
    # The node the guest came from: the job's source, else where it last ran.
    old = job.source or store.get_state(job.id).last_node
    if old == new:
        old = None
    if not persist:
        after = switched(job, old, new)
    else:
        changes = commit_switch(store, guest.vmid, new, only=[job.id], fallback_old=old)
        if not changes:
            return store.get_job(job.id), None
        after = changes[0][1]
    note = (f"guest {guest.vmid} moved from node '{old or job.source}' to '{new}': job switched direction, "
            f"now {new} => {after.target}")  # fmt: skip
    return after, note
