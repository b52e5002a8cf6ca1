"""Migration and the direction switch of replication jobs (SPEC §6).

- `migrate()`: offline migration, run in this process on the node that holds the guest (like
  `qm migrate`; the CLI refuses elsewhere). With a job to the target, that job runs once more
  (only the delta is sent); the guest then moves and its jobs switch direction in one store
  transaction. Without one, every local volume is sent in full, checked on the target (every
  snapshot there with the same guid), the guest moves, and only then are the source volumes
  destroyed. Until the guest record moves, nothing on the source is changed but snapshots,
  so a failure at any step leaves the guest usable where it was.
- the direction of the guest's jobs switches with the move (direction.py); a job whose guest
  was moved by `guest move` (recovery.py) or an HA manager switches at its next run
  (direction.lazy_switch).

Job state lives in the cluster store, not on a node, so it moves with the guest by itself: a
switched job keeps its last_sync and continues from that snapshot.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from replq import guard, ssh, transfer, zfs
from replq import plan as planner
from replq.context import ssh_key_path
from replq.direction import commit_switch
from replq.errors import (
    ConnectionLost,
    HostKeyMismatch,
    LockLost,
    MigrationFailed,
    MigrationRefused,
    NodeUnreachable,
    ReplqError,
    ValidationError,
)
from replq.jobrun import CLEANUP_STEP
from replq.locks import Lease
from replq.model import check_node_name, check_vmid, check_volume_owner
from replq.replicate import Replication
from replq.settings import tunable

MIGRATE_SNAPSHOT = "__migrate_{epoch}__"


# ---------------------------------------------------------------------------------- locks


def _running(store: Any, vmid: int) -> str:
    for job_id in store.job_ids(vmid):
        st = store.get_state(job_id)
        if st.worker:
            return f"replication job {job_id} is running ({st.worker})"
    return "a replication of it is running (guest locked)"


@contextlib.contextmanager
def guest_locks(store: Any, vmid: int, what: str) -> Iterator[Lease]:
    """The migrate lock and the guest lock, extended by a heartbeat: no job of the guest starts
    (beat skips a locked guest; the engine refuses) while the guest is migrated or moved. Yields
    the lease: every destructive step checks it first (lease.check), so a migration whose locks
    were lost (Redis away) stops before it changes anything more."""
    ttl = tunable("guest_lock_ttl")
    lease = Lease(store, [("migrate", vmid), ("guest", vmid)], ttl, name=f"guest {vmid}")
    if not lease.acquire():
        if lease.blocked_by == ("migrate", vmid):
            raise MigrationRefused(f"cannot {what} guest {vmid}: a migration of it is already running")
        raise MigrationRefused(f"cannot {what} guest {vmid}: {_running(store, vmid)}; try again when it has finished "
                               f"(the lock of a dead node expires within {ttl:.0f} s)")  # fmt: skip
    with lease:
        yield lease


# ---------------------------------------------------------------------------------- migrate


@dataclass
class MigrateResult:
    vmid: int
    source: str
    target: str
    mode: str  # "delta" (a job to the target ran) or "full"
    job: str | None = None
    bytes: int = 0
    duration: float = 0.0
    copied: list[str] = field(default_factory=list)  # datasets sent in full
    removed: list[str] = field(default_factory=list)  # source datasets destroyed after the move
    switched: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def local_volumes(guest: Any, storages: dict[str, Any], target: str, what: str = "migrate") -> list[planner.Volume]:
    """Every volume of the guest on local ZFS (replicate=0 included: it must move too)."""
    out = []
    for d in guest.disks:
        try:
            check_volume_owner(guest.vmid, d)
        except ValidationError as exc:
            raise MigrationRefused(f"cannot {what} guest {guest.vmid}: {exc}") from None
        if d.is_path:
            raise MigrationRefused(f"cannot {what} guest {guest.vmid}: local file/device '{d.volid}' cannot be copied")
        st = storages.get(d.storage or "")
        if st is None or st.type != "zfspool":
            continue  # shared storage (or gone): nothing to copy
        if not st.available_on(target):
            raise MigrationRefused(f"cannot {what} guest {guest.vmid}: storage '{st.id}' is not available on node "
                                   f"'{target}'")  # fmt: skip
        out.append(planner.Volume(volid=d.volid, storage=st.id, pool=st.pool or "", volname=d.volname))
    return out


def _send_full(conn: ssh.Connection, node: str, dataset: str, snap: str, stall_timeout: float, lease: Lease) -> int:
    """`zfs send -Rp dataset@snap` here into `zfs recv dataset` on the connected node (no -F:
    it never overwrites), through the engine's send pipeline; stopped if the lease is lost."""

    def on_bytes(_sent: int) -> None:
        if lease.lost.is_set():
            raise LockLost(f"migration stopped: {lease.reason}")

    sent, _ = transfer.send_stream(conn, zfs.send_argv(dataset, snap), zfs.recv_argv(dataset, incremental=False),
                                   source=node, dataset=dataset, stall_timeout=stall_timeout, on_bytes=on_bytes)
    return sent


def _verify(local: zfs.Zfs, remote: zfs.Zfs, dataset: str, snap: str) -> None:
    """The copy is complete when the target holds every source snapshot with the same guid
    (a guid names one exact snapshot; zfs recv checks the stream's checksums on the way)."""
    src = {s.name: s.guid for s in local.list([dataset]).get(dataset, [])}
    dst = {s.name: s.guid for s in remote.list([dataset]).get(dataset, [])}
    bad = sorted(n for n, g in src.items() if dst.get(n) != g)
    if snap not in src or bad:
        raise MigrationFailed(f"volume '{dataset}' did not arrive complete on node '{remote.node}' "
                              f"(snapshot(s) missing or different: {', '.join(bad) or snap})")  # fmt: skip


def connect(store: Any, name: str, key_path: Any = None, timeout: float | None = None) -> ssh.Connection:
    node = store.get_node(name)
    kw = {} if timeout is None else {"connect_timeout": timeout}
    return ssh.connect_node(node, key_path or ssh_key_path(), **kw)


def migrate(store: Any, vmid: int | str, target: str, node: str, *, echo: Callable[[str], None] | None = None,
            key_path: Any = None) -> MigrateResult:  # fmt: skip
    """Offline migration of guest `vmid` to `target`, run on `node`, the node holding the guest."""
    t0 = time.monotonic()
    vmid, target = check_vmid(vmid), check_node_name(target, "target node name")
    say = echo or (lambda _line: None)
    guest = store.get_guest(vmid)
    store.get_node(target)
    if guest.purge:
        raise MigrationRefused(f"cannot migrate guest {vmid}: it is being removed")
    if guest.node == target:
        raise MigrationRefused(f"guest {vmid} already lives on node '{target}'")
    if guest.node != node:
        raise MigrationRefused(f"guest {vmid} lives on node '{guest.node}': run the migration there, not on node "
                               f"'{node}' (e.g. ssh {guest.node} replq migrate {vmid} {target})")  # fmt: skip
    storages = {s.id: s for s in store.list_storages()}
    volumes = local_volumes(guest, storages, target)
    job = next((j for j in store.list_jobs(vmid) if j.target == target), None)
    if job is not None and job.remove_job:
        raise MigrationRefused(f"cannot migrate guest {vmid}: replication job {job.id} to '{target}' is being "
                               "removed; wait until it is gone")  # fmt: skip
    if job is not None and job.disable:
        raise MigrationRefused(f"cannot migrate guest {vmid}: replication job {job.id} to '{target}' is disabled "
                               f"(replq enable {job.id}), and its replica cannot be overwritten by a full copy")
    replicated: set[str] = set()
    if job is not None:
        rv, _ = planner.replicatable_volumes(((d.volid, d.replicate) for d in guest.disks),
                                             {s.id: (s.type, s.pool or "") for s in storages.values()})  # fmt: skip
        replicated = {v.dataset for v in rv}
    copy = [v for v in volumes if v.dataset not in replicated]
    res = MigrateResult(vmid=vmid, source=node, target=target, mode="full" if job is None else "delta",
                        job=job.id if job else None)  # fmt: skip
    with guest_locks(store, vmid, "migrate") as lease:
        try:
            conn = connect(store, target, key_path)
        except (NodeUnreachable, ConnectionLost, HostKeyMismatch) as exc:
            raise MigrationRefused(f"cannot migrate guest {vmid}: target {exc}") from None
        stall = float(store.get_settings()["stall_timeout"])  # a hung zfs on either side fails the migration
        remote = zfs.Zfs(conn, side="target", timeout=stall)
        local = zfs.Zfs(zfs.LocalRunner(node=node), side="source", timeout=stall)
        try:
            pools = sorted({v.pool for v in copy})
            there, here = remote.list(pools), local.list(pools)
            missing = [v.dataset for v in copy if v.dataset not in here]
            if missing:
                raise MigrationRefused(f"cannot migrate guest {vmid}: volume(s) {', '.join(missing)} do not exist "
                                       f"on node '{node}'")  # fmt: skip
            clash = [v.dataset for v in copy if v.dataset in there]
            if clash:
                raise MigrationRefused(f"cannot migrate guest {vmid}: volume(s) {', '.join(clash)} already exist on "
                                       f"node '{target}' (no replica of a job to it): refusing to overwrite")
            if job is not None:
                say(f"replication job {job.id}: sending the delta to {target}")
                lease.check(f"sending the delta of job {job.id}")
                run = Replication(store, job.id, node, echo=echo, take_lock=False, lease=lease, cancel=lease.lost,
                                  key_path=key_path).run()
                if not run.ok:
                    raise MigrationFailed(f"cannot migrate guest {vmid}: replication job {job.id} failed: {run.error}; "
                                          f"the guest stays on node '{node}'")  # fmt: skip
                res.bytes += run.bytes
            _copy_and_move(store, res, copy, local, remote, conn, say, lease)
            # The disks on the target are the guest's live ones now, writable; the old node's
            # replicated disks are the replica of the job that targets it now (SPEC §10 markers).
            since = int(time.time())
            guard.mark_live(remote, [v.dataset for v in volumes], vmid, since, say)
            if job is not None:
                for ds in sorted(replicated):
                    guard.mark_replica(local, ds, vmid, job.id, target, say)
        finally:
            conn.close()
    res.duration = round(time.monotonic() - t0, 3)
    return res


def _copy_and_move(store: Any, res: MigrateResult, copy: list[planner.Volume], local: zfs.Zfs, remote: zfs.Zfs,
                   conn: ssh.Connection, say: Callable[[str], None],
                   lease: Lease) -> None:  # fmt: skip
    """Full copies (checked), then the guest moves; the source copies go only after that."""
    snap = MIGRATE_SNAPSHOT.format(epoch=int(time.time()))
    snapped: list[str] = []
    tried: list[str] = []
    sent_snaps: dict[str, list[planner.Snapshot]] = {}
    try:
        for v in copy:
            local.snapshot(v.dataset, snap)
            snapped.append(v.dataset)
        # What each copy carries, by guid: after a failure only a copy proven to be ours is deleted.
        sent_snaps = local.list([v.dataset for v in copy])
        for v in copy:
            say(f"{v.volid}: full copy of {v.dataset}@{snap} to {res.target}")
            lease.check(f"copying {v.dataset} to {res.target}")
            tried.append(v.dataset)
            sent = _send_full(conn, res.source, v.dataset, snap, remote.timeout or 600.0, lease)
            _verify(local, remote, v.dataset, snap)
            say(f"{v.volid}: {sent} bytes sent, every snapshot arrived with the same guid")
            res.bytes += sent
            res.copied.append(v.dataset)
        lease.check(f"moving guest {res.vmid} to {res.target}")
        changes = commit_switch(store, res.vmid, res.target, move_from=res.source)
    except BaseException as exc:
        for ds in tried:
            sent = sent_snaps.get(ds, [])
            guid = next((s.guid for s in sent if s.name == snap), 0)
            try:
                lease.check(f"deleting the copy of {ds} on {res.target}")
                guard.destroy_own_copy(remote, ds, sent, snap, guid, say, timeout=CLEANUP_STEP)
            except ReplqError as undo:
                res.warnings.append(f"could not delete the copy '{ds}' on {res.target}: {undo}")
        for ds in snapped:
            with contextlib.suppress(ReplqError):
                local.destroy_snapshot(ds, snap)
        if isinstance(exc, ReplqError) and not isinstance(exc, MigrationRefused | MigrationFailed):
            raise MigrationFailed(f"cannot migrate guest {res.vmid}: {exc}; the guest stays on node "
                                  f"'{res.source}'") from None  # fmt: skip
        raise
    res.switched = [{"id": after.id, "target": after.target, "source": after.source} for _, after in changes]
    say(f"guest {res.vmid} now lives on node '{res.target}'")
    for before, after in changes:
        if before.target != after.target:
            say(f"replication job {after.id}: direction switched, now {after.source} => {after.target}")
    for v in copy:
        try:
            lease.check(f"deleting the old volume {v.dataset} on {res.source}")
            local.destroy_dataset(v.dataset)
            res.removed.append(v.dataset)
            say(f"{v.volid}: source volume {v.dataset} deleted on {res.source}")
        except ReplqError as exc:
            res.warnings.append(f"could not delete the old volume '{v.dataset}' on {res.source}: {exc}")
        with contextlib.suppress(ReplqError):
            remote.destroy_snapshot(v.dataset, snap)


__all__ = ["migrate", "MigrateResult", "MigrationRefused", "MigrationFailed", "guest_locks", "local_volumes",
           "connect"]
