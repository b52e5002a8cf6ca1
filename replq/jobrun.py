"""What a replication run and a job removal share: the job and guest as they are now (with the
direction switch of a moved guest), the node check, the guest's volumes, the SSH connection to
the target, the guest lock with its heartbeat, the replication log, and old-snapshot cleanup.

`Replication` (replicate.py) and `Removal` (removal.py) are the two kinds of `JobRun`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from replq import guard, jobstate, ssh, transfer, zfs
from replq import plan as planner
from replq.context import ssh_key_path
from replq.direction import lazy_switch
from replq.errors import Cancelled, GuestLocked, JobRefused, LockLost, ReplqError, ValidationError
from replq.locks import Lease
from replq.model import Snapshot, Volume, check_volume_owner
from replq.settings import tunable

CLEANUP_STEP = 10.0  # seconds one cleanup command on a node may take after a failure
CLEANUP_BUDGET = 25.0  # seconds all cleanup after a failure may take: a hung node must not hang the run's end


class Deadline:
    """The time left for cleaning up after a failure, shared by its steps (SPEC §5: a stalled run
    ends within stall_timeout + 30 s, whatever the target does)."""

    def __init__(self, seconds: float = CLEANUP_BUDGET) -> None:
        self.end = time.monotonic() + seconds

    def step(self, limit: float = CLEANUP_STEP) -> float | None:
        """The timeout of the next step, or None when no time is left (skip it; say so)."""
        left = self.end - time.monotonic()
        return min(limit, left) if left >= 1.0 else None


@dataclass
class RunResult:
    job_id: str
    ok: bool
    start: int
    duration: float
    bytes: int = 0
    error: str | None = None
    plan: dict | None = None


class JobRun:
    """The frame of one run (or removal) of job `job_id` on this node (`node`)."""

    def __init__(
        self,
        store: Any,
        job_id: str,
        node: str,
        *,
        echo: Callable[[str], None] | None = None,
        worker: str | None = None,
        task_id: str | None = None,
        take_lock: bool = True,
        lease: Lease | None = None,
        discard: bool = False,
        key_path: str | os.PathLike | None = None,
        cancel: threading.Event | None = None,
        clock: Callable[[], float] = time.time,
        local: zfs.Runner | None = None,
        connect: Callable[[Any], Any] | None = None,
        send: Callable[..., tuple[int, float]] = transfer.send_stream,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.node = node
        self.echo = echo
        self.worker = worker or f"{node}:{os.getpid()}"
        self.task_id = task_id
        self.take_lock = take_lock
        # The locks this run works under (its guest lock, or the caller's: migrate), checked before
        # every destructive step (fence).
        self.lease = lease
        # --discard-target-changes: a diverged target is kept aside (renamed) instead of refusing.
        self.discard = discard
        self.kept: list[str] = []  # `node:dataset` of each diverged state kept by this run
        self.key_path = key_path
        self.cancel = cancel
        self.clock = clock
        self.switched: str | None = None  # set when this run switched the job's direction (SPEC §6)
        # The doors to the outside, replaceable by fakes that record the order of the steps
        # (tests/support/fakezfs.py): zfs here, the SSH connection to a node, the send pipeline.
        self._local_runner = local
        self.local = zfs.Zfs(local or zfs.LocalRunner(node=node), side="source")
        self._connect_node = connect or (lambda target: ssh.connect_node(target, self.key_path or ssh_key_path()))
        self.send = send
        self.conn: ssh.Connection | None = None
        self.remote: zfs.Zfs | None = None
        self.pool_storages: dict[str, str] = {}  # pool → storage id, to name volumes as pvesr's log does
        self._stall_timeout: float | None = None
        self.undo: Deadline | None = None  # set at the first failure: the time left for cleaning up
        self.sent: dict[str, list[Snapshot]] = {}  # per dataset, the snapshots a transfer carries (guids)
        self.keep_new: set[str] = set()  # datasets whose new snapshot stays after a failure (see _undo_target)

    def sibling(self, cls: type[JobRun]) -> Any:
        """The same job on the same terms as another kind of run (a run that turns out to be a removal)."""
        other = cls(self.store, self.job_id, self.node, echo=self.echo, worker=self.worker, task_id=self.task_id,
                    take_lock=self.take_lock, lease=self.lease, discard=self.discard, key_path=self.key_path,
                    cancel=self.cancel, clock=self.clock,
                    local=self._local_runner, connect=self._connect_node, send=self.send)
        other.switched = self.switched
        return other

    # ------------------------------------------------------------------ helpers

    def log(self, message: str) -> None:
        line = jobstate.log(self.store, self.job_id, message)
        if self.echo:
            self.echo(line)

    def load(self, persist: bool = True) -> tuple[Any, Any]:
        """The job and its guest; a job whose guest moved switches direction first."""
        job = self.store.get_job(self.job_id)
        guest = self.store.get_guest(job.guest)
        if guest.node == self.node:
            # The guest was moved (guest move, HA) since the job's last run: switch its direction
            # first, so the live volume is the source and the old node becomes the target (SPEC §6).
            job, note = lazy_switch(self.store, job, guest, persist=persist)
            if note and persist:
                # Its disks here are the live ones now (guest move marks them too, when it can reach
                # this node): otherwise the next run would find its source marked as a replica.
                volumes, _ = self.volumes(guest)
                guard.mark_live(self.local, [v.dataset for v in volumes], guest.vmid, int(self.clock()), self.log)
            self.switched = note or self.switched
        return job, guest

    def check_node(self, job: Any, guest: Any) -> None:
        if guest.node != self.node:
            raise JobRefused(
                f"guest {guest.vmid} lives on node '{guest.node}', not on this node '{self.node}': "
                f"run job {self.job_id} there"
            )
        if job.target == guest.node:
            raise JobRefused("Source and target must not be identical")

    def volumes(self, guest: Any) -> tuple[list[Volume], dict[str, Any]]:
        for disk in guest.disks:  # a guest registered before this rule was enforced at `guest add`
            try:
                check_volume_owner(guest.vmid, disk)
            except ValidationError as exc:
                raise JobRefused(f"{exc}: correct the disks of guest {guest.vmid} (replq guest set-disks)") from None
        storages = {s.id: s for s in self.store.list_storages()}
        self.pool_storages = {s.pool: s.id for s in storages.values() if s.type == "zfspool" and s.pool}
        volumes, _skipped = planner.replicatable_volumes(
            ((d.volid, d.replicate) for d in guest.disks),
            {sid: (s.type, s.pool or "") for sid, s in storages.items()},
        )
        self.pool_storages.update({v.pool: v.storage for v in volumes})
        return volumes, storages

    def volid(self, dataset: str) -> str:
        """`STORAGE:VOLNAME` of a dataset, as pvesr's log names volumes (the dataset if no storage has its pool)."""
        pool, _, volname = dataset.rpartition("/")
        sid = self.pool_storages.get(pool)
        return f"{sid}:{volname}" if sid else dataset

    def log_guest(self, guest: Any, volumes: Sequence[Volume]) -> None:
        """pvesr's first lines of a run. replq does not know whether a guest runs (it never freezes
        a file system), so it says `running => 0`, as pvesr does for a stopped guest."""
        self.log(f"guest => {'VM' if guest.type == 'qemu' else 'CT'} {guest.vmid}, running => 0")
        self.log(f"volumes => {','.join(sorted(v.volid for v in volumes))}")

    @property
    def stall_timeout(self) -> float:
        """The cluster's stall_timeout: the longest a transfer or a zfs command may make no progress."""
        if self._stall_timeout is None:
            self._stall_timeout = float(self.store.get_settings()["stall_timeout"])
            self.local.timeout = self._stall_timeout
        return self._stall_timeout

    def connect(self, job: Any) -> zfs.Zfs:
        self.conn = self._connect_node(self.store.get_node(job.target))
        self.remote = zfs.Zfs(self.conn, side="target", timeout=self.stall_timeout)
        return self.remote

    def held_bases(self, vmid: int, listing: Mapping[str, Sequence[Snapshot]]) -> dict[tuple[str, str], str]:
        """Snapshots here that another job of the guest still needs as its base (plan.held_bases)."""
        others = [(j.id, int(self.store.get_state(j.id).last_sync or 0)) for j in self.store.list_jobs(vmid)
                  if j.id != self.job_id and not j.remove_job]
        return planner.held_bases(others, listing)

    @contextlib.contextmanager
    def guest_lock(self, vmid: int) -> Iterator[None]:
        """Hold the guest lock (with its heartbeat) for the run. Losing it (not renewable for
        0.8 x TTL: Redis away) cancels the run: another run of this guest, or a guest move, may
        take over, so the transfer is killed and no further destructive step is taken."""
        if self.cancel is None:
            self.cancel = threading.Event()
        if not self.take_lock:  # the caller holds it (migrate); its lease fences our steps
            yield
            return
        ttl = tunable("guest_lock_ttl")
        lease = Lease(self.store, [("guest", vmid)], ttl, on_lost=self.cancel.set, name=f"guest {vmid}")
        if not lease.acquire():
            raise GuestLocked(f"guest {vmid} is locked: another replication job of this guest is running")
        self.lease = lease
        with lease:
            yield

    def recheck(self, job: Any, guest: Any) -> None:
        """Right after taking the guest lock: the guest and job as they are now. A guest that moved,
        or a job that changed, while this run waited for the lock refuses the run."""
        now_guest = self.store.get_guest(guest.vmid)
        if now_guest.node != guest.node:
            raise JobRefused(f"guest {guest.vmid} moved to node '{now_guest.node}' while job {self.job_id} waited "
                             "for its lock: run refused")
        now_job = self.store.get_job(self.job_id)
        if (now_job.target, now_job.remove_job, now_job.disable) != (job.target, job.remove_job, job.disable):
            raise JobRefused(f"replication job '{self.job_id}' changed while it waited for the guest lock: run "
                             "refused; it runs again as it is now")

    def fence(self, step: str) -> None:
        """Immediately before a destructive step: the run's locks are still its own (LockLost if not)."""
        if self.lease is not None:
            self.lease.check(step)

    def stop_requested(self) -> None:
        """Called between chunks and every second of a transfer: stop when cancelled or the lock is lost."""
        if self.cancel is not None and self.cancel.is_set():
            if self.lease is not None and self.lease.lost.is_set():
                raise LockLost(f"replication stopped: {self.lease.reason}; the target is left as its last "
                               "committed receive left it")
            raise Cancelled("replication cancelled")

    def current_bases(self, vmid: int) -> dict[str, str]:
        """Every other job of the guest (not being removed) → its last_sync snapshot, its base."""
        out = {}
        for j in self.store.list_jobs(vmid):
            last = int(self.store.get_state(j.id).last_sync or 0)
            if j.id != self.job_id and not j.remove_job and last:
                out[j.id] = planner.snapshot_name(j.id, last)
        return out

    def cleanup(self, z: zfs.Zfs, dataset: str, name: str, where: str, what: str | None = None) -> None:
        """Delete an old replication snapshot after success; a failure only leaves it for the next run.
        Logged as pvesr does: on the source `delete previous replication snapshot`, on the target
        what its finalize-local-job says; `what` names a snapshot that is not this job's own (a
        leftover of another job's `send -R`)."""
        if what is not None:
            self.log(f"delete {what} '{name}' on {self.volid(dataset)} on node '{where}'")
        elif where == self.node:
            self.log(f"delete previous replication snapshot '{name}' on {self.volid(dataset)}")
        else:
            self.log(f"(remote_finalize_local_job) delete stale replication snapshot '{name}' on {self.volid(dataset)}")
        try:
            self.fence(f"deleting '{dataset}@{name}' on {where}")
            z.destroy_snapshot(dataset, name)
        except ReplqError as exc:
            self.log(f"warning: could not delete '{dataset}@{name}' on {where}: {exc}")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
            self.remote = None
