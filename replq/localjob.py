"""pvesr's prepare-local-job and finalize-local-job: a replication job's steps on its target node.

pvesr runs these on the target over SSH during every run (PVE::Replication's
remote_prepare_local_job / remote_finalize_local_job); tooling that drives a migration's
replication steps calls them too. replq's own runs reach the target's ZFS directly, so here
they are for that tooling, with pvesr's arguments and semantics (pve-manager PVE/CLI/pvesr.pm,
pve-guest-common PVE/Replication.pm `prepare`):

prepare ID VOLID... [--scan STORAGES] [--last_sync N] [--parent_snapname S] [--force]
    Refused when the guest lives on this node. On each volume of the guest on the named and the
    scanned storages, this job's replication snapshots other than last_sync's (and the parent
    snapshot) are deleted — only if last_sync's snapshot is there, never with last_sync 0, all
    of them with last_sync 1. A volume of the guest that is not named but carries this job's
    snapshots is stale and is deleted. Prints {VOLID: {SNAPSHOT: {"id": GUID, "timestamp":
    CREATION}}} of what is left on the named volumes.
finalize ID VOLID... [--last_sync N]
    The same snapshot cleanup on the named volumes, nothing printed.

Unlike pvesr, "this job's snapshots" means exactly `__replicate_<ID>_<epoch>__`: pvesr's prefix
match also takes job 100-10's snapshots for 100-1's (SPEC §9). Log lines go to `log` (stderr),
worded as pvesr's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from replq import zfs
from replq.errors import NotFound, ValidationError
from replq.model import Snapshot, Volume, is_job_snapshot, parse_job_id, show, snapshot_name, volname_vmid

Log = Callable[[str], None]
SnapshotInfo = dict[str, dict[str, dict[str, str]]]


def _check_not_on_this_node(store: Any, vmid: int, node: str) -> None:
    try:
        here = store.get_guest(vmid).node == node
    except NotFound:  # pvesr: a guest that does not exist is not on this node either
        return
    if here:
        raise ValidationError(f"guest '{vmid}' is on local node")


def _zfspool(storages: dict[str, Any], sid: str, node: str, noerr: bool = False) -> Any:
    """PVE::Storage::storage_check_enabled plus the replicatable check of pvesr.pm."""
    st = storages.get(sid)
    if st is None or not st.available_on(node):
        if noerr:
            return None
        raise ValidationError(f"storage '{show(sid)}' does not exist" if st is None
                              else f"storage '{sid}' is not available on node '{node}'")
    if st.type != "zfspool":
        raise ValidationError(f"storage '{sid}' is not replicatable")
    return st


def wanted_volume(storages: dict[str, Any], vmid: int, volid: str, node: str) -> Volume:
    """pvesr.pm's check_wanted_volid: a volume of guest `vmid` on a replicatable storage here."""
    sid, sep, volname = volid.partition(":")
    if not sep or not volname:
        raise ValidationError(f"unable to parse volume ID '{show(volid)}'")
    st = _zfspool(storages, sid, node)
    if volname_vmid(volname) != vmid:
        raise ValidationError(f"volume '{show(volid)}' has wrong owner")
    return Volume(volid=volid, storage=sid, pool=st.pool, volname=volname)


def _info(snaps: Iterable[Snapshot]) -> dict[str, dict[str, str]]:
    return {s.name: {"id": str(s.guid), "timestamp": str(s.creation)} for s in snaps}


def prepare(z: zfs.Zfs, volumes: Sequence[Volume], listing: dict[str, list[Snapshot]], job_id: str,
            last_sync: int, parent: str | None, log: Log) -> tuple[SnapshotInfo, set[str]]:
    """PVE::Replication::prepare: delete this job's stale snapshots; (what is left, volids cleaned)."""
    keep = snapshot_name(job_id, last_sync)
    left: SnapshotInfo = {}
    cleaned: set[str] = set()
    for vol in volumes:
        snaps = listing.get(vol.dataset)
        if snaps is None:
            raise ValidationError(f"volume '{vol.volid}' does not exist on node '{z.node}'")
        removal_ok = last_sync == 1 or (last_sync != 0 and any(s.name == keep for s in snaps))
        stale = [s for s in snaps if s.name not in (keep, parent) and is_job_snapshot(s.name, job_id)]
        if stale and not removal_ok and last_sync > 1:
            log(f"expected snapshot {keep} not present for {vol.volid}, not removing others")
        kept = []
        for s in snaps:
            if removal_ok and s in stale:
                log(f"delete stale replication snapshot '{s.name}' on {vol.volid}")
                try:
                    z.destroy_snapshot(vol.dataset, s.name)
                    cleaned.add(vol.volid)
                except zfs.ZfsError as exc:
                    log(f"delete stale replication snapshot error: {exc}")
                    kept.append(s)
            else:
                kept.append(s)
        left[vol.volid] = _info(kept)
    return left, cleaned


def _images(storages: dict[str, Any], sids: Iterable[str], vmid: int,
            listing: dict[str, list[Snapshot]]) -> list[Volume]:
    """The guest's volumes on these storages (PVE's list_images): `<pool>/<volname>` of guest `vmid`."""
    out = []
    for sid in sorted(set(sids)):
        pool = storages[sid].pool
        for ds in sorted(listing):
            parent, _, volname = ds.rpartition("/")
            if parent == pool and volname_vmid(volname) == vmid:
                out.append(Volume(volid=f"{sid}:{volname}", storage=sid, pool=pool, volname=volname))
    return out


def prepare_local_job(store: Any, z: zfs.Zfs, node: str, job_id: str, volids: Sequence[str], scan: Sequence[str],
                      last_sync: int = 0, parent: str | None = None, force: bool = False,
                      log: Log = lambda _line: None) -> SnapshotInfo:
    """`replq prepare-local-job` (module doc); returns the JSON object it prints."""
    if not force and not volids:
        raise ValidationError("no volumes specified")
    vmid, _ = parse_job_id(job_id)
    _check_not_on_this_node(store, vmid, node)
    storages = {s.id: s for s in store.list_storages()}
    sids = {sid for sid in scan if _zfspool(storages, sid, node, noerr=True) is not None}
    wanted = [wanted_volume(storages, vmid, v, node) for v in volids]
    sids |= {v.storage for v in wanted}
    listing = z.list(sorted({storages[sid].pool for sid in sids}))
    volumes = _images(storages, sids, vmid, listing)
    left, cleaned = prepare(z, volumes, listing, job_id, last_sync, parent, log)
    names = {v.volid for v in wanted}
    for vol in volumes:
        if vol.volid in names:
            continue
        # Not wanted any more, and this job's: stale (prepare keeps last_sync's snapshot, so a
        # volume the job used still carries one).
        if vol.volid in cleaned or any(is_job_snapshot(s, job_id) for s in left[vol.volid]):
            log(f"{job_id}: delete stale volume '{vol.volid}'")
            z.destroy_dataset(vol.dataset)
            del left[vol.volid]
    return left


def finalize_local_job(store: Any, z: zfs.Zfs, node: str, job_id: str, volids: Sequence[str], last_sync: int = 0,
                       log: Log = lambda _line: None) -> None:
    """`replq finalize-local-job` (module doc)."""
    vmid, _ = parse_job_id(job_id)
    _check_not_on_this_node(store, vmid, node)
    if not volids:
        raise ValidationError("no volumes specified")
    storages = {s.id: s for s in store.list_storages()}
    wanted = sorted((wanted_volume(storages, vmid, v, node) for v in volids), key=lambda v: v.volid)
    listing = z.list(sorted({v.dataset for v in wanted}))
    prepare(z, wanted, listing, job_id, last_sync, None, log)
