"""One run of one replication job: the algorithm of SPEC §5, step by step.

    1 lock the guest, record the start      6 snapshot all volumes (all or nothing)
    2 refuse start <= last_sync             7 send -Rp [-I base] → token bucket → SSH → recv
    3 resolve the replicatable volumes      8 record last_sync, then delete older snapshots
    4 prepare the target over SSH           9 record the end (fail_count, error, duration, bytes)
    5 plan: base per volume (plan.py)

Everything outside goes through its one door: Redis through the store, zfs through zfs.py,
SSH through ssh.py, the stream through transfer.py; every change of the job's state through
jobstate.py. A job marked for removal is handed to removal.py. Failures become one
operator-facing line in the job state and the replication log.

The log says what pvesr's says, in its words (pve-guest-common PVE/Replication.pm: `guest =>`,
`create snapshot`, `using secure transmission, rate limit:`, `incremental sync`, `delete previous
replication snapshot`, ...), plus replq's own lines where pvesr has none (connecting, estimated
size, bytes sent, rollback of a failed receive, a snapshot kept as another job's base).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from replq import guard, jobstate, safety, transfer, zfs
from replq import plan as planner
from replq.errors import (
    ConnectionLost,
    JobRefused,
    LockLost,
    NodeUnreachable,
    NoSpace,
    ReplqError,
    StorageUnavailable,
    ZfsError,
)
from replq.jobrun import Deadline, JobRun, RunResult
from replq.model import Snapshot, Volume, format_rate, snapshot_name
from replq.output import human_bytes
from replq.removal import Removal
from replq.throttle import TokenBucket


class Replication(JobRun):
    """One run of job `job_id` on this node (`node`); see the module docstring."""

    def run(self) -> RunResult:
        job, guest = self.load()
        self.check_node(job, guest)
        if job.remove_job:
            return self.sibling(Removal).run()
        if job.disable:
            raise JobRefused(f"replication job '{self.job_id}' is disabled")
        with self.guest_lock(guest.vmid):
            self.recheck(job, guest)
            return self._locked_run(job, guest)

    def _check_target_storages(
        self, job: Any, volumes: list[Volume], storages: dict[str, Any], target_listing: dict
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
        self, job: Any, state: Any, volumes: list[Volume], storages: dict[str, Any]
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

    # ------------------------------------------------------------------ dry run

    def dry_run(self) -> dict:
        """The plan, with estimated sizes, without changing anything anywhere."""
        job, guest = self.load(persist=False)
        self.check_node(job, guest)
        state = self.store.get_state(self.job_id)
        start = int(self.clock())
        volumes, storages = self.volumes(guest)
        try:
            self.connect(job)
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

    def _locked_run(self, job: Any, guest: Any) -> RunResult:
        t0 = time.monotonic()
        start = int(self.clock())
        state = self.store.get_state(self.job_id)
        self.discard = self.store.take_discard(self.job_id) or self.discard  # `run --discard-target-changes`
        jobstate.record_job_start(self.store, self.job_id, start, self.node, self.worker, self.task_id)
        self.log("start replication job")
        if self.switched:
            self.log(self.switched)
        progress = transfer.Progress(publish=lambda p: self.store.set_progress(self.job_id, p))
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
            result.error = jobstate.one_line(message)
            result.duration = round(time.monotonic() - t0, 6)
            if not jobstate.try_record_job_end(self.store, self.job_id, error=result.error, duration=result.duration,
                                               bytes=result.bytes):
                result.error += " (the job state could not be recorded: the cluster store is unreachable)"
            self.log(f"end replication job with error: {result.error}")
            if not isinstance(exc, Exception):
                raise
            return result
        finally:
            self.close()
        result.ok = True
        result.duration = round(time.monotonic() - t0, 6)
        jobstate.record_job_end(self.store, self.job_id, error=None, duration=result.duration, bytes=result.bytes,
                                storeids=storeids, kept=self.kept or None)
        if job.source is None:
            # First run: remember where the guest lived (a later difference means it was moved;
            # the direction switch of SPEC §6 is migrate's business, so only an unset source is filled).
            with contextlib.suppress(Exception):
                self.store.update_job(self.job_id, {"source": self.node})
        self.log("end replication job")
        return result

    def _replicate(
        self, job: Any, guest: Any, state: Any, start: int, progress: transfer.Progress, result: RunResult
    ) -> list[str]:
        # 2. a clock that went backwards would name a snapshot older than the base
        last_sync = int(state.last_sync or 0)
        if start <= last_sync:
            raise JobRefused("start time before last sync")
        # 3. volumes
        volumes, storages = self.volumes(guest)
        if not volumes:
            raise planner.NoReplicatableVolumes()
        self.log_guest(guest, volumes)
        # 4. prepare the target
        self.log(f"connecting to target node '{job.target}'")
        remote = self.connect(job)
        source, target = self._listings(job, state, volumes, storages)
        self._check_target_storages(job, volumes, storages, target)
        # 5. plan (raises before anything is touched), then make sure no receive destroys data (SPEC §10)
        p = planner.make_plan(self.job_id, guest.vmid, start, last_sync or None, volumes, source, target)
        guard.check_source(self.local, [vp.dataset for vp in p.volumes], guest.vmid)
        # A snapshot of this job newer than its last sync on the target is a receive that committed
        # while its run failed, harmless only if that run was sent from here (SPEC §5 step 7).
        unacked = last_sync if state.last_node == self.node and not self.switched else None
        found = guard.assess(remote, self.local, p, source, target, guest.vmid, start, unacked)
        if found and not self.discard:
            raise guard.refuse(found, self.job_id)
        for d in found:  # the operator accepted the loss: keep each diverged state aside, send in full
            self.fence(f"keeping the diverged state of {d.dataset} on {job.target}")
            self.kept.append(f"{job.target}:{guard.keep_diverged(remote, d, self.job_id, start, self.log)}")
            target = {ds: snaps for ds, snaps in target.items() if ds != d.dataset}
        if found:
            p = planner.make_plan(self.job_id, guest.vmid, start, last_sync or None, volumes, source, target)
        result.plan = p.as_dict()
        # pvesr's target side (prepare-local-job), in its words
        for vp in p.volumes:
            if vp.fallback and last_sync:
                self.log(f"expected snapshot {snapshot_name(self.job_id, last_sync)} not present for "
                         f"{vp.volume.volid}, not removing others")
            elif vp.fallback:  # no last sync recorded (state lost): replq says where it goes on from
                assert vp.base is not None
                self.log(f"{vp.volume.volid}: no last sync recorded: incremental from the newest common "
                         f"replication snapshot {vp.base.name}")
            for name in vp.prune_target:
                self.fence(f"deleting '{vp.dataset}@{name}' on {job.target}")
                self.log(f"(remote_prepare_local_job) delete stale replication snapshot '{name}' on {vp.volume.volid}")
                remote.destroy_snapshot(vp.dataset, name)
        for ds, m in guard.markers(remote, p.remove_target_volumes).items():
            keep = safety.removal_refusal(m, guest.vmid, self.job_id)
            if keep:
                self.log(f"keep volume '{ds}' on {job.target} (no longer replicated): {keep}")
                continue
            self.fence(f"deleting '{ds}' on {job.target}")
            self.log(f"(remote_prepare_local_job) {self.job_id}: delete stale volume '{self.volid(ds)}'")
            remote.destroy_dataset(ds)
        # 6. snapshots, all or nothing
        made: list[str] = []
        try:
            for vp in p.volumes:
                self.log(f"create snapshot '{p.snapshot}' on {vp.volume.volid}")
                self.local.snapshot(vp.dataset, p.snapshot)
                made.append(vp.dataset)
        except BaseException:
            self._remove_new_snapshots(made, p.snapshot)
            raise
        # 7. send
        received: list[planner.VolumePlan] = []
        try:
            # What was sent, by guid: after a failure only copies proven to be this run's are deleted.
            guids = self.local.guids([f"{vp.dataset}@{p.snapshot}" for vp in p.volumes])
            self.sent = {vp.dataset: [*source[vp.dataset], Snapshot(p.snapshot, guids[f"{vp.dataset}@{p.snapshot}"],
                                                                    start)] for vp in p.volumes}
            estimates = [
                self.local.estimate_send_size(vp.dataset, p.snapshot, vp.base.name if vp.base else None)
                for vp in p.volumes
            ]
            progress.total = None if None in estimates else sum(e for e in estimates if e is not None)
            bucket = TokenBucket.from_mbps(job.rate)
            limit = f"{format_rate(job.rate)} MByte/s" if job.rate else "none"
            self.log(f"using secure transmission, rate limit: {limit}")  # always SSH: pvesr's 'secure'
            for vp, est in zip(p.volumes, estimates, strict=True):
                self._send_volume(job, vp, p.snapshot, est, bucket, progress, result)
                received.append(vp)
        except BaseException:
            # Full copies that arrived before a later volume failed would have no common base once
            # the new snapshot goes here: this run's own copies go too (by guid). Where that cannot
            # be done (target unreachable), the new snapshot stays as the next run's base.
            for vp in received:
                if vp.base is None and self._undo_target(job, vp, p.snapshot, None):
                    self.keep_new.add(vp.dataset)
            self._remove_new_snapshots([ds for ds in made if ds not in self.keep_new], p.snapshot)
            for ds in sorted(self.keep_new):
                self.log(f"keep new snapshot '{ds}@{p.snapshot}': its copy on {job.target} may have arrived; the "
                         "next run goes on from it")
            raise
        # 8. last_sync first: from here on the new snapshot is the base, whatever happens next
        jobstate.record_sync_end(self.store, self.job_id, start)
        held = self.held_bases(guest.vmid, {vp.dataset: source[vp.dataset] for vp in p.volumes})
        # As pvesr: the source's previous snapshots of every volume, then the target's (finalize).
        for vp in p.volumes:
            for name in vp.cleanup_source:
                if (vp.dataset, name) in held:  # another job's base after a move (SPEC §6)
                    self.log(f"keep '{vp.dataset}@{name}' on {self.node}: base of job {held[(vp.dataset, name)]}")
                    continue
                self.cleanup(self.local, vp.dataset, name, self.node)
        for ds, names in sorted(p.cleanup_source_other.items()):
            for name in names:
                self.cleanup(self.local, ds, name, self.node)
        for vp in p.volumes:
            for name in vp.cleanup_target:
                self.cleanup(remote, vp.dataset, name, job.target)
        # Other jobs' snapshots that `send -R` carried here and nobody needs any more (SPEC §5 step 8).
        bases = self.current_bases(guest.vmid)
        for vp in p.volumes:
            for name in planner.leftovers(guest.vmid, self.job_id, target.get(vp.dataset, []), source[vp.dataset],
                                          bases):
                self.cleanup(remote, vp.dataset, name, job.target, "leftover replication snapshot")
        progress.update(0, force=True)
        return sorted({v.storage for v in volumes})

    def _remove_new_snapshots(self, datasets: list[str], snap: str) -> None:
        undo = self.undo or Deadline()
        for ds in datasets:
            timeout = undo.step()
            if timeout is None:
                self.log(f"warning: no time left to delete new snapshot '{ds}@{snap}': the next run does")
                continue
            try:
                self.fence(f"deleting new snapshot '{ds}@{snap}'")
                self.log(f"delete previous replication snapshot '{snap}' on {self.volid(ds)}")  # pvesr's words
                self.local.destroy_snapshot(ds, snap, timeout=timeout)
            except ReplqError as exc:
                # Harmless for the next run (it is sent along or cleaned up), but say so.
                self.log(f"warning: could not delete new snapshot '{ds}@{snap}': {exc}")

    def _send_volume(
        self,
        job: Any,
        vp: planner.VolumePlan,
        snap: str,
        estimate: int | None,
        bucket: TokenBucket,
        progress: transfer.Progress,
        result: RunResult,
    ) -> None:
        assert self.conn is not None and self.remote is not None
        base = vp.base.name if vp.base else None
        if base is None:
            self.log(f"full sync '{vp.volume.volid}' ({snap})")
        else:
            self.log(f"incremental sync '{vp.volume.volid}' ({base} => {snap})")
        self.log(f"{vp.volume.volid}: estimated size {human_bytes(estimate)}")
        progress.volume = vp.volume.volid
        t0 = time.monotonic()

        def on_bytes(sent: int) -> None:
            progress.update(sent)
            self.stop_requested()

        what_recv = "receiving (may roll back to the base)" if vp.mode == "incremental" else "receiving"
        self.fence(f"{what_recv} {vp.dataset} on {job.target}")
        try:
            sent, t_stream = self.send(
                self.conn, zfs.send_argv(vp.dataset, snap, base),
                zfs.recv_argv(vp.dataset, incremental=vp.mode == "incremental"),
                source=self.node, dataset=vp.dataset, bucket=bucket, on_bytes=on_bytes,
                target_error=lambda stderr: self._target_error(vp, stderr), stall_timeout=self.stall_timeout,
            )  # fmt: skip
        except BaseException as exc:
            self.undo = Deadline()
            if self._undo_target(job, vp, snap, exc):
                self.keep_new.add(vp.dataset)
            raise
        guard.mark_replica(self.remote, vp.dataset, job.guest, self.job_id, self.node, self.log)
        dt = time.monotonic() - t0
        progress.done += sent
        progress.current = 0
        result.bytes += sent
        rate = sent / dt / 1e6 if dt > 0 else 0.0
        self.log(
            f"{vp.volume.volid}: sent {human_bytes(sent)} ({sent} bytes) in {dt:.3f} s ({rate:.1f} MB/s; "
            f"stream {t_stream:.3f} s, receive committed {dt - t_stream:.3f} s later)"
        )
        self.log(f"successfully imported '{vp.volume.volid}'")  # pve-storage's line after the receive

    def _target_error(self, vp: planner.VolumePlan, stderr: str) -> ZfsError:
        assert self.conn is not None
        err = zfs.map_error(stderr, f"receiving {vp.dataset}", self.conn.node, "target")
        if isinstance(err, NoSpace):
            detail = zfs.first_error_line(stderr)
            return NoSpace(
                f"no free space left on the replication target storage '{vp.volume.storage}' on node "
                f"'{self.conn.node}' (receiving {vp.dataset}: {detail})",
                stderr,
            )
        return err

    def _undo_target(self, job: Any, vp: planner.VolumePlan, snap: str, exc: BaseException | None) -> bool:
        """After a failed receive: back to the base (incremental), or delete the copy this run
        received, proven by guid (full); a dataset that appeared by another hand stays. Returns
        whether a full copy of this run may remain on the target (then the new snapshot stays
        here too, so that the next run goes on from it instead of finding no common base)."""
        full = vp.base is None
        if isinstance(exc, ConnectionLost | NodeUnreachable):
            self.log(f"target node '{job.target}' not reachable: its partial receive is discarded by zfs")
            return full
        remote = self.remote
        if remote is None:
            return full
        undo = self.undo or Deadline()
        try:
            self.fence(f"cleaning up '{vp.dataset}' on {job.target}")
            if full:
                sent = self.sent.get(vp.dataset, [])
                guid = next((s.guid for s in sent if s.name == snap), 0)
                guard.destroy_own_copy(remote, vp.dataset, sent, snap, guid, self.log, timeout=undo.step() or 1.0)
            else:
                remote.rollback(vp.dataset, vp.base.name, timeout=undo.step() or 1.0)
                self.log(f"rolled back '{vp.dataset}' to {vp.base.name} on {job.target}")
            return False
        except LockLost as lost:
            self.log(f"target '{vp.dataset}' on {job.target} left as zfs left it: {lost}")
        except ReplqError as failed:
            self.log(f"warning: cleanup on {job.target} failed: {failed}")
        return full


def run_job(store: Any, job_id: str, node: str, **kw: Any) -> RunResult:
    """Run job `job_id` on this node (`node` must hold the guest). Refusals before the run raise."""
    return Replication(store, job_id, node, **kw).run()


def plan_job(store: Any, job_id: str, node: str, **kw: Any) -> dict:
    """The plan of job `job_id` (dry run): full/incremental per volume, base, estimated size."""
    return Replication(store, job_id, node, **kw).dry_run()
