"""What the engine does on a node to keep its data safe (SPEC §10): it reads and sets replq's
markers, measures what a receive would destroy before it may roll a target back, keeps a
diverged state aside when the operator says so, and destroys only what it received itself,
proven by GUID. The decisions are pure (safety.py); this is their I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from replq import safety, zfs
from replq.errors import Diverged, ReplqError
from replq.model import Snapshot
from replq.output import human_bytes
from replq.plan import Plan

Say = Callable[[str], None]


def markers(z: zfs.Zfs, datasets: Sequence[str]) -> dict[str, safety.Markers]:
    """replq's markers of each dataset on z's node (only what is set there; one command)."""
    props = z.local_props(safety.MARKERS, datasets)
    return {ds: safety.Markers.parse(props.get(ds, {})) for ds in datasets}


def mark_replica(z: zfs.Zfs, dataset: str, vmid: int, job_id: str, source: str, say: Say) -> None:
    """After a receive: the copy is read-only and says whose replica it is (a failure only warns:
    the next receive marks it again)."""
    try:
        z.set_props(dataset, {"readonly": "on", **safety.replica_markers(vmid, job_id, source)})
    except ReplqError as exc:
        say(f"warning: could not mark '{dataset}' on {z.node} as a read-only replica: {exc}")


def mark_live(z: zfs.Zfs, datasets: Sequence[str], vmid: int, since: int, say: Say) -> None:
    """The guest's disks on z's node are its live disks now: writable, marked live since `since`."""
    for ds in datasets:
        try:
            z.set_props(ds, {"readonly": "off", **safety.live_markers(vmid, since)},
                        clear=(safety.JOB, safety.SOURCE))
        except ReplqError as exc:
            say(f"warning: could not mark '{ds}' on {z.node} as the live disk of guest {vmid}: {exc}")


def check_source(z: zfs.Zfs, datasets: Sequence[str], vmid: int) -> None:
    """The guest's own disks must not be marked as replicas (the store would run the wrong way)."""
    for ds, m in markers(z, datasets).items():
        refusal = safety.source_refusal(z.node, ds, vmid, m)
        if refusal:
            raise Diverged(refusal)


def assess(remote: zfs.Zfs, local: zfs.Zfs, plan: Plan, source: Mapping[str, Sequence[Snapshot]],
           target: Mapping[str, Sequence[Snapshot]], vmid: int, stamp: int,
           unacknowledged_after: int | None) -> list[safety.Divergence]:
    """Before any receive that may roll a target back: every incremental volume whose target has
    changed since the common base, holds newer snapshots, or is marked live or another's
    (`unacknowledged_after`: see safety.after_base)."""
    incremental = [vp for vp in plan.volumes if vp.base is not None]
    if not incremental:
        return []
    theirs = markers(remote, [vp.dataset for vp in incremental])
    ours = markers(local, [vp.dataset for vp in incremental])
    found = []
    for vp in incremental:
        assert vp.base is not None
        own, other = safety.after_base(plan.job_id, vp.base, target[vp.dataset], source[vp.dataset],
                                       unacknowledged_after)
        frm = safety.measure_from(vp.base, own, other)
        chain = [frm.name] + [s.name for s in target[vp.dataset]
                              if s.creation > frm.creation and not s.name.startswith(safety.CHECK_PREFIX)]
        try:
            changed: int | None = remote.changed_since(vp.dataset, chain, f"{safety.CHECK_PREFIX}{stamp}__")
        except ReplqError:
            changed = None
        d = safety.divergence(remote.node, vp.dataset, vmid, plan.job_id, theirs[vp.dataset], ours[vp.dataset],
                              other, changed, vp.base.name)
        if d is not None:
            found.append(d)
    return found


def describe(d: safety.Divergence) -> str:
    lost = human_bytes(d.lost, "an unknown amount")
    return f"'{d.dataset}' on node '{d.node}' {'; '.join(d.reasons)} ({lost} would be lost by rolling it back)"


def refuse(found: Sequence[safety.Divergence], job_id: str) -> Diverged:
    return Diverged(f"diverged: {'; '.join(describe(d) for d in found)}; nothing was changed. To keep that state "
                    f"aside and replicate anyway: replq run --id {job_id} --discard-target-changes")


def keep_diverged(z: zfs.Zfs, d: safety.Divergence, job_id: str, stamp: int, say: Say) -> str:
    """--discard-target-changes: rename the diverged dataset out of the way (with all its snapshots:
    a kept snapshot would be destroyed by the next `recv -F` of a -R stream), read-only, named so
    that no guest and no job ever claims it; replq never deletes it. Returns its new name."""
    pool, vol = d.dataset.rsplit("/", 1)
    kept = f"{pool}/{safety.KEPT_PREFIX}{vol}-{stamp}"
    z.rename(d.dataset, kept)
    try:
        z.set_props(kept, {"readonly": "on", "replq:kept": f"{job_id}@{stamp}"})
    except ReplqError as exc:
        say(f"warning: could not mark the kept state '{kept}' read-only: {exc}")
    lost = human_bytes(d.lost, "an unknown amount")
    say(f"kept the diverged state of '{d.dataset}' on {z.node} as '{kept}' ({lost} written after the common base; "
        "replq never deletes it): the volume is sent in full")
    return kept


def destroy_own_copy(z: zfs.Zfs, dataset: str, sent: Sequence[Snapshot], snap: str, guid: int,
                     say: Say, timeout: float | None = None) -> bool:
    """After a failed full receive or copy: destroy `dataset` on z's node only if it is the copy
    this run sent (snapshot `snap` with `guid`, nothing foreign on it). True if destroyed."""
    listing = z.list([dataset], timeout=timeout)
    if dataset not in listing:
        return False  # the receive left nothing behind (zfs discards a failed full receive itself)
    if not safety.is_own_copy(listing[dataset], sent, snap, guid):
        say(f"left '{dataset}' on {z.node} untouched: it is not the copy this run sent (no snapshot @{snap} "
            f"with guid {guid}, or snapshots of its own)")
        return False
    z.destroy_dataset(dataset, timeout=timeout)
    say(f"deleted '{dataset}' on {z.node}: the copy this run received (@{snap}, guid {guid})")
    return True
