"""Runtime records in the store: routes and queued markers, locks, progress and replication logs."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import redis
import redis.lock

from replq.model import (
    job_id_sort_key,
    parse_job_id,
)
from replq.store.keys import LOCK_KINDS, LOG_MAX_LINES, StoreBase


@dataclass(frozen=True)
class JobRoute:
    """Where a job runs and whether it is busy, for the scheduler's tick."""

    job_id: str
    node: str | None  # the node holding the guest (None: guest or job gone)
    remove: str | None  # remove_job mode, if the job is being removed
    running: bool  # the job lock or the guest lock is held
    queued: bool  # a queued marker exists


class RuntimeStore(StoreBase):
    # ---- worker heartbeats (is a node's worker alive?) --------------------------------------
    def record_heartbeat(self, node: str, now: float) -> None:
        """The worker of `node` is alive at `now` (written every few seconds by the worker)."""
        self.redis.hset(self.k("heartbeats"), node, repr(now))

    def clear_heartbeat(self, node: str) -> None:
        """The worker of `node` stopped cleanly: it is not alive any more."""
        self.redis.hdel(self.k("heartbeats"), node)

    def heartbeats(self) -> dict[str, float]:
        """The last heartbeat of every node's worker, epoch seconds (nodes never seen are absent)."""
        return {n: float(t) for n, t in self.redis.hgetall(self.k("heartbeats")).items()}

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

    # ---- --discard-target-changes for a job's next run ---------------------------------------
    def request_discard(self, job_id: str, ttl: float) -> None:
        """The job's next run (on whichever node's worker) may keep a diverged target aside and
        replicate anyway; the request expires after `ttl` seconds if no run takes it."""
        parse_job_id(job_id)
        self.redis.set(self.k("discard", job_id), "1", px=int(ttl * 1000))

    def take_discard(self, job_id: str) -> bool:
        """Whether --discard-target-changes was asked for this run (the request is used up)."""
        return bool(self.redis.getdel(self.k("discard", job_id)))

    def fencing_token(self) -> str:
        """A new lock token: an increasing counter (orders holders) and a random part (keeps two
        holders distinct even if a failover lost counter increments)."""
        return f"{self.redis.incr(self.k('fence'))}:{uuid.uuid4().hex[:12]}"

    def confirm_locks(self, names: Sequence[str], tokens: Sequence[str], ttl: float) -> bool:
        """True (and every lock extended by `ttl`) if each lock `names[i]` holds `tokens[i]`; atomic."""
        return bool(self._confirm_locks(keys=list(names), args=[int(ttl * 1000), *tokens]))

    def lock(self, kind: str, ident: str | int, ttl: float) -> redis.lock.Lock:
        """A non-reentrant Redis lock usable across threads (acquire(blocking=False), extend, release)."""
        if kind not in LOCK_KINDS:
            raise ValueError(f"unknown lock kind {kind!r}")
        return self.redis.lock(self.k("lock", kind, ident), timeout=ttl, thread_local=False)


