"""Replication planning (pure): which volumes, full or incremental, from which base, what to prune.

Input is what `zfs` reported on both sides (snapshots with name, guid and creation per
dataset) plus the job and its state; output is a `Plan`, or a typed `PlanError` when the run
must not touch anything. Snapshots are matched by exact name AND guid: a snapshot of job
`100-1` is never taken for one of `100-10`, and a same-named snapshot with another guid is
not a common base.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from replq.errors import (
    LocalFileVolume,
    NoCommonBase,
    NoReplicatableVolumes,
    SnapshotExists,
    SourceVolumeMissing,
)
from replq.model import (  # noqa: F401 - the snapshot names are the plan's vocabulary too
    SNAPSHOT_PREFIX,
    Snapshot,
    Volume,
    is_job_snapshot,
    job_id_sort_key,
    parse_snapshot_name,
    snapshot_name,
    volname_vmid,
)

# Listing of one side: dataset name → its snapshots (an existing dataset without snapshots
# maps to an empty list; a missing dataset is absent).
Listing = Mapping[str, Sequence[Snapshot]]


# ---------------------------------------------------------------------------------- volumes


def replicatable_volumes(
    disks: Iterable[tuple[str, bool]], storages: Mapping[str, tuple[str, str]]
) -> tuple[list[Volume], list[str]]:
    """Resolve a guest's disks (volid, replicate) against the storages (id → (type, pool)).

    Returns (volumes to replicate, volids skipped on purpose). Disks with `replicate=0`
    and disks on non-zfspool (shared) storages are skipped; disks on storages that no
    longer exist are dropped (SPEC §5 step 3); a local path/device is an error.
    """
    volumes: list[Volume] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for volid, replicate in disks:
        if ":" not in volid:
            raise LocalFileVolume(volid)
        storage, volname = volid.split(":", 1)
        if not replicate:
            skipped.append(volid)
            continue
        if storage not in storages:
            skipped.append(volid)
            continue
        stype, pool = storages[storage]
        if stype != "zfspool":
            skipped.append(volid)
            continue
        vol = Volume(volid=volid, storage=storage, pool=pool, volname=volname)
        if vol.dataset in seen:
            continue
        seen.add(vol.dataset)
        volumes.append(vol)
    return volumes, skipped


# ---------------------------------------------------------------------------------- plan


@dataclass
class VolumePlan:
    volume: Volume
    mode: str  # "full" | "incremental"
    base: Snapshot | None = None
    target_exists: bool = False
    # Step 4: this job's target snapshots other than the base, deleted before sending.
    prune_target: list[str] = field(default_factory=list)
    # Step 8, after last_sync is recorded: this job's older snapshots, kept only the new one.
    cleanup_source: list[str] = field(default_factory=list)
    cleanup_target: list[str] = field(default_factory=list)
    # The base was not `last_sync` (snapshot lost on one side): say so in the log.
    fallback: bool = False

    @property
    def dataset(self) -> str:
        return self.volume.dataset

    def as_dict(self) -> dict:
        return {
            "volume": self.volume.volid,
            "dataset": self.dataset,
            "mode": self.mode,
            "base": self.base.name if self.base else None,
            "fallback": self.fallback,
            "prune_target": list(self.prune_target),
        }


@dataclass
class Plan:
    job_id: str
    snapshot: str  # the new snapshot's name (after '@')
    volumes: list[VolumePlan]
    # Step 4: target datasets of this guest carrying this job's snapshots that are no longer wanted.
    remove_target_volumes: list[str] = field(default_factory=list)
    # Step 8: this job's snapshots on source volumes no longer replicated (the volume itself stays).
    cleanup_source_other: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "job": self.job_id,
            "snapshot": self.snapshot,
            "volumes": [v.as_dict() for v in self.volumes],
            "remove_target_volumes": list(self.remove_target_volumes),
        }


def _newest(snaps: Iterable[Snapshot]) -> Snapshot | None:
    # Newest by creation; ties (same second) broken by the epoch in the name.
    best: Snapshot | None = None
    for s in snaps:
        key = (s.creation, (s.replication or ("", 0))[1])
        if best is None or key > (best.creation, (best.replication or ("", 0))[1]):
            best = s
    return best


def choose_base(
    job_id: str, last_sync: int | None, source: Sequence[Snapshot], target: Sequence[Snapshot]
) -> tuple[Snapshot | None, bool]:
    """The base for an incremental send and whether it is a fallback (not last_sync's snapshot).

    1. `__replicate_<job>_<last_sync>__` on both sides with the same guid;
    2. else the newest replication snapshot of a job of the same guest (after a move, another
       job's snapshot is the base; never another guest's, SPEC §10) present on both sides by
       name and guid;
    3. else None.
    """
    target_by_name = {s.name: s for s in target}
    if last_sync:
        wanted = snapshot_name(job_id, last_sync)
        src = next((s for s in source if s.name == wanted), None)
        dst = target_by_name.get(wanted)
        if src is not None and dst is not None and src.guid == dst.guid:
            return src, False
    vmid = job_id_sort_key(job_id)[0]
    common = [
        s
        for s in source
        if s.replication is not None and job_id_sort_key(s.replication[0])[0] == vmid
        and s.name in target_by_name and target_by_name[s.name].guid == s.guid
    ]
    base = _newest(common)
    return base, base is not None


def make_plan(
    job_id: str,
    vmid: int,
    start: int,
    last_sync: int | None,
    volumes: Sequence[Volume],
    source: Listing,
    target: Listing,
) -> Plan:
    """Plan one run of `job_id` (SPEC §5 steps 4–8) or raise a PlanError touching nothing.

    `source`/`target` list the datasets (and their snapshots) of the storages involved on
    each side; datasets of other guests are ignored.
    """
    if not volumes:
        raise NoReplicatableVolumes()
    new = snapshot_name(job_id, start)
    missing = [v.volid for v in volumes if v.dataset not in source]
    if missing:
        raise SourceVolumeMissing(missing)

    plans: list[VolumePlan] = []
    no_base: list[str] = []
    for vol in volumes:
        src = list(source[vol.dataset])
        if any(s.name == new for s in src):
            raise SnapshotExists(vol.dataset, new)
        src_job = [s.name for s in src if is_job_snapshot(s.name, job_id)]
        if vol.dataset not in target:
            # Nothing there: full send of everything up to the new snapshot.
            plans.append(VolumePlan(volume=vol, mode="full", cleanup_source=src_job, cleanup_target=src_job))
            continue
        dst = list(target[vol.dataset])
        base, fallback = choose_base(job_id, last_sync, src, dst)
        if base is None:
            # Existing target volume (foreign or diverged) without a common base: refuse, never overwrite.
            no_base.append(vol.volid)
            continue
        # SPEC §5.4: prune this job's other target snapshots only when the base is last_sync's
        # snapshot on both sides. After a fallback they may be the only base left if this send fails.
        stale = [s.name for s in dst if is_job_snapshot(s.name, job_id) and s.name != base.name]
        prune = [] if fallback else stale
        # After `recv -F` of `-R -I base`, the target holds base plus every source snapshot after it.
        sent_after = [s.name for s in src if is_job_snapshot(s.name, job_id) and s.creation >= base.creation]
        kept_target = [base.name] if is_job_snapshot(base.name, job_id) else []
        # After a fallback the stale ones go only once the new snapshot has arrived (step 8).
        cleanup_target = sorted(set(kept_target) | set(sent_after) | (set(stale) if fallback else set()))
        plans.append(
            VolumePlan(
                volume=vol,
                mode="incremental",
                base=base,
                target_exists=True,
                prune_target=prune,
                cleanup_source=src_job,
                cleanup_target=cleanup_target,
                fallback=fallback,
            )
        )
    if no_base:
        raise NoCommonBase(no_base)

    wanted = {v.dataset for v in volumes}

    def unwanted(listing: Listing) -> dict[str, list[str]]:
        # Datasets of this guest, no longer replicated, that still carry snapshots of this job.
        out = {}
        for ds, snaps in listing.items():
            if ds in wanted or volname_vmid(ds.rsplit("/", 1)[-1]) != vmid:
                continue
            names = [s.name for s in snaps if is_job_snapshot(s.name, job_id)]
            if names:
                out[ds] = names
        return out

    return Plan(
        job_id=job_id,
        snapshot=new,
        volumes=plans,
        remove_target_volumes=sorted(unwanted(target)),
        cleanup_source_other=unwanted(source),
    )


def held_bases(others: Iterable[tuple[str, int]], listing: Listing) -> dict[tuple[str, str], str]:
    """Source snapshots that another job of the guest still needs as its base: {(dataset, name): job}.

    `others` are the guest's other jobs (not being removed) with their last_sync. After a move, a
    job that has not synced from this node yet (its last_sync snapshot is not here) goes on from
    the newest replication snapshot here that is not newer than its last sync: its target
    received that one with the last sync's -R stream. Deleting it (say, the first job to run
    after the move cleaning up its previous snapshot) would leave that job without a common base,
    so it is kept until the job has synced from here. One snapshot per such job and volume.
    """
    out: dict[tuple[str, str], str] = {}
    for other, last in others:
        if not last:
            continue
        own = snapshot_name(other, last)
        for ds, snaps in listing.items():
            if any(s.name == own for s in snaps):
                continue  # synced from here: its own snapshot is its base
            older = [s for s in snaps if s.replication is not None and s.creation <= last]
            if older:
                best = max(older, key=lambda s: (s.creation, (s.replication or ("", 0))[1]))
                out[(ds, best.name)] = other
    return out


def leftovers(vmid: int, job_id: str, target: Sequence[Snapshot], source: Sequence[Snapshot],
              bases: Mapping[str, str]) -> list[str]:
    """Replication snapshots that `send -R` carried to a target and nobody needs any more (SPEC §5
    step 8, §7): another job's of this guest (`job_id`'s own are the plan's), that is no job's
    current base (`bases`: job → its last_sync snapshot; after a failover that is the common base
    between two targets) and that the source no longer has (there it may still be a base)."""
    on_source = {(s.name, s.guid) for s in source}
    keep = set(bases.values())
    out = []
    for s in target:
        r = s.replication
        if r is None or r[0] == job_id or job_id_sort_key(r[0])[0] != vmid:
            continue
        if s.name in keep or (s.name, s.guid) in on_source:
            continue
        out.append(s.name)
    return out
