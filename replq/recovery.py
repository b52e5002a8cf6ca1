"""`replq guest move`: recovery of a guest stuck on a failed node (SPEC §6), the seed's "move the
guest configuration files" step.

It records that the guest lives on another node now. Before it does, without --force:

- the old node must be dead: no worker heartbeat within the cluster's liveness window, and no
  SSH handshake with its pinned host key (a refused login means the node runs); the guest might
  still run there, and moving it would split the brain;
- the new node must hold a copy of every disk.

Afterwards the disks on the new node are marked live and writable (best effort: its first run marks them too);
the jobs switch direction at their next run (direction.lazy_switch) and never roll back data
newer than their common base (replicate.py, safety.divergence). The decision is pure
(safety.node_alive).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from replq import guard, safety, ssh, zfs
from replq.context import ssh_key_path
from replq.errors import ConnectionLost, HostKeyMismatch, MigrationRefused, NodeUnreachable, ReplqError
from replq.jobrun import CLEANUP_STEP
from replq.migrate import connect, guest_locks, local_volumes
from replq.model import check_node_name, check_vmid

SSH_PROBE_TIMEOUT = 5.0


def node_alive(store: Any, name: str, key_path: Any = None) -> str | None:
    """Why node `name` is alive, in words, or None when nothing says so (safety.node_alive): its
    worker's heartbeat in the store, and what answers SSH at its address."""
    window = float(store.get_settings()["liveness_window"])
    heartbeat = store.heartbeats().get(name)
    node = store.get_node(name)
    probe = ssh.node_connection(node, key_path or ssh_key_path(), connect_timeout=SSH_PROBE_TIMEOUT).probe()
    return safety.node_alive(heartbeat, time.time(), window, probe)


@dataclass
class MoveResult:
    vmid: int
    source: str
    target: str
    forced: bool
    reason: str | None  # why the old node was considered alive (when forced)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def guest_move(store: Any, vmid: int | str, to: str, force: bool = False, *, key_path: Any = None) -> MoveResult:
    """Record that guest `vmid` lives on `to` now (recovery from a failed node). Its jobs switch
    direction at their next run (lazy_switch), from the newest common replication snapshot."""
    vmid, to = check_vmid(vmid), check_node_name(to)
    guest = store.get_guest(vmid)
    store.get_node(to)
    old = guest.node
    if old == to:
        raise MigrationRefused(f"guest {vmid} already lives on node '{to}'")
    with guest_locks(store, vmid, "move") as lease:
        alive = node_alive(store, old, key_path)
        if alive and not force:
            raise MigrationRefused(
                f"refusing to move guest {vmid}: node '{old}' is alive ({alive}); the guest may still run there "
                f"and moving it would split the brain. Stop it there and use 'replq migrate', or use --force only "
                f"if '{old}' is fenced"
            )
        if not force:
            _check_replicas(store, guest, to, key_path)
        lease.check(f"moving guest {vmid} to {to}")
        store.set_guest_node(vmid, to)
    res = MoveResult(vmid=vmid, source=old, target=to, forced=force, reason=alive)
    _mark_live(store, guest, to, key_path, res.warnings.append)
    for job in store.list_jobs(vmid):
        # What the job will do at its next run (lazy_switch), and how old the data on `to` is.
        target = (job.source or old) if job.target == to else job.target
        res.jobs.append({"id": job.id, "source": to, "target": target, "last_sync": store.get_state(job.id).last_sync
                         or None})  # fmt: skip
    return res


def _check_replicas(store: Any, guest: Any, to: str, key_path: Any) -> None:
    """The guest can only start on `to` if its volumes are there (replicas of a job)."""
    volumes = local_volumes(guest, {s.id: s for s in store.list_storages()}, to, "move")
    if not volumes:
        return
    try:
        conn = connect(store, to, key_path, timeout=SSH_PROBE_TIMEOUT)
    except (NodeUnreachable, ConnectionLost, HostKeyMismatch) as exc:
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


def _mark_live(store: Any, guest: Any, to: str, key_path: Any, warn: Callable[[str], None]) -> None:
    """The replicas on `to` are the guest's live disks now: writable, marked live (best effort: the
    first run from `to` marks them too)."""
    volumes = local_volumes(guest, {s.id: s for s in store.list_storages()}, to, "move")
    if not volumes:
        return
    try:
        conn = connect(store, to, key_path, timeout=SSH_PROBE_TIMEOUT)
    except (NodeUnreachable, ConnectionLost, HostKeyMismatch) as exc:
        warn(f"could not make the disks on '{to}' writable: {exc}; its first replication run does")
        return
    try:
        z = zfs.Zfs(conn, side="target", timeout=CLEANUP_STEP)
        there = z.list(sorted({v.pool for v in volumes}))
        guard.mark_live(z, [v.dataset for v in volumes if v.dataset in there], guest.vmid, int(time.time()), warn)
    except ReplqError as exc:
        warn(f"could not make the disks on '{to}' writable: {exc}; its first replication run does")
    finally:
        conn.close()
