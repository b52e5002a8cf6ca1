"""The decisions that keep data safe at the moment of failure (SPEC §10, pure).

Each is a function of what zfs and the store reported, so it is tested exhaustively without a
cluster; the engine (guard.py, replicate.py, migrate.py) does the I/O around it.

    is_own_copy        may a target dataset be destroyed as the copy this run received?
    Markers            replq's markers on a copy (replica of which job, or the guest's live disk)
    after_base         target snapshots newer than the common base that the source lacks
    divergence         may a target be rolled back to the base and receive? (else why, how much)
    source_refusal     is the guest's own disk marked as a replica (the store runs the wrong way)?
    removal_refusal    may a target volume no longer wanted (or named by a removal) go?
    node_alive         is a guest's old node alive (worker heartbeat, SSH handshake)?
    fresher            does another node hold a newer replica of one of the guest's disks?
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from replq.model import Snapshot, job_id_sort_key


def is_own_copy(target: Sequence[Snapshot] | None, sent: Sequence[Snapshot], snap: str, guid: int) -> bool:
    """A target dataset is this run's own copy (and may be destroyed after a failure) only if it
    holds snapshot `snap` with the guid that was sent, and every snapshot on it is one of the
    source's (same name and guid). A dataset that appeared by another hand meanwhile, or one that
    gained snapshots of its own, is not. `target` None: the dataset does not exist."""
    if not target:
        return False
    mine = {s.name: s.guid for s in sent}
    if mine.get(snap) != guid:
        return False
    return any(s.name == snap and s.guid == guid for s in target) and all(mine.get(s.name) == s.guid for s in target)


# ---------------------------------------------------------------------------------- markers (item 1)

GUEST, ROLE, JOB, SOURCE, SINCE = "replq:guest", "replq:role", "replq:job", "replq:source", "replq:since"
MARKERS = (GUEST, ROLE, JOB, SOURCE, SINCE)
REPLICA, LIVE = "replica", "live"
CHECK_PREFIX = "__replq_check_"  # the engine's short-lived snapshot for measuring a target's changes
KEPT_PREFIX = "replq-diverged-"  # a diverged state kept by --discard-target-changes (never a guest's volume name)


@dataclass(frozen=True)
class Markers:
    """replq's markers on one copy of a volume, as set on its own node. Values that arrived with a
    `send -R` stream (zfs reports them as "received") describe the sender, not this copy: the
    caller passes only locally set ones."""

    guest: int | None = None
    role: str | None = None  # REPLICA or LIVE
    job: str | None = None  # replica: the job it is the target of
    source: str | None = None  # replica: the node it was received from
    since: int | None = None  # live: epoch of the move that made it the guest's live disk

    @classmethod
    def parse(cls, local: Mapping[str, str]) -> Markers:
        def num(key: str) -> int | None:
            v = local.get(key, "")
            return int(v) if v.isdigit() else None

        return cls(guest=num(GUEST), role=local.get(ROLE) or None, job=local.get(JOB) or None,
                   source=local.get(SOURCE) or None, since=num(SINCE))


def replica_markers(vmid: int, job_id: str, source: str) -> dict[str, str]:
    """Set on a target after each receive (with readonly=on): whose replica it is, by which job, from where."""
    return {GUEST: str(vmid), ROLE: REPLICA, JOB: job_id, SOURCE: source}


def live_markers(vmid: int, since: int) -> dict[str, str]:
    """Set on the guest's new live disk by migrate, guest move and a run that switched direction
    (with readonly=off; the replica's JOB and SOURCE are cleared)."""
    return {GUEST: str(vmid), ROLE: LIVE, SINCE: str(since)}


# ---------------------------------------------------------------------------------- divergence (item 1)


@dataclass
class Divergence:
    """Why a receive into `dataset` on `node` would destroy data, and how much (bytes, None: unknown)."""

    node: str
    dataset: str
    reasons: list[str]
    lost: int | None = None


def after_base(job_id: str, base: Snapshot, target: Sequence[Snapshot], source: Sequence[Snapshot],
               unacknowledged_after: int | None) -> tuple[list[Snapshot], list[Snapshot]]:
    """Target snapshots newer than the base that the source lacks (a receive with -F would destroy
    them): (this job's unacknowledged receives, the others). An unacknowledged receive is a
    snapshot of this job newer than its last sync (`unacknowledged_after`) that zfs recv committed
    while its run failed: its data came from this same source, so it may go. The caller passes
    None when the last attempt ran elsewhere or the job switched direction since: then every
    newer snapshot, this job's included, holds data that only the target has. The engine's check
    snapshots are neither."""
    on_source = {(s.name, s.guid) for s in source}
    own: list[Snapshot] = []
    other: list[Snapshot] = []
    for s in target:
        # Same second as the base: order unknown; what it holds is in the change measure anyway.
        if s.creation <= base.creation or (s.name, s.guid) in on_source or s.name.startswith(CHECK_PREFIX):
            continue
        r = s.replication
        ours = r is not None and r[0] == job_id and unacknowledged_after is not None and r[1] > unacknowledged_after
        (own if ours else other).append(s)
    return own, other


def measure_from(base: Snapshot, own: Sequence[Snapshot], other: Sequence[Snapshot]) -> Snapshot:
    """The snapshot whose difference to the target's present state is what a receive would lose:
    the newest of this job's committed receives (their data came from the source), unless other
    snapshots after the base hold data of their own: then everything since the base."""
    if other or not own:
        return base
    return max(own, key=lambda s: (s.creation, s.name))


def divergence(node: str, dataset: str, vmid: int, job_id: str, target: Markers, source: Markers,
               newer: Sequence[Snapshot], changed: int | None, base: str) -> Divergence | None:
    """May `dataset` on `node` be rolled back to `base` and receive job `job_id`'s stream (SPEC §10)?
    None if so. It must be a replica of this guest by this job (or carry no markers: a replica
    received before replq marked them), not the guest's live disk, and unchanged since the base:
    `changed` bytes (None: unknown) counts what was written after it, in the present state and in
    the `newer` snapshots the source lacks (which the receive would destroy)."""
    reasons: list[str] = []
    if target.guest is not None and target.guest != vmid:
        reasons.append(f"belongs to guest {target.guest}")
    if target.role == REPLICA and target.job is not None and target.job != job_id:
        reasons.append(f"is the replica of job {target.job}, not {job_id}")
    if target.role == LIVE and not (source.role == LIVE and (source.since or 0) > (target.since or 0)):
        # The guest moved away from a live disk only if this node's disk became live later.
        reasons.append("is marked as the guest's live disk" + (f" (since {target.since})" if target.since else ""))
    if changed is None:
        reasons.append("could not be checked for changes since the common base")
    elif changed > 0 and newer:  # (newer snapshots that hold nothing new may go with the rollback)
        reasons.append(f"holds data newer than the common base {base} that the source lacks, in snapshot(s) "
                       f"{', '.join(s.name for s in newer)} or written since")
    elif changed > 0:
        reasons.append(f"was written after the common base {base}")
    if not reasons:
        return None
    return Divergence(node, dataset, reasons, changed)


def source_refusal(node: str, dataset: str, vmid: int, markers: Markers) -> str | None:
    """The guest's disk on its own node must not be marked as a replica: then the store and the
    disks disagree about where the guest lives (a store restored from an old backup, a move
    replq did not see), and replicating would run the wrong way. None if it may be the source."""
    if markers.role != REPLICA:
        return None
    came = f" received from node '{markers.source}'" if markers.source else ""
    job = f" of job {markers.job}" if markers.job else ""
    return (f"diverged: '{dataset}' on node '{node}' is marked as a replica{job}{came}, but the cluster store says "
            f"guest {vmid} lives on '{node}'; nothing was changed. If the guest really runs on '{node}', clear the "
            f"marker there (zfs inherit {ROLE} {dataset}) and run again")


def removal_refusal(markers: Markers, vmid: int, job_id: str) -> str | None:
    """Why a target volume that a job no longer wants (or a job's removal names) must stay: it is
    the guest's live disk, another guest's, or another job's replica. None: it may go."""
    if markers.role == LIVE:
        return f"it is marked as the live disk of guest {markers.guest or vmid}"
    if markers.guest is not None and markers.guest != vmid:
        return f"it belongs to guest {markers.guest}"
    if markers.role == REPLICA and markers.job is not None and markers.job != job_id:
        return f"it is the replica of job {markers.job}"
    return None


# ---------------------------------------------------------------------------------- liveness (item 4)


def age_text(seconds: float) -> str:
    """How long ago, as an operator reads it: 42 s, 5 min, 3 h, 2 d."""
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s // size} {unit}"
    return f"{s} s"


def node_alive(heartbeat: float | None, now: float, window: float, ssh: tuple[str, str]) -> str | None:
    """Why a node counts as alive for `guest move` (SPEC §6), in words, or None when there is no
    evidence of it: its worker sent a heartbeat within the liveness window, or its SSH port
    completes a handshake with the pinned host key (a refused login means it runs: only no
    connection at all is no evidence). Another host key at its address is not the node, but
    something answers there: it counts as alive until the operator says otherwise (--force).
    `ssh` is ssh.Connection.probe()'s (outcome, words)."""
    evidence = []
    if heartbeat is not None and now - heartbeat <= window:
        evidence.append(f"its worker sent a heartbeat {age_text(now - heartbeat)} ago (liveness window "
                        f"{window:g} s)")
    outcome, words = ssh
    if outcome in ("login", "refused"):
        evidence.append(words)
    elif outcome == "other-key":
        evidence.append(f"something answers SSH at its address, with another host key ({words})")
    return "; ".join(evidence) or None


# ---------------------------------------------------------------------------------- freshest replica (item 5)


@dataclass(frozen=True)
class Replica:
    """The newest replication snapshot of one of the guest's disks on one node."""

    node: str
    dataset: str
    snapshot: Snapshot | None  # None: the node has the dataset without a replication snapshot of the guest


def newest_replica(node: str, dataset: str, snaps: Sequence[Snapshot], vmid: int) -> Replica:
    mine = [s for s in snaps if s.replication is not None and job_id_sort_key(s.replication[0])[0] == vmid]
    best = max(mine, key=lambda s: (s.creation, s.replication[1] if s.replication else 0), default=None)
    return Replica(node, dataset, best)


def fresher(replicas: Sequence[Replica], to: str) -> list[tuple[Replica, Replica]]:
    """Per disk, (a replica on another node newer than `to`'s, `to`'s) when one exists: newer by
    creation time, unless both are the same snapshot (same name and guid)."""
    mine = {r.dataset: r for r in replicas if r.node == to}
    out = []
    for r in replicas:
        here = mine.get(r.dataset)
        if r.node == to or here is None or r.snapshot is None:
            continue
        h = here.snapshot
        if h is None or ((r.snapshot.name, r.snapshot.guid) != (h.name, h.guid) and r.snapshot.creation > h.creation):
            out.append((r, here))
    return out


def freshest_node(replicas: Sequence[Replica]) -> str | None:
    """The node holding every disk, none of them older than another node's (None if no node does)."""
    disks = {r.dataset for r in replicas}
    for node in sorted({r.node for r in replicas}):
        if {r.dataset for r in replicas if r.node == node} == disks and not fresher(replicas, node):
            return node
    return None
