"""The ZFS side of the model (pure): replq's snapshot names, which guest a volume name belongs to,
and the Snapshot and Volume records the planner works on. replq.model re-exports all of it.

A replication snapshot is `__replicate_<job>_<epoch>__` (SPEC §5 step 6): the job id, then an
underscore, so a snapshot of job `100-1` is never taken for one of `100-10`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

JOB_ID_RE = re.compile(r"[1-9][0-9]{2,8}-(0|[1-9][0-9]{0,8})")
SNAPSHOT_PREFIX = "__replicate_"
_SNAPSHOT_RE = re.compile(rf"^__replicate_(?P<job>{JOB_ID_RE.pattern})_(?P<epoch>0|[1-9][0-9]*)__$")
# Proxmox volume names: the vmid in the name tells which guest a dataset belongs to.
_VOLNAME_VMID_RE = re.compile(r"^(?:vm|subvol|base|basevol)-(?P<vmid>[1-9][0-9]*)-[A-Za-z0-9._:+-]+$")


def snapshot_name(job_id: str, epoch: int) -> str:
    """`__replicate_<job>_<epoch>__`, the only name replq gives its snapshots."""
    if not JOB_ID_RE.fullmatch(job_id):
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
    m = _VOLNAME_VMID_RE.match(volname)
    return int(m.group("vmid")) if m else None


@dataclass(frozen=True, order=True)
class Snapshot:
    """One snapshot of a dataset, as zfs reports it: `name` is the part after '@'."""

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
