"""Replication planning (pure): which volumes, full or incremental, from which base, what to prune.

Input is what `zfs` reported on both sides (snapshots with name, guid and creation per
dataset) plus the job and its state; output is a `Plan`, or a typed `PlanError` when the run
must not touch anything. Snapshots are matched by exact name AND guid: a snapshot of job
`100-1` is never taken for one of `100-10`, and a same-named snapshot with another guid is
not a common base.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from replq.errors import ReplqError

SNAPSHOT_PREFIX = "__replicate_"
JOB_ID_RE = r"[1-9][0-9]{2,8}-(?:0|[1-9][0-9]{0,8})"
_SNAPSHOT_RE = re.compile(rf"^__replicate_(?P<job>{JOB_ID_RE})_(?P<epoch>0|[1-9][0-9]*)__$")
# Proxmox volume names: the vmid in the name tells which guest a dataset belongs to.
_VOLNAME_RE = re.compile(r"^(?:vm|subvol|base|basevol)-(?P<vmid>[1-9][0-9]*)-[A-Za-z0-9._:+-]+$")


# ---------------------------------------------------------------------------------- names


def snapshot_name(job_id: str, epoch: int) -> str:
    """`__replicate_<job>_<epoch>__`, the only name replq gives its snapshots."""
    if not re.fullmatch(JOB_ID_RE, job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    return f"{SNAPSHOT_PREFIX}{job_id}_{int(epoch)}__"


def parse_snapshot_name(name: str) -> tuple[str, int] | None:
    """(job id, epoch) of a replication snapshot name (the part after '@'), else None."""
    m = _SNAPSHOT_RE.match(name)
    if not m:
        return None
    return m.group("job"), int(m.group("epoch"))


def is_job_snapshot(name: str, job_id: str) -> bool:
    parsed = parse_snapshot_name(name)
    return parsed is not None and parsed[0] == job_id


def volname_vmid(volname: str) -> int | None:
    """The guest a Proxmox volume name belongs to (`subvol-100-disk-0` → 100)."""
    m = _VOLNAME_RE.match(volname)
    return int(m.group("vmid")) if m else None


# ---------------------------------------------------------------------------------- inputs


@dataclass(frozen=True, order=True)
class Snapshot:
    """One snapshot of a dataset: `name` is the part after '@'."""

    name: str
    guid: int
    creation: int

    @property
    def replication(self) -> tuple[str, int] | None:
        return parse_snapshot_name(self.name)


@dataclass(frozen=True)
class Volume:
    """A replicatable volume of the guest: `local-zfs:subvol-100-disk-0` → `rpool/data/subvol-100-disk-0`."""

    volid: str
    storage: str
    pool: str
    volname: str

    @property
    def dataset(self) -> str:
        return f"{self.pool}/{self.volname}"


# Listing of one side: dataset name → its snapshots (an existing dataset without snapshots
# maps to an empty list; a missing dataset is absent).
Listing = Mapping[str, Sequence[Snapshot]]


# ---------------------------------------------------------------------------------- errors


class PlanError(ReplqError):
    """The run must stop before changing anything."""


class NoCommonBase(PlanError):
    def __init__(self, volumes: Sequence[str]) -> None:
        self.volumes = list(volumes)
        super().__init__(f"No common base snapshot on volume(s) {', '.join(self.volumes)}")


class LocalFileVolume(PlanError):
    def __init__(self, volid: str) -> None:
        self.volid = volid
        super().__init__(f"unable to replicate local file/device '{volid}'")


class NoReplicatableVolumes(PlanError):
    def __init__(self) -> None:
        super().__init__("No replicatable volumes found")


class SourceVolumeMissing(PlanError):
    def __init__(self, volumes: Sequence[str]) -> None:
        self.volumes = list(volumes)
        super().__init__(f"volume(s) {', '.join(self.volumes)} do not exist on the source node")


class SnapshotExists(PlanError):
    def __init__(self, dataset: str, name: str) -> None:
        super().__init__(f"snapshot '{dataset}@{name}' already exists")


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
    2. else the newest replication snapshot (any job) present on both sides by name and guid;
    3. else None.
    """
    target_by_name = {s.name: s for s in target}
    if last_sync:
        wanted = snapshot_name(job_id, last_sync)
        src = next((s for s in source if s.name == wanted), None)
        dst = target_by_name.get(wanted)
        if src is not None and dst is not None and src.guid == dst.guid:
            return src, False
    common = [
        s
        for s in source
        if s.replication is not None and s.name in target_by_name and target_by_name[s.name].guid == s.guid
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
