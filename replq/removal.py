"""Removal of a job marked by `delete` (SPEC §7), run by the worker of the guest's node.

full (`delete`): this job's snapshots on the source, and on the target every volume of the
guest that carries a snapshot of this job (foreign volumes are never touched); the target must
be reachable. local (`delete --keep`): the target volumes stay; this job's snapshots are
removed on the source and, if the target answers, on the target. The job's config and state
go only when the cleanup is done; a failure is recorded like a failed run and retried after
`retry_interval`.
"""

from __future__ import annotations

import time
from typing import Any

from replq import guard, jobstate, safety, zfs
from replq import plan as planner
from replq.errors import ConnectionLost, JobRefused, NodeUnreachable, ReplqError
from replq.jobrun import JobRun, RunResult


class Removal(JobRun):
    def run(self) -> RunResult:
        job, guest = self.load()
        self.check_node(job, guest)
        if not job.remove_job:
            raise JobRefused(f"replication job '{self.job_id}' is not marked for removal")
        with self.guest_lock(guest.vmid):
            self.recheck(job, guest)
            t0 = time.monotonic()
            start = int(self.clock())
            jobstate.record_job_start(self.store, self.job_id, start, self.node, self.worker, self.task_id)
            # pvesr's words: a removal is a replication run that removes (PVE/Replication.pm replicate)
            self.log("start replication job")
            if self.switched:
                self.log(self.switched)
            result = RunResult(job_id=self.job_id, ok=False, start=start, duration=0.0)
            try:
                try:
                    volumes = self.volumes(guest)[0]
                except ReplqError:  # e.g. a local file disk: a removal goes on (pvesr's noerr here)
                    volumes = []
                self.log_guest(guest, volumes)
                self.log(f"start job removal - mode '{job.remove_job}'")
                self._remove(job, guest)
            except Exception as exc:  # noqa: BLE001 - recorded, like a failed run
                result.error = jobstate.one_line(str(exc) if isinstance(exc, ReplqError) else repr(exc))
                result.duration = round(time.monotonic() - t0, 6)
                jobstate.record_job_end(self.store, self.job_id, error=result.error, duration=result.duration)
                self.log(f"end replication job with error: {result.error}")
                return result
            finally:
                self.close()
            self.log("job removed")
            self.log("end replication job")
            self.store.delete_job(self.job_id)
            result.ok = True
            result.duration = round(time.monotonic() - t0, 6)
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
            remote = self.connect(job)
            there = remote.list(pools)
        except (NodeUnreachable, ConnectionLost):
            if job.remove_job == "full":
                raise
            self.log(f"warning: target node '{job.target}' not reachable: its snapshots stay")
            remote, there = None, {}
        listing = self.local.list(pools)
        bases = self.current_bases(guest.vmid)
        target = job_datasets(there)
        marks = guard.markers(remote, sorted(target)) if remote is not None and job.remove_job == "full" else {}
        for ds, names in sorted(target.items()):
            assert remote is not None
            if job.remove_job == "full":
                keep = safety.removal_refusal(marks[ds], guest.vmid, self.job_id)
                if keep:
                    self.log(f"keep volume '{ds}' on {job.target}: {keep}")
                    continue
                self.fence(f"deleting volume '{ds}' on {job.target}")
                self.log(f"(remote_prepare_local_job) {self.job_id}: delete stale volume '{self.volid(ds)}'")
                remote.destroy_dataset(ds)
            else:
                for name in names:
                    self.cleanup(remote, ds, name, job.target)
        if remote is not None and job.remove_job != "full":
            # The replica stays: without this job no replication snapshot on it is anyone's base.
            for ds in sorted(ds for ds in there if planner.volname_vmid(ds.rsplit("/", 1)[-1]) == guest.vmid):
                for name in planner.leftovers(guest.vmid, self.job_id, there[ds], listing.get(ds, []), bases):
                    self.cleanup(remote, ds, name, job.target, "leftover replication snapshot")
        held = self.held_bases(guest.vmid, listing)
        for ds, names in sorted(job_datasets(listing).items()):
            for name in names:
                if (ds, name) in held:  # another job's only base after a move (SPEC §6)
                    self.log(f"keep '{ds}@{name}' on {self.node}: base of job {held[(ds, name)]}")
                    continue
                self.fence(f"deleting '{ds}@{name}' on {self.node}")
                self.log(f"delete stale replication snapshot '{name}' on {self.volid(ds)}")  # pvesr's prepare
                self.local.destroy_snapshot(ds, name)
        self._clean_other_targets(job, guest, pools, job_datasets)

    def _clean_other_targets(self, job: Any, guest: Any, pools: list[str], job_datasets: Any) -> None:
        """This job's snapshots that `send -R` carried to the guest's other jobs' targets: gone once
        the source no longer has them (one it keeps is another job's base there). Best effort."""
        source = self.local.list(pools)
        nodes = sorted({j.target for j in self.store.list_jobs(guest.vmid)} - {job.target, self.node})
        for node in nodes:
            try:
                conn = self._connect_node(self.store.get_node(node))
            except ReplqError as exc:
                self.log(f"warning: node '{node}' not reachable: snapshots of {self.job_id} there stay ({exc})")
                continue
            try:
                z = zfs.Zfs(conn, side="target", timeout=self.stall_timeout)
                for ds, names in sorted(job_datasets(z.list(pools)).items()):
                    have = {s.name for s in source.get(ds, [])}
                    for name in names:
                        if name not in have:
                            self.cleanup(z, ds, name, node, "snapshot carried there by another job")
            except ReplqError as exc:
                self.log(f"warning: could not clean up node '{node}': {exc}")
            finally:
                conn.close()


def remove_job(store: Any, job_id: str, node: str, **kw: Any) -> RunResult:
    """Clean up and delete job `job_id` marked remove_job (SPEC §7), on the guest's node."""
    return Removal(store, job_id, node, **kw).run()
