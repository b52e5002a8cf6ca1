"""The store's foundation: the Redis key layout, its Lua scripts and the shared readers.

Only the store package knows Redis keys. Key layout (prefix P, default "replq:"):

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
    P job:<id>              hash  cfg: job config as JSON (set fields only); _rev: bumped by every reindexing write;
                                  _seq: creation order (replication.cfg's section order)
    P jobseq                str   the last job sequence number
    P state:<id>            str   JobState as JSON (without progress)
    P progress:<id>         str   progress of the running job as JSON (frequent writes, kept apart)
    P sched                 zset  job id -> next_sync (absent = never due)
    P settings              hash  cluster settings (settings.py), only those set
    P log:<id>              list  replication log lines of the last run
    P lock:<kind>:<ident>   str   redis-py locks (guest, job, migrate, beat, queued markers); the
                                  engine's hold a fencing token `<P fence>:<random>` (locks.py)
    P fence                 str   counter of fencing tokens
    P heartbeats            hash  node -> epoch of its worker's last heartbeat
    P discard:<id>          str   `run --discard-target-changes` asked for the job's next run (expires)

All values are JSON.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import redis
import redis.lock

from replq import settings
from replq.errors import ValidationError
from replq.model import (
    Disk,
    Guest,
    Job,
    JobState,
    Node,
    Storage,
    show,
    trusted,
)
from replq.redact import redact_url

DEFAULT_PREFIX = "replq:"
LOCK_KINDS = ("guest", "job", "beat", "migrate", "queued")
LOG_MAX_LINES = 10_000
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


# The fencing check (locks.py): every lock still holds its holder's token, then all are extended
# for a full TTL, in one atomic step right before a destructive one.
_CONFIRM_LOCKS = """
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) ~= ARGV[i + 1] then return 0 end
end
for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
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


def _enc(mapping: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v, separators=(",", ":")) for k, v in mapping.items()}


def _dec(raw: dict[str, str]) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in raw.items() if not k.startswith("_")}


def job_digest(job: Job) -> str:
    """SHA-1 of the job's configuration: `update --digest` refuses an edit made on a stale read."""
    return hashlib.sha1(json.dumps(job.config(), sort_keys=True).encode()).hexdigest()


class StoreBase:
    """The connection, key names, transactions and the parsers every part of the store shares."""

    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self.redis = client
        self.prefix = prefix
        self._cas_index = client.register_script(_CAS_INDEX)
        self._set_progress = client.register_script(_SET_PROGRESS)
        self._confirm_locks = client.register_script(_CONFIRM_LOCKS)
        self._read_jobs = client.register_script(_READ_JOBS)
        self._members = client.register_script("return cjson.encode(redis.call('SMEMBERS', KEYS[1]))")

    @classmethod
    def from_url(cls, url: str, prefix: str = DEFAULT_PREFIX) -> Any:
        try:
            return cls(redis.Redis.from_url(url, decode_responses=True), prefix)
        except ValueError as exc:
            raise ValidationError(f"invalid Redis URL '{show(redact_url(url))}': {exc}") from None

    # ---- keys ---------------------------------------------------------------------------
    def k(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    def _tx(self, fn: Callable[[redis.client.Pipeline], Any], *watch: str) -> Any:
        """Run fn under WATCH; fn reads (immediate mode), validates, then pipe.multi() and queues writes."""
        return self.redis.transaction(fn, *watch, value_from_callable=True)

    @staticmethod
    def _node(raw: dict[str, str]) -> Node:
        return trusted(Node, **_dec(raw))

    @staticmethod
    def _guest(raw: dict[str, str]) -> Guest:

        d = _dec(raw)
        d["disks"] = [trusted(Disk, **x) for x in d.get("disks", [])]
        return trusted(Guest, **d)

    @staticmethod
    def _job(raw: dict[str, str]) -> Job:
        return trusted(Job, **json.loads(raw["cfg"]))

    @staticmethod
    def _state(raw: str | None, progress: str | None = None) -> JobState:
        st = trusted(JobState, **json.loads(raw)) if raw else JobState()
        if progress:
            st.progress = json.loads(progress)
        return st

    def _storages(self, client: Any) -> dict[str, Storage]:
        ids = sorted(client.smembers(self.k("storages")))
        out = {}
        for sid in ids:  # few storages per cluster: plain reads also work inside WATCH
            raw = client.hgetall(self.k("storage", sid))
            if raw:
                out[sid] = trusted(Storage, **_dec(raw))
        return out

    def _settings(self, client: Any) -> dict[str, Any]:
        return settings.with_defaults(_dec(client.hgetall(self.k("settings"))))

    def get_settings(self) -> dict[str, Any]:
        return self._settings(self.redis)

