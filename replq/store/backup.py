"""The whole cluster read in one consistent snapshot (backup), and written back in one transaction
(restore), fast enough for 100,000 jobs.

Both sides let the server do the per-key work: a read is one MULTI of Lua calls that return
whole sets of hashes as one JSON text each; a restore is one MULTI of calls to `_WRITE`, a
tiny interpreter of HSET/SADD/ZADD/SET operations, each call carrying thousands of them. So
redis-py parses a few hundred replies instead of millions, and the restore is all or nothing:
a refusal, a concurrent change (WATCH) or a lost connection before EXEC writes nothing.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from replq import schedule, settings
from replq.backup import Cluster
from replq.errors import Conflict
from replq.model import STATE_FIELDS, Job, JobState, Storage, trusted
from replq.store.keys import READ_CHUNK, StoreBase, _dec, _enc

# Every hash whose name is ARGV[1] .. a member of the set KEYS[1], as one JSON list of flat
# [field, value, ...] lists (members whose hash is gone are left out).
_READ_HASHES = """
local out = {}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local h = redis.call('HGETALL', ARGV[1] .. m)
  if #h > 0 then out[#out + 1] = h end
end
if #out == 0 then return '[]' end
return cjson.encode(out)
"""

# A batch of writes: ARGV[1] is a JSON list of commands, each [NAME, key, args...] for NAME one of
# HSET, SADD, ZADD, SET. One JSON text per call: packing it costs redis-py one argument, not thousands.
_WRITE = """
local allowed = {HSET = true, SADD = true, ZADD = true, SET = true}
for _, cmd in ipairs(cjson.decode(ARGV[1])) do
  if not allowed[cmd[1]] then return redis.error_reply('replq restore: unexpected command ' .. tostring(cmd[1])) end
  redis.call(unpack(cmd))
end
return #ARGV[1]
"""

WRITE_CHUNK = 20_000  # values per _WRITE call
MEMBERS_CHUNK = 2_000  # members per SADD/ZADD (Lua's unpack stops at a few thousand values)
_ENCODER = json.JSONEncoder(separators=(",", ":"))  # as keys._json writes, without building one per value
STORED_STATE = tuple(f for f in STATE_FIELDS if f != "progress")
# What a forced restore keeps: locks (a running job's) and worker heartbeats.
KEPT = ("lock:", "heartbeats")


class _Writes:
    """Write commands for `_WRITE`, cut into calls of about WRITE_CHUNK values."""

    def __init__(self) -> None:
        self.calls: list[list[list[str]]] = [[]]
        self.size = 0
        self.sets: dict[str, list[str]] = defaultdict(list)
        self.scores: dict[str, list[str]] = defaultdict(list)

    def _cmd(self, cmd: list[str]) -> None:
        if self.size + len(cmd) > WRITE_CHUNK and self.calls[-1]:
            self.calls.append([])
            self.size = 0
        self.calls[-1].append(cmd)
        self.size += len(cmd)

    def hset(self, key: str, mapping: dict[str, str]) -> None:
        self._cmd(["HSET", key, *(x for kv in mapping.items() for x in kv)])

    def set(self, key: str, value: str) -> None:
        self._cmd(["SET", key, value])

    def sadd(self, key: str, member: str) -> None:
        self.sets[key].append(member)

    def zadd(self, key: str, member: str, score: float) -> None:
        self.scores[key] += [repr(score), member]

    def finish(self) -> list[str]:
        """The calls' arguments: one JSON text each."""
        for key, members in self.sets.items():
            for i in range(0, len(members), MEMBERS_CHUNK):
                self._cmd(["SADD", key, *members[i: i + MEMBERS_CHUNK]])
        for key, pairs in self.scores.items():
            for i in range(0, len(pairs), 2 * MEMBERS_CHUNK):
                self._cmd(["ZADD", key, *pairs[i: i + 2 * MEMBERS_CHUNK]])
        return [_ENCODER.encode(c) for c in self.calls if c]


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


class BackupStore(StoreBase):
    def read_cluster(self, with_state: bool = False) -> Cluster:
        """The whole cluster as of one moment (one MULTI): nodes, storages, guests, jobs, the settings
        set (not defaults), and with_state each job's state."""
        read_hashes = self.redis.register_script(_READ_HASHES)
        ids = self.job_ids()
        pipe = self.redis.pipeline(transaction=True)
        for kind, key in (("node", "nodes"), ("storage", "storages"), ("guest", "guests")):
            read_hashes(keys=[self.k(key)], args=[self.k(kind, "")], client=pipe)
        pipe.hgetall(self.k("settings"))
        for chunk in _chunks(ids, READ_CHUNK):
            self._read_jobs(args=[self.prefix, *chunk], client=pipe)
        nodes, storages, guests, stored, *job_chunks = pipe.execute()

        def hashes(text: str) -> list[dict[str, str]]:
            return [dict(zip(h[::2], h[1::2], strict=True)) for h in json.loads(text)]

        cluster = Cluster(
            nodes=sorted((self._node(h) for h in hashes(nodes)), key=lambda n: n.name),
            storages=sorted((trusted(Storage, **_dec(h)) for h in hashes(storages)), key=lambda s: s.id),
            guests=sorted((self._guest(h) for h in hashes(guests)), key=lambda g: g.vmid),
            settings={k: v for k, v in _dec(stored).items() if k in settings.SETTINGS},
            states={} if with_state else None,
        )
        for text in job_chunks:
            for cfg, st, _progress, _score in json.loads(text):
                job = trusted(Job, **cfg)
                cluster.jobs.append(job)
                if cluster.states is not None and st:  # a job that never ran has no state to keep
                    cluster.states[job.id] = trusted(JobState, **st)
        return cluster

    def cluster_size(self, client: Any = None) -> dict[str, int]:
        """How many nodes, storages, guests, jobs and settings the store holds."""
        c = client or self.redis
        return {"nodes": c.scard(self.k("nodes")), "storages": c.scard(self.k("storages")),
                "guests": c.scard(self.k("guests")), "jobs": c.scard(self.k("jobs")),
                "settings": c.hlen(self.k("settings"))}

    def restore_cluster(self, cluster: Cluster, force: bool = False, now: float | None = None) -> None:
        """Write a validated backup (backup.parse) in one transaction, next_sync indexed. Refused
        if the store already holds a cluster, unless force: then everything of the old cluster
        but its locks and heartbeats is removed in the same transaction."""
        now = time.time() if now is None else now
        calls = self._restore_writes(cluster, now)
        write = self.redis.register_script(_WRITE)
        top = [self.k(k) for k in ("nodes", "storages", "guests", "jobs", "settings")]

        def fn(pipe: Any) -> None:
            size = self.cluster_size(pipe)
            if any(size.values()) and not force:
                held = ", ".join(f"{k}: {n}" for k, n in size.items() if n)
                raise Conflict(f"the store already holds a cluster ({held}); restore refuses to replace it "
                               "(--force replaces it)")
            old = self._cluster_keys(pipe) if force else []
            pipe.multi()
            for chunk in _chunks(old, 1000):
                pipe.unlink(*chunk)
            for text in calls:
                write(args=[text], client=pipe)

        self._tx(fn, *top)

    def _cluster_keys(self, client: Any) -> list[str]:
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix) + "*"
        kept = tuple(self.prefix + k for k in KEPT)
        return [k for k in client.scan_iter(match=pattern, count=10_000) if not k.startswith(kept)]

    def _restore_writes(self, cluster: Cluster, now: float) -> list[str]:
        w = _Writes()
        for node in cluster.nodes:
            w.hset(self.k("node", node.name), _enc(node.to_dict()))
            w.sadd(self.k("nodes"), node.name)
        for st in cluster.storages:
            w.hset(self.k("storage", st.id), _enc(st.to_dict()))
            w.sadd(self.k("storages"), st.id)
        for g in cluster.guests:
            w.hset(self.k("guest", g.vmid), _enc(g.to_dict()))
            w.sadd(self.k("guests"), str(g.vmid))
            w.sadd(self.k("nodeguests", g.node), str(g.vmid))
        if cluster.settings:
            w.hset(self.k("settings"), _enc(cluster.settings))
        values = settings.with_defaults(cluster.settings)
        retry, tz = values["retry_interval"], values["timezone"]
        fresh, states = JobState(), cluster.states or {}
        p, encode = self.prefix, _ENCODER.encode  # 100,000 jobs: no per-call encoder or key joining
        for job in cluster.jobs:
            state = states.get(job.id, fresh)
            w.hset(f"{p}job:{job.id}", {"cfg": encode(job.config()), "_rev": "1"})
            w.sadd(f"{p}jobs", job.id)
            w.sadd(f"{p}guestjobs:{job.guest}", job.id)
            w.sadd(f"{p}nodetargets:{job.target}", job.id)
            if state is not fresh:  # stored as update_state stores it: every field but progress
                w.set(f"{p}state:{job.id}", encode({f: getattr(state, f) for f in STORED_STATE}))
            ns = schedule.next_sync(job, state, retry, tz, now)
            if ns is not None:
                w.zadd(f"{p}sched", job.id, ns)
        return w.finish()
