"""One run of one replication job: the algorithm of SPEC §5, step by step.

    1 lock the guest, record the start      6 snapshot all volumes (all or nothing)
    2 refuse start <= last_sync             7 send -Rp [-I base] → token bucket → SSH → recv -F
    3 resolve the replicatable volumes      8 record last_sync, then delete older snapshots
    4 prepare the target over SSH           9 record the end (fail_count, error, duration, bytes)
    5 plan: base per volume (plan.py)

Everything outside (Redis, zfs, SSH) goes through store.py, zfs.py and ssh.py. Failures
become one operator-facing line in the job state and the replication log.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from replq import plan as planner
from replq import ssh, zfs
from replq.context import ssh_key_path
from replq.errors import ReplqError, ServiceError
from replq.locks import Heartbeat
from replq.throttle import TokenBucket

# A dead engine's guest lock expires this soon; a live one extends it every third of it.
# Tests shorten it (like the runtime's REPLQ_JOB_LOCK_TTL).
LOCK_TTL = float(os.environ.get("REPLQ_GUEST_LOCK_TTL", "30"))
CHUNK = 1 << 20
PIPE_SIZE = 1 << 20
PROGRESS_INTERVAL = 1.0


class JobRefused(ReplqError):
    """The run cannot start (wrong node, disabled, start before last sync, ...)."""


class GuestLocked(ServiceError):
    """Another job of this guest is running (guest lock held)."""


class StorageUnavailable(ReplqError):
    pass


class SendFailed(ServiceError):
    """The local `zfs send` failed or was killed."""


class Cancelled(ServiceError):
    pass


@dataclass
class RunResult:
    job_id: str
    ok: bool
    start: int
    duration: float
    bytes: int = 0
    error: str | None = None
    retryable: bool = False
    plan: dict | None = None


@dataclass
class Progress:
    """Bytes sent, recent rate and the estimated total, published at most once a second."""

    publish: Callable[[dict | None], Any]
    total: int | None = None
    done: int = 0  # bytes of finished volumes
    current: int = 0  # bytes of the volume being sent
    volume: str | None = None
    started: float = field(default_factory=time.monotonic)
    _last: float = 0.0
    _window: list[tuple[float, int]] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return self.done + self.current

    def update(self, current: int, force: bool = False) -> None:
        self.current = current
        now = time.monotonic()
        if not force and now - self._last < PROGRESS_INTERVAL:
            return
        self._last = now
        self._window.append((now, self.sent))
        self._window = [w for w in self._window if now - w[0] <= 10.0][-20:]
        t0, b0 = self._window[0]
        rate = (self.sent - b0) / (now - t0) if now > t0 else None
        eta = None
        if rate and self.total is not None and self.total > self.sent:
            eta = round((self.total - self.sent) / rate, 1)
        record = {
            "bytes": self.sent,
            "total": self.total,
            "rate": round(rate) if rate is not None else None,
            "eta": eta,
            "volume": self.volume,
            "elapsed": round(now - self.started, 1),
        }
        # Progress is advisory: a Redis restart mid-transfer must not fail the replication.
        with contextlib.suppress(redis.exceptions.RedisError, ServiceError):
            self.publish(record)


def log_line(job_id: str, message: str, when: float | None = None) -> str:
    """`YYYY-MM-DD HH:MM:SS J: message` in local time (SPEC §5)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when if when is not None else time.time()))
    return f"{stamp} {job_id}: {message}"


def human(n: int | None) -> str:
    if n is None:
        return "unknown"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


class Replication:
    """One run of job `job_id` on this node (`node`); see the module docstring."""

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
        key_path: str | os.PathLike | None = None,
        cancel: threading.Event | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.node = node
        self.echo = echo
        self.worker = worker or f"{node}:{os.getpid()}"
        self.task_id = task_id
        self.take_lock = take_lock
        self.key_path = key_path
        self.cancel = cancel
        self.clock = clock
        self.switched: str | None = None  # set when this run switched the job's direction (SPEC §6)
        self.local = zfs.Zfs(zfs.LocalRunner(node=node), side="source")
        self.conn: ssh.Connection | None = None
        self.remote: zfs.Zfs | None = None

    # ------------------------------------------------------------------ helpers

    def log(self, message: str) -> None:
        line = log_line(self.job_id, message)
        try:
            self.store.append_log(self.job_id, line)
        except Exception:  # noqa: BLE001 - a log write must never break the run itself
            pass
        if self.echo:
            self.echo(line)

    def _load(self, persist: bool = True) -> tuple[Any, Any]:
        job = self.store.get_job(self.job_id)
        guest = self.store.get_guest(job.guest)
        if guest.node == self.node:
            # The guest was moved (guest move, HA) since the job's last run: switch its direction
            # first, so the live volume is the source and the old node becomes the target (SPEC §6).
            from replq.migrate import lazy_switch

            job, note = lazy_switch(self.store, job, guest, persist=persist)
            self.switched = note or self.switched  # run() loads again for a removal: keep the note
        return job, guest

    def _check_node(self, job: Any, guest: Any) -> None:
        if guest.node != self.node:
            raise JobRefused(
                f"guest {guest.vmid} lives on node '{guest.node}', not on this node '{self.node}': "
                f"run job {self.job_id} there"
            )
        if job.target == guest.node:
            raise JobRefused("Source and target must not be identical")

    def _volumes(self, guest: Any) -> tuple[list[planner.Volume], dict[str, Any]]:
        storages = {s.id: s for s in self.store.list_storages()}
        volumes, _skipped = planner.replicatable_volumes(
            ((d.volid, d.replicate) for d in guest.disks),
            {sid: (s.type, s.pool or "") for sid, s in storages.items()},
        )
        return volumes, storages

    def _connect(self, job: Any) -> zfs.Zfs:
        target = self.store.get_node(job.target)
        key = self.key_path or ssh_key_path()
        self.conn = ssh.connect_node(target, key)
        self.remote = zfs.Zfs(self.conn, side="target")
        return self.remote

    def _check_target_storages(
        self, job: Any, volumes: list[planner.Volume], storages: dict[str, Any], target_listing: dict
    ) -> None:
        for sid in sorted({v.storage for v in volumes}):
            st = storages[sid]
            if not st.available_on(job.target):
                raise StorageUnavailable(f"storage '{sid}' is not available on node '{job.target}'")
            if st.pool not in target_listing:
                raise StorageUnavailable(
                    f"storage '{sid}' is not available on node '{job.target}' (pool '{st.pool}' does not exist there)"
                )

    def _listings(
        self, job: Any, state: Any, volumes: list[planner.Volume], storages: dict[str, Any]
    ) -> tuple[dict, dict]:
        assert self.remote is not None
        pools = sorted({v.pool for v in volumes})
        # Storages used before (storeid_list) are searched too: removed volumes live there.
        old_pools = {
            storages[s].pool for s in (state.storeid_list or []) if s in storages and storages[s].type == "zfspool"
        }
        roots = sorted(set(pools) | {p for p in old_pools if p})
        target = self.remote.list(roots)
        source = self.local.list(roots)
        return source, target

    @contextlib.contextmanager
    def _guest_lock(self, vmid: int) -> Iterator[None]:
        if not self.take_lock:
            yield
            return
        lock = self.store.lock("guest", vmid, LOCK_TTL)
        if not lock.acquire(blocking=False):
            raise GuestLocked(f"guest {vmid} is locked: another replication job of this guest is running")
        # Losing the guest lock (expired while Redis was away) cancels the transfer: another
        # run of this guest may start now.
        if self.cancel is None:
            self.cancel = threading.Event()
        with Heartbeat([lock], LOCK_TTL, on_lost=self.cancel.set, name=f"lock-{vmid}"):
            yield

    # ------------------------------------------------------------------ dry run

    def dry_run(self) -> dict:
        """The plan, with estimated sizes, without changing anything anywhere."""
        job, guest = self._load(persist=False)
        self._check_node(job, guest)
        state = self.store.get_state(self.job_id)
        start = int(self.clock())
        volumes, storages = self._volumes(guest)
        try:
            self._connect(job)
            source, target = self._listings(job, state, volumes, storages)
            self._check_target_storages(job, volumes, storages, target)
            p = planner.make_plan(
                self.job_id, guest.vmid, start, int(state.last_sync or 0) or None, volumes, source, target
            )
        finally:
            self.close()
        out = p.as_dict()
        out["target"] = job.target
        out["source"] = self.node
        out["rate"] = job.rate
        total: int | None = 0
        for vp, vd in zip(p.volumes, out["volumes"], strict=True):
            est = self.local.estimate_send_size(vp.dataset, None, vp.base.name if vp.base else None)
            vd["estimated_size"] = est
            total = None if est is None or total is None else total + est
        out["estimated_size"] = total
        return out

    # ------------------------------------------------------------------ the run

    def run(self) -> RunResult:
        job, guest = self._load()
        self._check_node(job, guest)
        if job.remove_job:
            return self.remove()
        if job.disable:
            raise JobRefused(f"replication job '{self.job_id}' is disabled")
        with self._guest_lock(guest.vmid):
            return self._locked_run(job, guest)

    # ------------------------------------------------------------------ removal (SPEC §7)

    def remove(self) -> RunResult:
        """Clean up a job marked `remove_job`, then delete its config and state.

        full: this job's snapshots on the source, and on the target every volume of the guest
        that carries a snapshot of this job (foreign volumes are never touched); the target
        must be reachable. local (`delete --keep`): the target volumes stay; this job's
        snapshots are removed on the source and, if the target answers, on the target.
        A failure is recorded like a failed run and retried after `retry_interval`.
        """
        job, guest = self._load()
        self._check_node(job, guest)
        if not job.remove_job:
            raise JobRefused(f"replication job '{self.job_id}' is not marked for removal")
        with self._guest_lock(guest.vmid):
            t0 = time.monotonic()
            start = int(self.clock())
            self.store.clear_log(self.job_id)
            self.store.update_state(self.job_id, last_try=start, last_node=self.node, worker=self.worker,
                                    task_id=self.task_id)  # fmt: skip
            self.log(f"start job removal ({job.remove_job})")
            if self.switched:
                self.log(self.switched)
            result = RunResult(job_id=self.job_id, ok=False, start=start, duration=0.0)
            try:
                self._remove(job, guest)
            except Exception as exc:  # noqa: BLE001 - recorded, like a failed run
                result.error = " ".join((str(exc) if isinstance(exc, ReplqError) else repr(exc)).split())
                result.retryable = bool(getattr(exc, "retryable", False))
                result.duration = round(time.monotonic() - t0, 3)
                fails = int(self.store.get_state(self.job_id).fail_count or 0) + 1
                self.store.update_state(self.job_id, fail_count=fails, error=result.error,
                                        duration=result.duration, worker=None, task_id=None)  # fmt: skip
                self.log(f"end job removal with error: {result.error}")
                return result
            finally:
                self.close()
            self.log("end job removal")
            self.store.delete_job(self.job_id)
            result.ok = True
            result.duration = round(time.monotonic() - t0, 3)
            return result

    def _remove(self, job: Any, guest: Any) -> None:
        state = self.store.get_state(self.job_id)
        storages = {s.id: s for s in self.store.list_storages()}
        sids = {d.storage for d in guest.disks if d.storage} | set(state.storeid_list or [])
        pools = sorted({storages[s].pool for s in sids if s in storages and storages[s].type == "zfspool"})

        def job_datasets(listing: dict) -> dict[str, list[str]]:
            out = {}
            for ds, snaps in listing.items():
                names = [x.name for x in snaps if planner.is_job_snapshot(x.name, self.job_id)]
                if names and planner.volname_vmid(ds.rsplit("/", 1)[-1]) == guest.vmid:
                    out[ds] = names
            return out

        try:
            remote = self._connect(job)
            target = job_datasets(remote.list(pools))
        except (ssh.NodeUnreachable, ssh.ConnectionLost):
            if job.remove_job == "full":
                raise
            self.log(f"warning: target node '{job.target}' not reachable: its snapshots stay")
            remote, target = None, {}
        for ds, names in sorted(target.items()):
            assert remote is not None
            if job.remove_job == "full":
                self.log(f"delete volume '{ds}' on {job.target}")
                remote.destroy_dataset(ds)
            else:
                for name in names:
                    self._cleanup(remote, ds, name, job.target)
        from replq.migrate import held_bases

        listing = self.local.list(pools)
        held = held_bases(self.store, guest.vmid, self.job_id, listing)
        for ds, names in sorted(job_datasets(listing).items()):
            for name in names:
                if (ds, name) in held:  # another job's only base after a move (SPEC §6)
                    self.log(f"keep '{ds}@{name}' on {self.node}: base of job {held[(ds, name)]}")
                    continue
                self.local.destroy_snapshot(ds, name)
                self.log(f"delete snapshot '{ds}@{name}' on {self.node}")

    def _locked_run(self, job: Any, guest: Any) -> RunResult:
        t0 = time.monotonic()
        start = int(self.clock())
        state = self.store.get_state(self.job_id)
        self.store.clear_log(self.job_id)
        self.store.update_state(
            self.job_id, last_try=start, last_node=self.node, worker=self.worker, task_id=self.task_id
        )
        self.log("start replication job")
        if self.switched:
            self.log(self.switched)
        progress = Progress(publish=lambda p: self.store.set_progress(self.job_id, p))
        result = RunResult(job_id=self.job_id, ok=False, start=start, duration=0.0)
        try:
            storeids = self._replicate(job, guest, state, start, progress, result)
        except BaseException as exc:
            err = exc if isinstance(exc, ReplqError) else None
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                message = "interrupted"
            elif err is not None:
                message = str(err)
            else:
                message = f"internal error: {exc.__class__.__name__}: {exc}"
            result.error = " ".join(message.split())  # one line
            result.retryable = bool(getattr(err, "retryable", False))
            result.duration = round(time.monotonic() - t0, 3)
            fails = int(self.store.get_state(self.job_id).fail_count or 0) + 1
            with contextlib.suppress(Exception):
                self.store.set_progress(self.job_id, None)
            self.store.update_state(
                self.job_id, fail_count=fails, error=result.error, duration=result.duration,
                bytes=result.bytes, worker=None, task_id=None,
            )  # fmt: skip
            self.log(f"end replication job with error: {result.error}")
            if not isinstance(exc, Exception):
                raise
            return result
        finally:
            self.close()
        result.ok = True
        result.duration = round(time.monotonic() - t0, 3)
        with contextlib.suppress(Exception):
            self.store.set_progress(self.job_id, None)
        self.store.update_state(
            self.job_id, fail_count=0, error=None, duration=result.duration, bytes=result.bytes,
            storeid_list=storeids, worker=None, task_id=None,
        )  # fmt: skip
        if job.source is None:
            # First run: remember where the guest lived (a later difference means it was moved;
            # the direction switch of SPEC §6 is migrate's business, so only an unset source is filled).
            with contextlib.suppress(Exception):
                self.store.update_job(self.job_id, {"source": self.node})
        self.log("end replication job")
        return result

    def _replicate(
        self, job: Any, guest: Any, state: Any, start: int, progress: Progress, result: RunResult
    ) -> list[str]:
        # 2. a clock that went backwards would name a snapshot older than the base
        last_sync = int(state.last_sync or 0)
        if start <= last_sync:
            raise JobRefused("start time before last sync")
        # 3. volumes
        volumes, storages = self._volumes(guest)
        if not volumes:
            raise planner.NoReplicatableVolumes()
        self.log(f"guest => {guest.type} {guest.vmid}, running => {guest.node}")
        self.log(f"volumes => {','.join(v.volid for v in volumes)}")
        # 4. prepare the target
        self.log(f"connecting to target node '{job.target}'")
        remote = self._connect(job)
        source, target = self._listings(job, state, volumes, storages)
        self._check_target_storages(job, volumes, storages, target)
        # 5. plan (raises before anything is touched)
        p = planner.make_plan(self.job_id, guest.vmid, start, last_sync or None, volumes, source, target)
        result.plan = p.as_dict()
        for vp in p.volumes:
            if vp.mode == "full":
                self.log(f"{vp.volume.volid}: full sync (volume not on target)")
            else:
                assert vp.base is not None
                note = " (last_sync snapshot missing, newest common snapshot)" if vp.fallback else ""
                self.log(f"{vp.volume.volid}: incremental sync from {vp.base.name}{note}")
        for vp in p.volumes:
            for name in vp.prune_target:
                self.log(f"delete stale replication snapshot '{vp.dataset}@{name}' on {job.target}")
                remote.destroy_snapshot(vp.dataset, name)
        for ds in p.remove_target_volumes:
            self.log(f"delete volume '{ds}' on {job.target}: no longer replicated")
            remote.destroy_dataset(ds)
        # 6. snapshots, all or nothing
        made: list[str] = []
        try:
            for vp in p.volumes:
                self.local.snapshot(vp.dataset, p.snapshot)
                made.append(vp.dataset)
        except BaseException:
            self._remove_new_snapshots(made, p.snapshot)
            raise
        self.log(f"created snapshot {p.snapshot} on {len(made)} volume(s)")
        # 7. send
        try:
            estimates = [
                self.local.estimate_send_size(vp.dataset, p.snapshot, vp.base.name if vp.base else None)
                for vp in p.volumes
            ]
            progress.total = None if None in estimates else sum(e for e in estimates if e is not None)
            bucket = TokenBucket.from_mbps(job.rate)
            if job.rate:
                self.log(f"rate limit {job.rate:g} MB/s")
            for vp, est in zip(p.volumes, estimates, strict=True):
                self._send_volume(job, vp, p.snapshot, est, bucket, progress, result)
        except BaseException:
            self._remove_new_snapshots(made, p.snapshot)
            raise
        # 8. last_sync first: from here on the new snapshot is the base, whatever happens next
        self.store.update_state(self.job_id, last_sync=start)
        from replq.migrate import held_bases

        held = held_bases(self.store, guest.vmid, self.job_id, {vp.dataset: source[vp.dataset] for vp in p.volumes})
        for vp in p.volumes:
            for name in vp.cleanup_source:
                if (vp.dataset, name) in held:  # another job's base after a move (SPEC §6)
                    self.log(f"keep '{vp.dataset}@{name}' on {self.node}: base of job {held[(vp.dataset, name)]}")
                    continue
                self._cleanup(self.local, vp.dataset, name, self.node)
            for name in vp.cleanup_target:
                self._cleanup(remote, vp.dataset, name, job.target)
        for ds, names in sorted(p.cleanup_source_other.items()):
            for name in names:
                self._cleanup(self.local, ds, name, self.node)
        progress.update(0, force=True)
        return sorted({v.storage for v in volumes})

    def _remove_new_snapshots(self, datasets: list[str], snap: str) -> None:
        for ds in datasets:
            try:
                self.local.destroy_snapshot(ds, snap)
                self.log(f"deleted new snapshot '{ds}@{snap}'")
            except ReplqError as exc:
                # Harmless for the next run (it is sent along or cleaned up), but say so.
                self.log(f"warning: could not delete new snapshot '{ds}@{snap}': {exc}")

    def _cleanup(self, z: zfs.Zfs, dataset: str, name: str, where: str) -> None:
        try:
            z.destroy_snapshot(dataset, name)
            self.log(f"delete previous replication snapshot '{dataset}@{name}' on {where}")
        except ReplqError as exc:
            # The run succeeded; an old snapshot left behind is cleaned up by the next run.
            self.log(f"warning: could not delete '{dataset}@{name}' on {where}: {exc}")

    def _send_volume(
        self,
        job: Any,
        vp: planner.VolumePlan,
        snap: str,
        estimate: int | None,
        bucket: TokenBucket,
        progress: Progress,
        result: RunResult,
    ) -> None:
        assert self.conn is not None and self.remote is not None
        base = vp.base.name if vp.base else None
        what = f"full send of {vp.dataset}@{snap}" if base is None else f"incremental send {base} => {snap}"
        self.log(f"{vp.volume.volid}: {what} (estimated size {human(estimate)})")
        progress.volume = vp.volume.volid
        t0 = time.monotonic()

        def on_bytes(sent: int) -> None:
            progress.update(sent)
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled("replication cancelled")

        try:
            sent, t_stream = send_stream(
                self.conn, zfs.send_argv(vp.dataset, snap, base),
                zfs.recv_argv(vp.dataset, incremental=vp.mode == "incremental"),
                source=self.node, dataset=vp.dataset, bucket=bucket, on_bytes=on_bytes,
                target_error=lambda stderr: self._target_error(vp, stderr),
            )  # fmt: skip
        except BaseException as exc:
            self._undo_target(job, vp, exc)
            raise
        dt = time.monotonic() - t0
        progress.done += sent
        progress.current = 0
        result.bytes += sent
        rate = sent / dt / 1e6 if dt > 0 else 0.0
        self.log(
            f"{vp.volume.volid}: sent {human(sent)} ({sent} bytes) in {dt:.3f} s ({rate:.1f} MB/s; "
            f"stream {t_stream:.3f} s, receive committed {dt - t_stream:.3f} s later)"
        )

    def _target_error(self, vp: planner.VolumePlan, stderr: str) -> zfs.ZfsError:
        assert self.conn is not None
        err = zfs.map_error(stderr, f"receiving {vp.dataset}", self.conn.node, "target")
        if isinstance(err, zfs.NoSpace):
            detail = zfs.first_error_line(stderr)
            return zfs.NoSpace(
                f"no free space left on the replication target storage '{vp.volume.storage}' on node "
                f"'{self.conn.node}' (receiving {vp.dataset}: {detail})",
                stderr,
            )
        return err

    def _undo_target(self, job: Any, vp: planner.VolumePlan, exc: BaseException) -> None:
        """After a failed receive: back to the base (incremental) or no partial volume (full)."""
        if isinstance(exc, ssh.ConnectionLost | ssh.NodeUnreachable):
            self.log(f"target node '{job.target}' not reachable: its partial receive is discarded by zfs")
            return
        remote = self.remote
        if remote is None:
            return
        try:
            if vp.base is None:
                if not vp.target_exists and remote.exists(vp.dataset):
                    remote.destroy_dataset(vp.dataset)
                    self.log(f"deleted partial volume '{vp.dataset}' on {job.target}")
            else:
                remote.rollback(vp.dataset, vp.base.name)
                self.log(f"rolled back '{vp.dataset}' to {vp.base.name} on {job.target}")
        except ReplqError as undo:
            self.log(f"warning: cleanup on {job.target} failed: {undo}")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
            self.remote = None


def send_stream(conn: ssh.Connection, send_argv: list[str], recv_argv: list[str], *, source: str, dataset: str,
                bucket: TokenBucket | None = None, on_bytes: Callable[[int], None] | None = None,
                target_error: Callable[[str], Exception] | None = None) -> tuple[int, float]:
    """`zfs send` here → token bucket → SSH channel → `zfs recv` on the connected node.

    The one send pipeline of replq (runs and migrations). Returns (bytes sent, seconds until the
    stream ended; zfs recv may commit after that). On any failure the sender is stopped as a
    process group and the channel aborted before the exception goes up. `on_bytes(sent)` is
    called after every chunk and may raise to cancel."""
    bucket = bucket or TokenBucket.from_mbps(None)
    target_error = target_error or (lambda stderr: zfs.map_error(stderr, f"receiving {dataset}", conn.node, "target"))
    t0 = time.monotonic()
    errfile = tempfile.TemporaryFile()
    sender = subprocess.Popen(send_argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errfile,
                              start_new_session=True, bufsize=0)  # killed as a group on failure
    stream: ssh.Stream | None = None
    sent = 0
    try:
        assert sender.stdout is not None
        with contextlib.suppress(OSError):
            fcntl.fcntl(sender.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        stream = conn.open_stream(recv_argv)
        buf = bytearray(bucket.chunk_size(CHUNK))
        view = memoryview(buf)
        fd = sender.stdout.fileno()
        while n := os.readv(fd, [buf]):
            bucket.consume(n)
            try:
                stream.write(view[:n])
            except ssh.RemoteExited:
                # zfs recv gave up: its exit status and stderr say why.
                _stop_sender(sender)
                res = stream.finish(timeout=60)
                raise target_error(res.stderr or "zfs recv ended before the stream") from None
            sent += n
            if on_bytes is not None:
                on_bytes(sent)
        t_stream = time.monotonic() - t0
        rc = sender.wait()
        if rc != 0 and not stream.chan.exit_status_ready():
            errfile.seek(0)
            err = errfile.read().decode(errors="replace")
            stream.finish(timeout=60)  # let zfs recv see the end and discard the partial stream
            if rc < 0:
                raise SendFailed(f"zfs send of {dataset} was killed (signal {-rc})")
            raise zfs.map_error(err, f"sending {dataset}", source, "source")
        res = stream.finish()
        if res.returncode != 0:
            raise target_error(res.stderr)
        return sent, t_stream
    except BaseException:
        _stop_sender(sender)
        if stream is not None:
            stream.abort()
        raise
    finally:
        if sender.stdout is not None:
            sender.stdout.close()
        with contextlib.suppress(Exception):
            sender.wait(timeout=10)
        errfile.close()


def _stop_sender(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop `zfs send`: close its pipe first (it exits on SIGPIPE and releases the snapshot
    cleanly; a SIGKILLed zfs-fuse client leaves the snapshot busy in the daemon), then kill
    its process group if it is still there."""
    if proc.stdout is not None:
        with contextlib.suppress(OSError):
            proc.stdout.close()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)


def run_job(store: Any, job_id: str, node: str, **kw: Any) -> RunResult:
    """Run job `job_id` on this node (`node` must hold the guest). Refusals before the run raise."""
    return Replication(store, job_id, node, **kw).run()


def remove_job(store: Any, job_id: str, node: str, **kw: Any) -> RunResult:
    """Clean up and delete job `job_id` marked remove_job (SPEC §7), on the guest's node."""
    return Replication(store, job_id, node, **kw).remove()


def plan_job(store: Any, job_id: str, node: str, **kw: Any) -> dict:
    """The plan of job `job_id` (dry run): full/incremental per volume, base, estimated size."""
    return Replication(store, job_id, node, **kw).dry_run()
