"""`replq guest move`: recovery of a guest stuck on a failed node (SPEC §6), the seed's "move the
guest configuration files" step.

It records that the guest lives on another node now. Before it does, without --force:

- the old node must be dead: no worker heartbeat within the cluster's liveness window, and no
  SSH handshake with its pinned host key (a refused login means the node runs); the guest might
  still run there, and moving it would split the brain;
- the new node must hold a copy of every disk, and no other node a newer one: the jobs of the
  guest then go on from the new node, and the newer replica would be the one to lose data.

Without --to it names the node with the freshest replicas and moves nothing. Afterwards the
disks on the new node are marked live and writable (best effort: its first run marks them too);
the jobs switch direction at their next run (direction.lazy_switch) and never roll back data
newer than their common base (replicate.py, safety.divergence). The decisions are pure
(safety.node_alive, safety.fresher).
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


def replicas(store: Any, guest: Any, nodes: list[str], key_path: Any) -> tuple[list[safety.Replica], dict[str, str]]:
    """The newest replication snapshot of each of the guest's disks on each node, and the nodes
    that could not be asked (node: why)."""
    storages = {s.id: s for s in store.list_storages()}
    found: list[safety.Replica] = []
    silent: dict[str, str] = {}
    for node in nodes:
        volumes = local_volumes(guest, storages, node, "move")
        if not volumes:
            continue
        try:
            conn = connect(store, node, key_path, timeout=SSH_PROBE_TIMEOUT)
        except (NodeUnreachable, ConnectionLost, HostKeyMismatch) as exc:
            silent[node] = str(exc)
            continue
        try:
            listing = zfs.Zfs(conn, side="target", timeout=60).list(sorted({v.pool for v in volumes}))
        except ReplqError as exc:
            silent[node] = str(exc)
            continue
        finally:
            conn.close()
        found += [safety.newest_replica(node, v.dataset, listing[v.dataset], guest.vmid)
                  for v in volumes if v.dataset in listing]
    return found, silent


def _age(r: safety.Replica, now: float) -> str:
    return f"synced {safety.age_text(now - r.snapshot.creation)} ago" if r.snapshot else "no replication snapshot"


def _check_replicas(store: Any, guest: Any, to: str, key_path: Any) -> None:
    """The guest can start on `to` only if its disks are there, and moving it there must not make
    a newer replica on another node the one to be overwritten."""
    volumes = local_volumes(guest, {s.id: s for s in store.list_storages()}, to, "move")
    if not volumes:
        return
    others = sorted({j.target for j in store.list_jobs(guest.vmid)} - {to, guest.node})
    found, silent = replicas(store, guest, [to, *others], key_path)
    if to in silent:
        raise MigrationRefused(f"cannot check the replicas of guest {guest.vmid}: {silent[to]} (--force skips the "
                               "check)")  # fmt: skip
    missing = [v.volid for v in volumes if not any(r.node == to and r.dataset == v.dataset for r in found)]
    if missing:
        raise MigrationRefused(f"refusing to move guest {guest.vmid}: node '{to}' has no copy of {', '.join(missing)} "
                               "(no replication job to it?); --force moves it anyway")  # fmt: skip
    now = time.time()
    newer = safety.fresher(found, to)
    if newer:
        theirs, mine = newer[0]
        raise MigrationRefused(
            f"refusing to move guest {guest.vmid} to '{to}': node '{theirs.node}' holds a newer replica of "
            f"{theirs.dataset} ({_age(theirs, now)}; '{to}' {_age(mine, now)}), which the jobs would overwrite "
            f"from '{to}'. Move it there (replq guest move {guest.vmid} --to {theirs.node}), or use --force to "
            f"accept losing what only '{theirs.node}' has"
        )
    if silent:
        node, why = sorted(silent.items())[0]
        raise MigrationRefused(f"refusing to move guest {guest.vmid} to '{to}': cannot tell whether node '{node}' "
                               f"holds a newer replica ({why}); --force moves it anyway")  # fmt: skip


def propose(store: Any, vmid: int | str, key_path: Any = None) -> dict[str, Any]:
    """`guest move VMID` without --to: the node with the freshest replicas (nothing is moved)."""
    guest = store.get_guest(check_vmid(vmid))
    nodes = sorted({j.target for j in store.list_jobs(guest.vmid)} - {guest.node})
    found, silent = replicas(store, guest, nodes, key_path)
    now = time.time()
    return {"vmid": guest.vmid, "node": guest.node, "freshest": safety.freshest_node(found),
            "replicas": [{"node": r.node, "dataset": r.dataset, "snapshot": r.snapshot.name if r.snapshot else None,
                          "age": _age(r, now)} for r in found],
            "unreachable": silent}


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
