"""Migration, guest recovery and the direction switch of replication jobs (SPEC §6).

- `migrate()`: offline migration, run in this process on the node that holds the guest (like
  `qm migrate`; the CLI refuses elsewhere). With a job to the target, that job runs once more
  (only the delta is sent); the guest then moves and its jobs switch direction in one store
  transaction. Without one, every local volume is sent in full, checked on the target (every
  snapshot there with the same guid), the guest moves, and only then are the source volumes
  destroyed. Until the guest record moves, nothing on the source is changed but snapshots,
  so a failure at any step leaves the guest usable where it was.
- `guest_move()`: manual recovery of a guest stuck on a failed node (the seed's "move the guest
  configuration files"): refused while the old node answers (split brain), unless forced.
- `lazy_switch()`: called by the engine when a job finds its guest on a node other than its
  `source` (moved by `guest move` or an HA manager): the job switches direction and goes on
  incrementally from the newest common replication snapshot (plan.choose_base).

Job state lives in the cluster store, not on a node, so it moves with the guest by itself: a
switched job keeps its last_sync and continues from that snapshot.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from replq import plan as planner
from replq import ssh, zfs
from replq.context import ssh_key_path
from replq.errors import Conflict, ReplqError, ServiceError
from replq.locks import Heartbeat
from replq.model import Job, check_node_name, check_vmid, job_id_sort_key, trusted
from replq.store import GuestChange

CHUNK = 1 << 20
MIGRATE_SNAPSHOT = "__migrate_{epoch}__"
PING_TIMEOUT = 2.0
SSH_PROBE_TIMEOUT = 5.0


class MigrationRefused(ReplqError):
    """The migration or move cannot start; nothing was changed."""


class MigrationFailed(ServiceError):
    """A step failed; the guest stays where it was (what was started is undone)."""


# ---------------------------------------------------------------------------------- switch


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


def held_bases(store: Any, vmid: int, job_id: str, listing: dict[str, Sequence[planner.Snapshot]]
               ) -> dict[tuple[str, str], str]:  # fmt: skip
    """Source snapshots that another job of the guest still needs as its base: {(dataset, name): job}.

    After a move, a job that has not synced from this node yet (its last_sync snapshot is not
    here) goes on from the newest replication snapshot here that is not newer than its last sync:
    its target received that one with the last sync's -R stream. Deleting it (say, the first job
    to run after the move cleaning up its previous snapshot) would leave that job without a common
    base, so it is kept until the job has synced from here. One snapshot per such job and volume.
    """
    out: dict[tuple[str, str], str] = {}
    for other in store.list_jobs(vmid):
        if other.id == job_id or other.remove_job:
            continue
        last = int(store.get_state(other.id).last_sync or 0)
        if not last:
            continue
        own = planner.snapshot_name(other.id, last)
        for ds, snaps in listing.items():
            if any(s.name == own for s in snaps):
                continue  # synced from here: its own snapshot is its base
            older = [s for s in snaps if s.replication is not None and s.creation <= last]
            if older:
                best = max(older, key=lambda s: (s.creation, (s.replication or ("", 0))[1]))
                out[(ds, best.name)] = other.id
    return out


# ---------------------------------------------------------------------------------- locks


def _running(store: Any, vmid: int) -> str:
    for job_id in store.job_ids(vmid):
        st = store.get_state(job_id)
        if st.worker:
            return f"replication job {job_id} is running ({st.worker})"
    return "a replication of it is running (guest locked)"


@contextlib.contextmanager
def guest_locks(store: Any, vmid: int, what: str) -> Iterator[threading.Event]:
    """The migrate lock and the guest lock, extended by a heartbeat: no job of the guest starts
    (beat skips a locked guest; the engine refuses) while the guest is migrated or moved.
    Yields an event that is set if the locks were lost meanwhile: the guest must not move then."""
    from replq.replicate import LOCK_TTL

    mlock = store.lock("migrate", vmid, LOCK_TTL)
    if not mlock.acquire(blocking=False):
        raise MigrationRefused(f"cannot {what} guest {vmid}: a migration of it is already running")
    glock = store.lock("guest", vmid, LOCK_TTL)
    if not glock.acquire(blocking=False):
        with contextlib.suppress(Exception):
            mlock.release()
        raise MigrationRefused(f"cannot {what} guest {vmid}: {_running(store, vmid)}; try again when it has finished "
                               f"(the lock of a dead node expires within {LOCK_TTL:.0f} s)")  # fmt: skip
    with Heartbeat([mlock, glock], LOCK_TTL, name=f"migrate-lock-{vmid}") as beat:
        yield beat.lost


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


def _local_volumes(guest: Any, storages: dict[str, Any], target: str, what: str = "migrate") -> list[planner.Volume]:
    """Every volume of the guest on local ZFS (replicate=0 included: it must move too)."""
    out = []
    for d in guest.disks:
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


def _send_full(conn: ssh.Connection, node: str, dataset: str, snap: str) -> int:
    """`zfs send -Rp dataset@snap` here into `zfs recv dataset` on the connected node (no -F:
    it never overwrites), through the engine's send pipeline."""
    from replq.replicate import send_stream

    sent, _ = send_stream(conn, zfs.send_argv(dataset, snap), zfs.recv_argv(dataset, incremental=False),
                          source=node, dataset=dataset)
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
    from replq.replicate import Replication

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
    volumes = _local_volumes(guest, storages, target)
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
    with guest_locks(store, vmid, "migrate") as lock_lost:
        try:
            conn = connect(store, target, key_path)
        except (ssh.NodeUnreachable, ssh.ConnectionLost, ssh.HostKeyMismatch) as exc:
            raise MigrationRefused(f"cannot migrate guest {vmid}: target {exc}") from None
        remote = zfs.Zfs(conn, side="target")
        local = zfs.Zfs(zfs.LocalRunner(node=node), side="source")
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
                run = Replication(store, job.id, node, echo=echo, take_lock=False, key_path=key_path).run()
                if not run.ok:
                    raise MigrationFailed(f"cannot migrate guest {vmid}: replication job {job.id} failed: {run.error}; "
                                          f"the guest stays on node '{node}'")  # fmt: skip
                res.bytes += run.bytes
            _copy_and_move(store, res, copy, local, remote, conn, say, lock_lost)
        finally:
            conn.close()
    res.duration = round(time.monotonic() - t0, 3)
    return res


def _copy_and_move(store: Any, res: MigrateResult, copy: list[planner.Volume], local: zfs.Zfs, remote: zfs.Zfs,
                   conn: ssh.Connection, say: Callable[[str], None],
                   lock_lost: threading.Event | None = None) -> None:  # fmt: skip
    """Full copies (checked), then the guest moves; the source copies go only after that."""
    snap = MIGRATE_SNAPSHOT.format(epoch=int(time.time()))
    snapped: list[str] = []
    created: list[str] = []
    try:
        for v in copy:
            local.snapshot(v.dataset, snap)
            snapped.append(v.dataset)
        for v in copy:
            say(f"{v.volid}: full copy of {v.dataset}@{snap} to {res.target}")
            created.append(v.dataset)
            sent = _send_full(conn, res.source, v.dataset, snap)
            _verify(local, remote, v.dataset, snap)
            say(f"{v.volid}: {sent} bytes sent, every snapshot arrived with the same guid")
            res.bytes += sent
            res.copied.append(v.dataset)
        if lock_lost is not None and lock_lost.is_set():
            raise MigrationFailed(f"cannot migrate guest {res.vmid}: its lock was lost while Redis was away "
                                  f"(a job of the guest may have started); the guest stays on node '{res.source}'")
        changes = commit_switch(store, res.vmid, res.target, move_from=res.source)
    except BaseException as exc:
        for ds in created:
            try:
                remote.destroy_dataset(ds)
            except ReplqError as undo:
                res.warnings.append(f"could not delete the partial copy '{ds}' on {res.target}: {undo}")
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
            local.destroy_dataset(v.dataset)
            res.removed.append(v.dataset)
            say(f"{v.volid}: source volume {v.dataset} deleted on {res.source}")
        except ReplqError as exc:
            res.warnings.append(f"could not delete the old volume '{v.dataset}' on {res.source}: {exc}")
        with contextlib.suppress(ReplqError):
            remote.destroy_snapshot(v.dataset, snap)


# ---------------------------------------------------------------------------------- guest move


def node_answers(store: Any, name: str, redis_url: str | None = None, key_path: Any = None) -> str | None:
    """Why node `name` is considered alive, or None when it does not answer: its replq worker
    replies to a Celery ping, or (no worker) its SSH server accepts our login."""
    from replq.app import make_app, worker_hostname

    app = make_app(redis_url)
    try:
        replies = app.control.ping(destination=[worker_hostname(name)], timeout=PING_TIMEOUT, limit=1)
    except Exception as exc:  # noqa: BLE001 - cannot ask: do not assume the node is dead
        return f"its worker could not be asked ({exc.__class__.__name__}: {exc})"
    finally:
        app.close()
    if replies:
        return f"its replq worker '{worker_hostname(name)}' answers a ping"
    try:
        conn = connect(store, name, key_path, timeout=SSH_PROBE_TIMEOUT)
    except ssh.HostKeyMismatch:
        return "no worker answers, but something answers SSH at its address (with another host key)"
    except (ssh.NodeUnreachable, ssh.ConnectionLost):
        return None
    conn.close()
    return f"no worker answers, but its SSH server ({conn.host}:{conn.port}) does"


@dataclass
class MoveResult:
    vmid: int
    source: str
    target: str
    forced: bool
    reason: str | None  # why the old node was considered alive (when forced)
    jobs: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def guest_move(store: Any, vmid: int | str, to: str, force: bool = False, *, redis_url: str | None = None,
               key_path: Any = None) -> MoveResult:  # fmt: skip
    """Record that guest `vmid` lives on `to` now (recovery from a failed node). Its jobs switch
    direction at their next run (lazy_switch), from the newest common replication snapshot."""
    vmid, to = check_vmid(vmid), check_node_name(to)
    guest = store.get_guest(vmid)
    store.get_node(to)
    old = guest.node
    if old == to:
        raise MigrationRefused(f"guest {vmid} already lives on node '{to}'")
    with guest_locks(store, vmid, "move"):
        alive = node_answers(store, old, redis_url, key_path)
        if alive and not force:
            raise MigrationRefused(
                f"refusing to move guest {vmid}: node '{old}' still answers ({alive}); the guest may still run "
                f"there and moving it would split the brain. Stop it there and use 'replq migrate', or use --force "
                f"only if '{old}' is fenced"
            )
        if not force:
            _check_replicas(store, guest, to, key_path)
        store.set_guest_node(vmid, to)
    res = MoveResult(vmid=vmid, source=old, target=to, forced=force, reason=alive)
    for job in store.list_jobs(vmid):
        # What the job will do at its next run (lazy_switch), and how old the data on `to` is.
        target = (job.source or old) if job.target == to else job.target
        res.jobs.append({"id": job.id, "source": to, "target": target, "last_sync": store.get_state(job.id).last_sync
                         or None})  # fmt: skip
    return res


def _check_replicas(store: Any, guest: Any, to: str, key_path: Any) -> None:
    """The guest can only start on `to` if its volumes are there (replicas of a job)."""
    storages = {s.id: s for s in store.list_storages()}
    volumes = _local_volumes(guest, storages, to, "move")
    if not volumes:
        return
    try:
        conn = connect(store, to, key_path, timeout=SSH_PROBE_TIMEOUT)
    except (ssh.NodeUnreachable, ssh.ConnectionLost, ssh.HostKeyMismatch) as exc:
        raise MigrationRefused(f"cannot check the replicas of guest {guest.vmid}: {exc} (--force skips the check)") \
            from None
    try:
        listing = zfs.Zfs(conn, side="target").list(sorted({v.pool for v in volumes}))
    finally:
        conn.close()
    missing = [v.volid for v in volumes if v.dataset not in listing]
    if missing:
        raise MigrationRefused(f"refusing to move guest {guest.vmid}: node '{to}' has no copy of {', '.join(missing)} "
                               "(no replication job to it?); --force moves it anyway")  # fmt: skip


__all__ = ["migrate", "guest_move", "lazy_switch", "commit_switch", "switched", "node_answers", "MigrateResult",
           "MoveResult", "MigrationRefused", "MigrationFailed"]
