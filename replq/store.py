"""The cluster store: configuration, job state, schedule index, logs and locks in Redis.

The only module that knows Redis keys. Key layout (prefix P, default "replq:"):

    P nodes                 set   node names
    P node:<name>           hash  name, address, user, host_key
    P nodeguests:<name>     set   vmids of guests living on the node
    P nodetargets:<name>    set   job ids targeting the node
    P storages              set   storage ids
    P storage:<id>          hash  id, type, pool, nodes, enabled
    P guests                set   vmids
    P guest:<vmid>          hash  vmid, node, type, disks, purge
    P guestjobs:<vmid>      set   job ids of the guest
    P jobs                  set   job ids
    P job:<id>              hash  cfg: job config as JSON (set fields only); _rev: bumped by every reindexing write
    P state:<id>            str   JobState as JSON (without progress)
    P progress:<id>         str   progress of the running job as JSON (frequent writes, kept apart)
    P sched                 zset  job id -> next_sync (absent = never due)
    P settings              hash  retry_interval, timezone
    P log:<id>              list  replication log lines of the last run
    P lock:<kind>:<ident>   str   redis-py locks (guest, job)

All values are JSON. Every rule that spans keys (unique id, one job per guest and
target, references between objects, digests) is checked inside WATCH/MULTI, so concurrent
clients cannot both win; validation happens before anything is queued, so a refusal writes
nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.lock

from replq import schedule
from replq.errors import Conflict, NotFound, ServiceError, ValidationError
from replq.model import (
    DEFAULT_SCHEDULE,
    DELETABLE,
    STATE_FIELDS,
    UPDATABLE,
    Disk,
    Guest,
    Job,
    JobState,
    Node,
    Storage,
    check_host_key,
    check_node_name,
    check_state_fields,
    check_storage_id,
    check_vmid,
    host_key_fingerprint,
    job_id_sort_key,
    parse_job_id,
    replicatable_volumes,
    show,
    trusted,
)

DEFAULT_PREFIX = "replq:"
LOCK_KINDS = ("guest", "job", "beat", "migrate", "queued")
LOG_MAX_LINES = 10_000
SETTINGS_DEFAULTS: dict[str, Any] = {"retry_interval": schedule.DEFAULT_RETRY_INTERVAL}
REINDEX_CHUNK = 1000

# Write next_sync for jobs whose revision is unchanged since it was computed (bulk reindex
# must not overwrite what a concurrent writer indexed in between).
_CAS_INDEX = """
local n = 0
for i = 1, #ARGV, 3 do
  local id, rev, score = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local cur = redis.call('HGET', KEYS[1] .. id, '_rev')
  if (cur or '0') == rev then
    if score == 'never' then redis.call('ZREM', KEYS[2], id) else redis.call('ZADD', KEYS[2], score, id) end
    n = n + 1
  end
end
return n
"""

# Progress is frequent and does not move next_sync: one round trip, never recreating a deleted job.
_SET_PROGRESS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] == '' then redis.call('DEL', KEYS[2]) else redis.call('SET', KEYS[2], ARGV[1]) end
return 1
"""


# Status of 10,000 jobs: redis-py's pure-Python reply parser costs microseconds per reply element,
# so the server joins the stored JSON texts of a chunk of jobs into one reply, parsed once by the
# C json module.
_READ_JOBS = """
local p, out = ARGV[1], {}
for i = 2, #ARGV do
  local id = ARGV[i]
  local cfg = redis.call('HGET', p .. 'job:' .. id, 'cfg')
  if cfg then
    out[#out + 1] = '[' .. cfg .. ',' .. (redis.call('GET', p .. 'state:' .. id) or 'null') .. ','
      .. (redis.call('GET', p .. 'progress:' .. id) or 'null') .. ','
      .. (redis.call('ZSCORE', p .. 'sched', id) or 'null') .. ']'
  end
end
return '[' .. table.concat(out, ',') .. ']'
"""
READ_CHUNK = 2000


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True)
class JobRoute:
    """Where a job runs and whether it is busy, for the scheduler's tick."""

    job_id: str
    node: str | None  # the node holding the guest (None: guest or job gone)
    remove: str | None  # remove_job mode, if the job is being removed
    running: bool  # the job lock or the guest lock is held
    queued: bool  # a queued marker exists


@dataclass(frozen=True)
class GuestChange:
    """What a guest-wide change writes: the guest's new node (None: stays) and changed jobs."""

    node: str | None
    jobs: Sequence[Job]
    result: Any = None


def _enc(mapping: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v, separators=(",", ":")) for k, v in mapping.items()}


def _dec(raw: dict[str, str]) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in raw.items() if not k.startswith("_")}


def job_digest(job: Job) -> str:
    """SHA-1 of the job's configuration: `update --digest` refuses an edit made on a stale read."""
    return hashlib.sha1(json.dumps(job.config(), sort_keys=True).encode()).hexdigest()


class Store:
    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self.redis = client
        self.prefix = prefix
        self._cas_index = client.register_script(_CAS_INDEX)
        self._set_progress = client.register_script(_SET_PROGRESS)
        self._read_jobs = client.register_script(_READ_JOBS)
        self._members = client.register_script("return cjson.encode(redis.call('SMEMBERS', KEYS[1]))")

    @classmethod
    def from_url(cls, url: str, prefix: str = DEFAULT_PREFIX) -> Store:
        try:
            return cls(redis.Redis.from_url(url, decode_responses=True), prefix)
        except ValueError as exc:
            raise ValidationError(f"invalid Redis URL '{show(url)}': {exc}") from None

    # ---- keys ---------------------------------------------------------------------------
    def k(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    def _tx(self, fn: Callable[[redis.client.Pipeline], Any], *watch: str) -> Any:
        """Run fn under WATCH; fn reads (immediate mode), validates, then pipe.multi() and queues writes."""
        return self.redis.transaction(fn, *watch, value_from_callable=True)

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

    @staticmethod
    def _node(raw: dict[str, str]) -> Node:
        return trusted(Node, **_dec(raw))

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

    def _storages(self, client: Any) -> dict[str, Storage]:
        ids = sorted(client.smembers(self.k("storages")))
        out = {}
        for sid in ids:  # few storages per cluster: plain reads also work inside WATCH
            raw = client.hgetall(self.k("storage", sid))
            if raw:
                out[sid] = trusted(Storage, **_dec(raw))
        return out

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
    @staticmethod
    def _guest(raw: dict[str, str]) -> Guest:
        from replq.model import Disk

        d = _dec(raw)
        d["disks"] = [trusted(Disk, **x) for x in d.get("disks", [])]
        return trusted(Guest, **d)

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

    # ---- jobs ---------------------------------------------------------------------------
    @staticmethod
    def _job(raw: dict[str, str]) -> Job:
        return trusted(Job, **{"schedule": DEFAULT_SCHEDULE, **json.loads(raw["cfg"])})

    @staticmethod
    def _state(raw: str | None, progress: str | None = None) -> JobState:
        st = trusted(JobState, **json.loads(raw)) if raw else JobState()
        if progress:
            st.progress = json.loads(progress)
        return st

    def create_job(self, job: Job, now: float | None = None) -> None:
        self.create_jobs([job], now)

    def check_new_jobs(self, jobs: Sequence[Job], client: Any = None, tz: str | None = None) -> None:
        """Everything SPEC §2 requires of new jobs, against the store as it is (no writes)."""
        c = client or self.redis
        tz = tz or self._settings(c)["timezone"]
        storages = self._storages(c)
        pairs: dict[tuple[int, str], str] = {}
        ids: set[str] = set()
        for job in jobs:
            job.validate(tz)
            if job.id in ids or c.exists(self.k("job", job.id)):
                raise Conflict(f"replication job '{job.id}' already exists")
            ids.add(job.id)
            graw = c.hgetall(self.k("guest", job.guest))
            if not graw:
                raise NotFound(f"guest '{job.guest}' does not exist")
            guest = self._guest(graw)
            if guest.purge:
                raise Conflict(f"guest {guest.vmid} is being removed")
            if not c.exists(self.k("node", job.target)):
                raise NotFound(f"no such cluster node '{job.target}'")
            if job.target == guest.node:
                raise ValidationError("Source and target must not be identical")
            if job.source is not None and not c.exists(self.k("node", job.source)):
                raise NotFound(f"no such cluster node '{job.source}'")
            if not replicatable_volumes(guest, storages):
                raise ValidationError("No replicatable volumes found")
            if (job.guest, job.target) not in pairs:
                for other in c.smembers(self.k("guestjobs", job.guest)):
                    cfg = c.hget(self.k("job", other), "cfg")
                    if cfg is not None:
                        pairs[(job.guest, json.loads(cfg)["target"])] = other
            if (job.guest, job.target) in pairs:
                raise Conflict(f"replication job for guest '{job.guest}' to target '{job.target}' already exists")
            pairs[(job.guest, job.target)] = job.id

    def create_jobs(self, jobs: Sequence[Job], now: float | None = None) -> None:
        """Create jobs all or nothing (config import uses this for a whole file)."""
        now = time.time() if now is None else now
        watch = {self.k("settings"), self.k("storages")}
        for job in jobs:
            watch |= {self.k("job", job.id), self.k("guest", job.guest), self.k("guestjobs", job.guest),
                      self.k("node", job.target)}
            if job.source:
                watch.add(self.k("node", job.source))

        def fn(pipe: Any) -> None:
            settings = self._settings(pipe)
            self.check_new_jobs(jobs, pipe, settings["timezone"])
            pipe.multi()
            for job in jobs:
                pipe.delete(self.k("job", job.id), self.k("state", job.id), self.k("progress", job.id),
                            self.k("log", job.id))
                pipe.hset(self.k("job", job.id), "cfg", _json(job.config()))
                pipe.sadd(self.k("jobs"), job.id)
                pipe.sadd(self.k("guestjobs", job.guest), job.id)
                pipe.sadd(self.k("nodetargets", job.target), job.id)
                self._queue_index(pipe, job, JobState(), settings, now)

        self._tx(fn, *sorted(watch))

    def get_job(self, job_id: str) -> Job:
        parse_job_id(job_id)
        raw = self.redis.hgetall(self.k("job", job_id))
        if not raw:
            raise NotFound(f"replication job '{job_id}' does not exist")
        return self._job(raw)

    def job_ids(self, guest: int | None = None) -> list[str]:
        key = self.k("jobs") if guest is None else self.k("guestjobs", check_vmid(guest))
        # One JSON reply instead of one reply element per id (10,000 ids: 5 ms instead of 20).
        text = self._members(keys=[key])
        return sorted(json.loads(text) if text != "{}" else [], key=job_id_sort_key)

    def list_jobs(self, guest: int | None = None) -> list[Job]:
        ids = self.job_ids(guest)
        pipe = self.redis.pipeline(transaction=False)
        for j in ids:
            pipe.hgetall(self.k("job", j))
        return [self._job(r) for r in pipe.execute() if r]

    def jobs_with_state(self, guest: int | None = None) -> list[tuple[Job, JobState, float | None]]:
        """Every job with its state and next_sync (status): one script call per 2,000 jobs, each a
        consistent snapshot of those jobs."""
        ids = self.job_ids(guest)
        out = []
        for i in range(0, len(ids), READ_CHUNK):
            text = self._read_jobs(args=[self.prefix, *ids[i : i + READ_CHUNK]])
            for cfg, st, progress, score in json.loads(text):
                state = trusted(JobState, **st) if st else JobState()
                if progress is not None:
                    state.progress = progress
                out.append((trusted(Job, **cfg), state, score))
        return out

    def update_job(self, job_id: str, changes: dict[str, Any] | None = None, delete: Iterable[str] = (),
                   digest: str | None = None, now: float | None = None) -> Job:
        """Change and/or unset job properties; target is fixed; a stale digest is refused."""
        parse_job_id(job_id)
        changes = dict(changes or {})
        delete = list(delete)
        for k in list(changes) + delete:
            if k == "target":
                raise ValidationError("can't change fixed property 'target'")
            if k not in UPDATABLE:
                raise ValidationError(f"unknown job property '{show(k)}'")
        for k in delete:
            if k not in DELETABLE:
                raise ValidationError(f"cannot delete property '{k}'")
            if k in changes:
                raise ValidationError(f"cannot set and delete property '{k}' at the same time")
        now = time.time() if now is None else now
        key, skey, setkey = self.k("job", job_id), self.k("state", job_id), self.k("settings")

        def fn(pipe: Any) -> Job:
            raw = pipe.hgetall(key)
            if not raw:
                raise NotFound(f"replication job '{job_id}' does not exist")
            old = self._job(raw)
            if digest is not None and digest != job_digest(old):
                raise Conflict("detected modified configuration - file changed by other user? Try again.")
            settings = self._settings(pipe)
            cfg = {**old.config(), **changes}
            for k in delete:
                cfg.pop(k, None)
            new = Job(**cfg)
            new.validate(settings["timezone"])
            if new.source is not None and new.source != old.source and not pipe.exists(self.k("node", new.source)):
                raise NotFound(f"no such cluster node '{new.source}'")
            state = self._state(pipe.get(skey))
            pipe.multi()
            pipe.hset(key, "cfg", _json(new.config()))
            self._queue_index(pipe, new, state, settings, now)
            return new

        return self._tx(fn, key, skey, setkey)

    def mark_remove(self, job_id: str, mode: str = "full", now: float | None = None) -> Job:
        """`delete` (full) / `delete --keep` (local): the job is removed by its next run (SPEC §7)."""
        if mode not in ("full", "local"):
            raise ValidationError(f"remove_job: invalid value '{show(mode)}' (local or full)")
        return self.update_job(job_id, {"remove_job": mode}, now=now)

    def delete_job(self, job_id: str) -> None:
        """Remove config, state, index entry and log at once (delete --force, end of a removal run).
        The last job of a purged guest takes the guest record with it."""
        parse_job_id(job_id)
        key = self.k("job", job_id)
        vmid = job_id_sort_key(job_id)[0]
        gkey, jkey = self.k("guest", vmid), self.k("guestjobs", vmid)

        def fn(pipe: Any) -> None:
            raw = pipe.hgetall(key)
            if not raw:
                raise NotFound(f"replication job '{job_id}' does not exist")
            job = self._job(raw)
            graw = pipe.hgetall(gkey)
            others = pipe.smembers(jkey) - {job_id}
            pipe.multi()
            pipe.delete(key, self.k("state", job_id), self.k("progress", job_id), self.k("log", job_id))
            pipe.srem(self.k("jobs"), job_id)
            pipe.srem(jkey, job_id)
            pipe.srem(self.k("nodetargets", job.target), job_id)
            pipe.zrem(self.k("sched"), job_id)
            if graw and not others and self._guest(graw).purge:
                guest = self._guest(graw)
                pipe.delete(gkey)
                pipe.srem(self.k("guests"), vmid)
                pipe.srem(self.k("nodeguests", guest.node), vmid)

        self._tx(fn, key, gkey, jkey)

    # ---- state --------------------------------------------------------------------------
    def get_state(self, job_id: str) -> JobState:
        parse_job_id(job_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(self.k("state", job_id))
        pipe.get(self.k("progress", job_id))
        return self._state(*pipe.execute())

    def update_state(self, job_id: str, now: float | None = None, **fields: Any) -> JobState:
        """Partial, atomic state update; reindexes the job. Fields are JobState's."""
        return self.replace_states({job_id: fields}, now=now, merge=True)[job_id]

    def replace_states(self, states: dict[str, dict[str, Any]], now: float | None = None,
                       merge: bool = False) -> dict[str, JobState]:
        """Set the states of several jobs at once (set-state); without merge, unlisted fields reset."""
        checked = {}
        for job_id, fields in states.items():
            parse_job_id(job_id)
            checked[job_id] = check_state_fields(fields)
        now = time.time() if now is None else now
        keys = [self.k(kind, j) for j in checked for kind in ("job", "state")]

        def fn(pipe: Any) -> dict[str, JobState]:
            settings = self._settings(pipe)
            work = []
            for job_id, fields in checked.items():
                raw = pipe.hgetall(self.k("job", job_id))
                if not raw:
                    raise NotFound(f"replication job '{job_id}' does not exist")
                base = self._state(pipe.get(self.k("state", job_id))) if merge else JobState()
                state = trusted(JobState, **{**base.to_dict(), **fields})
                work.append((self._job(raw), state, fields))
            pipe.multi()
            for job, state, fields in work:
                stored = state.to_dict()
                stored.pop("progress")
                pipe.set(self.k("state", job.id), _json(stored))
                if "progress" in fields or not merge:
                    if state.progress is None:
                        pipe.delete(self.k("progress", job.id))
                    else:
                        pipe.set(self.k("progress", job.id), _json(state.progress))
                self._queue_index(pipe, job, state, settings, now)
            return {job.id: state for job, state, _ in work}

        return self._tx(fn, self.k("settings"), *keys)

    def set_progress(self, job_id: str, progress: dict | None) -> bool:
        """Publish a running job's progress (bytes, rate, ETA); False if the job no longer exists."""
        parse_job_id(job_id)
        value = "" if progress is None else json.dumps(progress, separators=(",", ":"))
        return bool(self._set_progress(keys=[self.k("job", job_id), self.k("progress", job_id)], args=[value]))

    # ---- replication log ----------------------------------------------------------------
    def clear_log(self, job_id: str) -> None:
        self.redis.delete(self.k("log", job_id))

    def append_log(self, job_id: str, line: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(self.k("log", job_id), line)
        pipe.ltrim(self.k("log", job_id), -LOG_MAX_LINES, -1)
        pipe.execute()

    def read_log(self, job_id: str) -> list[str]:
        return list(self.redis.lrange(self.k("log", job_id), 0, -1))

    # ---- settings -----------------------------------------------------------------------
    def _settings(self, client: Any) -> dict[str, Any]:
        from replq.calendar import system_timezone

        raw = _dec(client.hgetall(self.k("settings")))
        out = {**SETTINGS_DEFAULTS, **raw}
        out.setdefault("timezone", system_timezone())
        return out

    def get_settings(self) -> dict[str, Any]:
        return self._settings(self.redis)

    def set_setting(self, key: str, value: Any, now: float | None = None) -> Any:
        """Set a cluster setting (validated) and recompute every job's next_sync."""
        value = check_setting(key, value)
        if value is None:  # an empty value unsets an optional setting (e.g. turns a hook off)
            self.redis.hdel(self.k("settings"), key)
        else:
            self.redis.hset(self.k("settings"), key, json.dumps(value))
        if key in SCHEDULING_SETTINGS:
            self.reindex_all(now)
        return value

    # ---- schedule index -----------------------------------------------------------------
    def _queue_index(self, pipe: Any, job: Job, state: JobState, settings: dict[str, Any], now: float) -> None:
        ns = schedule.next_sync(job, state, settings["retry_interval"], settings["timezone"], now)
        if ns is None:
            pipe.zrem(self.k("sched"), job.id)
        else:
            pipe.zadd(self.k("sched"), {job.id: ns})
        pipe.hincrby(self.k("job", job.id), "_rev", 1)

    def reindex(self, job_id: str, now: float | None = None) -> float | None:
        """Recompute one job's next_sync from its current config, state and the settings."""
        parse_job_id(job_id)
        now = time.time() if now is None else now
        key, skey = self.k("job", job_id), self.k("state", job_id)

        def fn(pipe: Any) -> float | None:
            raw = pipe.hgetall(key)
            if not raw:
                raise NotFound(f"replication job '{job_id}' does not exist")
            settings = self._settings(pipe)
            job, state = self._job(raw), self._state(pipe.get(skey))
            pipe.multi()
            self._queue_index(pipe, job, state, settings, now)
            return schedule.next_sync(job, state, settings["retry_interval"], settings["timezone"], now)

        return self._tx(fn, key, skey, self.k("settings"))

    def reindex_all(self, now: float | None = None) -> int:
        """Recompute every job's next_sync (after a settings change). Reads are pipelined per chunk;
        a job changed meanwhile is skipped, as its writer indexed it with the new settings."""
        now = time.time() if now is None else now
        settings = self.get_settings()
        ids = self.job_ids()
        done = 0
        for i in range(0, len(ids), REINDEX_CHUNK):
            chunk = ids[i : i + REINDEX_CHUNK]
            pipe = self.redis.pipeline(transaction=True)
            for j in chunk:
                pipe.hgetall(self.k("job", j))
                pipe.get(self.k("state", j))
            res = pipe.execute()
            args: list[Any] = []
            for n, j in enumerate(chunk):
                raw = res[2 * n]
                if not raw:
                    continue
                ns = schedule.next_sync(self._job(raw), self._state(res[2 * n + 1]), settings["retry_interval"],
                                        settings["timezone"], now)
                args += [j, raw.get("_rev", "0"), "never" if ns is None else repr(ns)]
            if args:
                done += int(self._cas_index(keys=[self.k("job", ""), self.k("sched")], args=args))
        return done

    def due_jobs(self, now: float | None = None, limit: int | None = None) -> list[str]:
        """Jobs whose next_sync ≤ now, earliest first: O(log N + due)."""
        now = time.time() if now is None else now
        if limit is not None:
            return list(self.redis.zrangebyscore(self.k("sched"), "-inf", now, start=0, num=limit))
        return list(self.redis.zrangebyscore(self.k("sched"), "-inf", now))

    def next_sync(self, job_id: str) -> float | None:
        return self.redis.zscore(self.k("sched"), job_id)

    # ---- locks --------------------------------------------------------------------------
    # ---- routing and the queued marker (beat, `replq run`, workers) ---------------------
    def job_routes(self, job_ids: Sequence[str]) -> list[JobRoute]:
        """For each job, in one round trip: the node holding its guest, its remove_job mode,
        whether its job or guest lock is held (running) and whether it is queued."""
        if not job_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for j in job_ids:
            vmid = job_id_sort_key(j)[0]
            pipe.hget(self.k("job", j), "cfg")
            pipe.hget(self.k("guest", vmid), "node")
            pipe.exists(self.k("lock", "job", j), self.k("lock", "guest", vmid))
            pipe.exists(self.k("lock", "queued", j))
        res = pipe.execute()
        out = []
        for i, j in enumerate(job_ids):
            cfg, node, held, queued = res[4 * i: 4 * i + 4]
            if cfg and node:
                out.append(JobRoute(j, json.loads(node), json.loads(cfg).get("remove_job"), held > 0, bool(queued)))
            else:
                out.append(JobRoute(j, None, None, held > 0, bool(queued)))
        return out

    def claim_queued(self, tokens: dict[str, str], ttl: float) -> dict[str, str]:
        """Set the queued marker of each job that has none (token: its task id), in one round
        trip; returns the {job_id: token} that won."""
        if not tokens:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for j, token in tokens.items():
            pipe.set(self.k("lock", "queued", j), token, nx=True, px=int(ttl * 1000))
        return {j: t for (j, t), ok in zip(tokens.items(), pipe.execute(), strict=True) if ok}

    def release_queued(self, job_id: str, token: str) -> bool:
        """Drop the job's queued marker if `token` set it (a newer one belongs to another message)."""
        marker = self.lock("queued", job_id, 1)
        try:
            marker.do_release(marker.redis.get_encoder().encode(token))
            return True
        except redis.exceptions.LockError:
            return False

    def defer_queued(self, job_id: str, token: str, seconds: float) -> None:
        """Hold the queued marker for `seconds`: the scheduler leaves the job alone meanwhile."""
        self.redis.set(self.k("lock", "queued", job_id), token, px=int(seconds * 1000))

    def queued_token(self, job_id: str) -> str | None:
        """The task id the job is queued with, if any."""
        return self.redis.get(self.k("lock", "queued", job_id))

    def lock(self, kind: str, ident: str | int, ttl: float) -> redis.lock.Lock:
        """A non-reentrant Redis lock usable across threads (acquire(blocking=False), extend, release)."""
        if kind not in LOCK_KINDS:
            raise ValueError(f"unknown lock kind {kind!r}")
        return self.redis.lock(self.k("lock", kind, ident), timeout=ttl, thread_local=False)


def redis_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn Redis failures into one operator line (ServiceError) for CLI commands."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.exceptions.RedisError as exc:
            raise ServiceError(f"Redis: {exc.__class__.__name__}: {exc}") from None

    return wrapper


def check_setting(key: str, value: Any) -> Any:
    """Validate one cluster setting; returns the typed value."""
    if key == "retry_interval":
        try:
            v = int(str(value).strip())
        except ValueError:
            raise ValidationError(f"retry_interval: invalid integer '{show(value)}' (seconds)") from None
        if not 60 <= v <= 7 * 86400:
            raise ValidationError("retry_interval: value must be between 60 and 604800 seconds")
        return v
    if key == "timezone":
        import zoneinfo

        tz = str(value)
        try:
            if not tz or tz.startswith("/") or ".." in tz:
                raise ValueError(tz)
            zoneinfo.ZoneInfo(tz)
        except (ValueError, zoneinfo.ZoneInfoNotFoundError, OSError):
            raise ValidationError(f"timezone: unknown time zone '{show(tz)}'") from None
        return tz
    if key in OPTIONAL_SETTINGS:
        text = str(value)
        if text.strip() == "":
            return None
        if len(text) > 4096 or any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise ValidationError(f"{key}: control characters or more than 4096 characters")
        return OPTIONAL_SETTINGS[key](text)
    known = ", ".join([*SCHEDULING_SETTINGS, *OPTIONAL_SETTINGS])
    raise ValidationError(f"unknown setting '{show(key)}' (known: {known})")


def _notify_command(text: str) -> str:
    import shlex

    try:
        if not shlex.split(text):
            raise ValueError
    except ValueError:
        raise ValidationError("notify_command: not a command line (unbalanced quotes?)") from None
    return text


def _notify_url(text: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or " " in text:
        raise ValidationError(f"notify_url: not an http(s) URL '{show(text)}'")
    return text


def _positive_int(key: str) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            v = int(text.strip())
        except ValueError:
            v = 0
        if not 1 <= v <= 1_000_000:
            raise ValidationError(f"{key}: must be an integer from 1 to 1000000")
        return v

    return check


def _flower_user(text: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", text):
        raise ValidationError("flower_user: 1-64 characters of letters, digits, _ . @ -")
    return text


def _flower_password(text: str) -> str:
    if len(text) < 8 or ":" in text or " " in text:
        raise ValidationError("flower_password: at least 8 characters, no ':' or spaces")
    return text


# Settings that change next_sync (changing one recomputes the schedule index) ...
SCHEDULING_SETTINGS = ("retry_interval", "timezone")
# ... and optional ones read by the services (empty value = unset).
OPTIONAL_SETTINGS: dict[str, Callable[[str], Any]] = {
    "notify_command": _notify_command,
    "notify_url": _notify_url,
    "notify_every": _positive_int("notify_every"),
    "flower_user": _flower_user,
    "flower_password": _flower_password,
}


__all__ = ["Store", "job_digest", "check_setting", "STATE_FIELDS", "DEFAULT_PREFIX"]
