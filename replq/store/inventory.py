"""The cluster inventory in the store: nodes (with pinned host keys), storages and guests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from replq.errors import Conflict, NotFound
from replq.model import (
    Disk,
    Guest,
    Job,
    Node,
    Storage,
    check_host_key,
    check_node_name,
    check_storage_id,
    check_vmid,
    host_key_fingerprint,
    job_id_sort_key,
    trusted,
)
from replq.store.keys import StoreBase, _dec, _enc, _json


@dataclass(frozen=True)
class GuestChange:
    """What a guest-wide change writes: the guest's new node (None: stays) and changed jobs."""

    node: str | None
    jobs: Sequence[Job]
    result: Any = None


class InventoryStore(StoreBase):
    # ---- nodes --------------------------------------------------------------------------
    def add_node(self, node: Node) -> bool:
        """Add a node; True if added, False if it exists identically. A differing re-add is refused
        (the host key is pinned at first add)."""
        key = self.k("node", node.name)

        def fn(pipe: Any) -> bool:
            raw = pipe.hgetall(key)
            if raw:
                old = self._node(raw)
                if old.host_key and node.host_key and old.host_key != node.host_key:
                    raise Conflict(
                        f"node '{node.name}' already exists with a different pinned host key "
                        f"({host_key_fingerprint(old.host_key)}; offered {host_key_fingerprint(node.host_key)})"
                    )
                if (old.address, old.user) != (node.address, node.user):
                    raise Conflict(f"node '{node.name}' already exists (address {old.address}, user {old.user})")
                if old.host_key or not node.host_key:
                    return False
                # Known node without a pinned key yet: pin the one offered now.
            pipe.multi()
            pipe.hset(key, mapping=_enc(node.to_dict()))
            pipe.sadd(self.k("nodes"), node.name)
            return True

        return self._tx(fn, key)

    def get_node(self, name: str) -> Node:
        name = check_node_name(name)
        raw = self.redis.hgetall(self.k("node", name))
        if not raw:
            raise NotFound(f"no such cluster node '{name}'")
        return self._node(raw)

    def list_nodes(self) -> list[Node]:
        names = sorted(self.redis.smembers(self.k("nodes")))
        pipe = self.redis.pipeline(transaction=False)
        for n in names:
            pipe.hgetall(self.k("node", n))
        return [self._node(r) for r in pipe.execute() if r]

    def set_node_host_key(self, name: str, key: str) -> None:
        """Pin a host key; refuse to change a pinned one (that is what pinning is for)."""
        name = check_node_name(name)
        host_key = check_host_key(key)
        nkey = self.k("node", name)

        def fn(pipe: Any) -> None:
            raw = pipe.hgetall(nkey)
            if not raw:
                raise NotFound(f"no such cluster node '{name}'")
            old = self._node(raw)
            if old.host_key and old.host_key != host_key:
                raise Conflict(
                    f"host key of node '{name}' is pinned ({host_key_fingerprint(old.host_key)}); "
                    f"refusing {host_key_fingerprint(host_key)}"
                )
            pipe.multi()
            pipe.hset(nkey, "host_key", json.dumps(host_key))

        self._tx(fn, nkey)

    def remove_node(self, name: str) -> None:
        name = check_node_name(name)
        nkey, gkey, tkey = self.k("node", name), self.k("nodeguests", name), self.k("nodetargets", name)

        def fn(pipe: Any) -> None:
            if not pipe.exists(nkey):
                raise NotFound(f"no such cluster node '{name}'")
            guests = sorted(int(v) for v in pipe.smembers(gkey))
            if guests:
                raise Conflict(f"node '{name}' still holds guest(s) {', '.join(map(str, guests))}")
            jobs = sorted(pipe.smembers(tkey), key=job_id_sort_key)
            if jobs:
                raise Conflict(f"replication job '{jobs[0]}' targets node '{name}' - Please remove that first")
            pipe.multi()
            pipe.delete(nkey, gkey, tkey)
            pipe.srem(self.k("nodes"), name)

        self._tx(fn, nkey, gkey, tkey)

    # ---- storages -----------------------------------------------------------------------
    def add_storage(self, storage: Storage) -> None:
        key = self.k("storage", storage.id)
        node_keys = [self.k("node", n) for n in storage.nodes or []]

        def fn(pipe: Any) -> None:
            if pipe.exists(key):
                raise Conflict(f"storage ID '{storage.id}' already defined")
            for n, nk in zip(storage.nodes or [], node_keys, strict=True):
                if not pipe.exists(nk):
                    raise NotFound(f"no such cluster node '{n}'")
            pipe.multi()
            pipe.hset(key, mapping=_enc(storage.to_dict()))
            pipe.sadd(self.k("storages"), storage.id)

        self._tx(fn, key, *node_keys)

    def get_storage(self, sid: str) -> Storage:
        sid = check_storage_id(sid)
        raw = self.redis.hgetall(self.k("storage", sid))
        if not raw:
            raise NotFound(f"storage '{sid}' does not exist")
        return trusted(Storage, **_dec(raw))

    def list_storages(self) -> list[Storage]:
        return list(self._storages(self.redis).values())

    def remove_storage(self, sid: str) -> None:
        """Remove a storage definition; guests' disks on it are then skipped by replication (SPEC §5.3)."""
        sid = check_storage_id(sid)
        key = self.k("storage", sid)

        def fn(pipe: Any) -> None:
            if not pipe.exists(key):
                raise NotFound(f"storage '{sid}' does not exist")
            pipe.multi()
            pipe.delete(key)
            pipe.srem(self.k("storages"), sid)

        self._tx(fn, key)

    # ---- guests -------------------------------------------------------------------------
    def add_guest(self, guest: Guest) -> None:
        key, nkey = self.k("guest", guest.vmid), self.k("node", guest.node)
        sids = sorted({d.storage for d in guest.disks if d.storage})

        def fn(pipe: Any) -> None:
            raw = pipe.hgetall(key)
            if raw:
                what = "is being removed" if self._guest(raw).purge else "already exists"
                raise Conflict(f"guest {guest.vmid} {what}")
            if not pipe.exists(nkey):
                raise NotFound(f"no such cluster node '{guest.node}'")
            for sid in sids:
                if not pipe.exists(self.k("storage", sid)):
                    raise NotFound(f"storage '{sid}' does not exist")
            pipe.multi()
            pipe.hset(key, mapping=_enc(guest.to_dict()))
            pipe.sadd(self.k("guests"), guest.vmid)
            pipe.sadd(self.k("nodeguests", guest.node), guest.vmid)

        self._tx(fn, key, nkey, *[self.k("storage", s) for s in sids])

    def set_guest_disks(self, vmid: int | str, disks: Sequence[Disk]) -> Guest:
        """Replace a guest's disk list (a disk added, removed or marked replicate=0): its jobs
        follow at their next run (a volume no longer wanted loses its replica on the target)."""
        vmid = check_vmid(vmid)
        key = self.k("guest", vmid)
        sids = sorted({d.storage for d in disks if d.storage})

        def fn(pipe: Any) -> Guest:
            raw = pipe.hgetall(key)
            if not raw:
                raise NotFound(f"guest '{vmid}' does not exist")
            old = self._guest(raw)
            if old.purge:
                raise Conflict(f"guest {vmid} is being removed")
            for sid in sids:
                if not pipe.exists(self.k("storage", sid)):
                    raise NotFound(f"storage '{sid}' does not exist")
            new = Guest(vmid, old.node, old.type, list(disks))
            pipe.multi()
            pipe.hset(key, mapping=_enc({"disks": new.to_dict()["disks"]}))
            return new

        return self._tx(fn, key, *[self.k("storage", s) for s in sids])

    def get_guest(self, vmid: int | str) -> Guest:
        vmid = check_vmid(vmid)
        raw = self.redis.hgetall(self.k("guest", vmid))
        if not raw:
            raise NotFound(f"guest '{vmid}' does not exist")
        return self._guest(raw)

    def list_guests(self) -> list[Guest]:
        vmids = sorted(int(v) for v in self.redis.smembers(self.k("guests")))
        pipe = self.redis.pipeline(transaction=False)
        for v in vmids:
            pipe.hgetall(self.k("guest", v))
        return [self._guest(r) for r in pipe.execute() if r]

    def set_guest_node(self, vmid: int, node: str) -> None:
        """Record that the guest now lives on `node` (migration, recovery)."""
        vmid, node = check_vmid(vmid), check_node_name(node)
        key, nkey = self.k("guest", vmid), self.k("node", node)

        def fn(pipe: Any) -> None:
            raw = pipe.hgetall(key)
            if not raw:
                raise NotFound(f"guest '{vmid}' does not exist")
            if not pipe.exists(nkey):
                raise NotFound(f"no such cluster node '{node}'")
            old = self._guest(raw).node
            pipe.multi()
            pipe.hset(key, "node", json.dumps(node))
            pipe.srem(self.k("nodeguests", old), vmid)
            pipe.sadd(self.k("nodeguests", node), vmid)

        self._tx(fn, key, nkey)

    def change_guest_and_jobs(self, vmid: int | str, decide: Callable[[Guest, dict[str, Job]], GuestChange]) -> Any:
        """Read a guest and its jobs under WATCH, let the pure `decide(guest, jobs)` say what changes
        (the guest's new node, changed jobs), and write all of it in one transaction (migration,
        direction switch). Returns `decide`'s result value."""
        vmid = check_vmid(vmid)
        gkey, jkey = self.k("guest", vmid), self.k("guestjobs", vmid)

        def fn(pipe: Any) -> Any:
            raw = pipe.hgetall(gkey)
            if not raw:
                raise NotFound(f"guest '{vmid}' does not exist")
            guest = self._guest(raw)
            ids = sorted(pipe.smembers(jkey), key=job_id_sort_key)
            if ids:
                pipe.watch(*[self.k("job", j) for j in ids])
            jobs = {j: self._job(r) for j in ids if (r := pipe.hgetall(self.k("job", j)))}
            change = decide(guest, jobs)
            move = change.node is not None and change.node != guest.node
            if move and not pipe.exists(self.k("node", change.node)):
                raise NotFound(f"no such cluster node '{change.node}'")
            pipe.multi()
            if move:
                pipe.hset(gkey, "node", json.dumps(change.node))
                pipe.srem(self.k("nodeguests", guest.node), vmid)
                pipe.sadd(self.k("nodeguests", change.node), vmid)
            for after in change.jobs:
                before, key = jobs[after.id], self.k("job", after.id)
                pipe.hset(key, "cfg", _json(after.config()))
                if before.target != after.target:
                    pipe.srem(self.k("nodetargets", before.target), after.id)
                    pipe.sadd(self.k("nodetargets", after.target), after.id)
                pipe.hincrby(key, "_rev", 1)  # a bulk reindex must not overwrite this write
            return change.result

        return self._tx(fn, gkey, jkey)

    def remove_guest(self, vmid: int | str, purge: bool = False, now: float | None = None) -> list[str]:
        """Remove a guest. Refused while it has jobs, unless purge: then every job is marked
        remove_job=full and the guest record stays (flagged purge) until its last job is removed,
        so the cleanup still knows where the guest's volumes are. Returns the jobs marked."""
        vmid = check_vmid(vmid)
        key, jkey = self.k("guest", vmid), self.k("guestjobs", vmid)
        now = time.time() if now is None else now

        def fn(pipe: Any) -> list[str]:
            raw = pipe.hgetall(key)
            if not raw:
                raise NotFound(f"guest '{vmid}' does not exist")
            guest = self._guest(raw)
            jobs = sorted(pipe.smembers(jkey), key=job_id_sort_key)
            if jobs and not purge:
                raise Conflict(f"There is a replication job '{jobs[0]}' for guest '{vmid}' - Please remove that first")
            pipe.watch(*[self.k("job", j) for j in jobs], *[self.k("state", j) for j in jobs], self.k("settings"))
            settings = self._settings(pipe)
            marked = []
            for j in jobs:
                job = self._job(pipe.hgetall(self.k("job", j)))
                job.remove_job = "full"
                marked.append((job, self._state(pipe.get(self.k("state", j)))))
            pipe.multi()
            if not jobs:
                pipe.delete(key, jkey)
                pipe.srem(self.k("guests"), vmid)
                pipe.srem(self.k("nodeguests", guest.node), vmid)
                return []
            pipe.hset(key, "purge", "true")
            for job, state in marked:
                pipe.hset(self.k("job", job.id), "cfg", _json(job.config()))
                self._queue_index(pipe, job, state, settings, now)
            return [j.id for j, _ in marked]

        return self._tx(fn, key, jkey)

