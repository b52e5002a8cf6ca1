"""Replication planning without ZFS: every case of SPEC §5 steps 3–8."""

from __future__ import annotations

import pytest

from replq.errors import LocalFileVolume, NoCommonBase, NoReplicatableVolumes, SnapshotExists, SourceVolumeMissing
from replq.model import Snapshot, Volume, is_job_snapshot, parse_snapshot_name, snapshot_name, volname_vmid
from replq.plan import choose_base, held_bases, make_plan, replicatable_volumes

POOL = "rpool/data"
V0 = Volume("local-zfs:subvol-100-disk-0", "local-zfs", POOL, "subvol-100-disk-0")
V1 = Volume("local-zfs:subvol-100-disk-1", "local-zfs", POOL, "subvol-100-disk-1")
D0, D1 = V0.dataset, V1.dataset


def snap(job: str, epoch: int, guid: int | None = None) -> Snapshot:
    return Snapshot(snapshot_name(job, epoch), guid if guid is not None else epoch * 7 + len(job), epoch)


# ------------------------------------------------------------------------- names


def test_snapshot_name_format() -> None:
    assert snapshot_name("100-0", 1700000000) == "__replicate_100-0_1700000000__"
    assert parse_snapshot_name("__replicate_100-0_1700000000__") == ("100-0", 1700000000)


@pytest.mark.parametrize(
    "name",
    ["__replicate_100-0_17__x", "replicate_100-0_17__", "__replicate_100-0__", "__replicate_100_17__",
     "__replicate_100-01_17__", "__replicate_99-0_17__", "__replicate_100-0_017__", "manual", ""],
)
def test_not_replication_snapshots(name: str) -> None:
    assert parse_snapshot_name(name) is None


def test_job_100_1_never_matches_100_10() -> None:
    a, b = snapshot_name("100-1", 5), snapshot_name("100-10", 5)
    assert is_job_snapshot(a, "100-1") and not is_job_snapshot(a, "100-10")
    assert is_job_snapshot(b, "100-10") and not is_job_snapshot(b, "100-1")
    # Prefix tricks: "100-1" + "0_5" would read as 100-10's snapshot to a prefix matcher.
    assert not is_job_snapshot("__replicate_100-10_5__", "100-1")
    assert not is_job_snapshot("__replicate_1000-1_5__", "100-1")


def test_snapshot_name_rejects_bad_job() -> None:
    with pytest.raises(ValueError):
        snapshot_name("100-1; rm -rf /", 1)


def test_volname_vmid() -> None:
    assert volname_vmid("subvol-100-disk-0") == 100
    assert volname_vmid("vm-1000-disk-2") == 1000
    assert volname_vmid("base-100-disk-0") == 100
    assert volname_vmid("data") is None
    assert volname_vmid("subvol-100") is None


# ------------------------------------------------------------------------- volumes


def test_replicatable_volumes() -> None:
    storages = {"local-zfs": ("zfspool", POOL), "tank": ("zfspool", "tank/vm"), "nfs": ("nfs", "")}
    disks = [
        ("local-zfs:subvol-100-disk-0", True),
        ("tank:subvol-100-disk-1", True),
        ("local-zfs:subvol-100-disk-2", False),  # replicate=0
        ("nfs:100/vm-100-disk-3.qcow2", True),  # shared storage: skipped
        ("gone:subvol-100-disk-4", True),  # storage no longer exists: dropped
        ("local-zfs:subvol-100-disk-0", True),  # listed twice: once
    ]
    vols, skipped = replicatable_volumes(disks, storages)
    assert [v.dataset for v in vols] == ["rpool/data/subvol-100-disk-0", "tank/vm/subvol-100-disk-1"]
    assert skipped == ["local-zfs:subvol-100-disk-2", "nfs:100/vm-100-disk-3.qcow2", "gone:subvol-100-disk-4"]


def test_local_device_is_an_error() -> None:
    with pytest.raises(LocalFileVolume, match="unable to replicate local file/device '/dev/sdb'"):
        replicatable_volumes([("/dev/sdb", True)], {})


def test_no_volumes_refused() -> None:
    with pytest.raises(NoReplicatableVolumes):
        make_plan("100-0", 100, 2000, None, [], {}, {})


# ------------------------------------------------------------------------- plans


def test_first_run_is_full() -> None:
    plan = make_plan("100-0", 100, 2000, None, [V0], {D0: []}, {})
    (vp,) = plan.volumes
    assert vp.mode == "full" and vp.base is None and not vp.target_exists
    assert plan.snapshot == "__replicate_100-0_2000__"
    assert vp.prune_target == [] and plan.remove_target_volumes == []


def test_incremental_from_last_sync() -> None:
    s1 = snap("100-0", 1000)
    plan = make_plan("100-0", 100, 2000, 1000, [V0], {D0: [s1]}, {D0: [s1]})
    (vp,) = plan.volumes
    assert vp.mode == "incremental" and vp.base == s1 and not vp.fallback
    assert vp.cleanup_source == [s1.name] and vp.cleanup_target == [s1.name]
    assert vp.prune_target == []


def test_stale_job_snapshots_on_target_are_pruned_not_others() -> None:
    s0, s1 = snap("100-0", 500), snap("100-0", 1000)
    other = snap("100-1", 900)
    user = Snapshot("daily", 42, 800)
    plan = make_plan("100-0", 100, 2000, 1000, [V0], {D0: [s1]}, {D0: [s0, user, other, s1]})
    (vp,) = plan.volumes
    assert vp.base == s1
    assert vp.prune_target == [s0.name]


def test_same_name_other_guid_is_not_a_base() -> None:
    s1 = snap("100-0", 1000, guid=1)
    forged = snap("100-0", 1000, guid=2)
    with pytest.raises(NoCommonBase, match=r"No common base snapshot on volume\(s\) local-zfs:subvol-100-disk-0"):
        make_plan("100-0", 100, 2000, 1000, [V0], {D0: [s1]}, {D0: [forged]})


@pytest.mark.parametrize("side", ["source", "target"])
def test_last_sync_missing_on_one_side_falls_back_to_newest_common(side: str) -> None:
    old, mid, last = snap("100-0", 500), snap("100-0", 800), snap("100-0", 1000)
    src = [old, mid] if side == "source" else [old, mid, last]
    dst = [old, mid, last] if side == "source" else [old, mid]
    plan = make_plan("100-0", 100, 2000, 1000, [V0], {D0: src}, {D0: dst})
    (vp,) = plan.volumes
    assert vp.base == mid and vp.fallback
    # After a fallback nothing is pruned before the send: if it fails, those may be the only base.
    assert vp.prune_target == []
    # Once the new snapshot has arrived, the stale ones go (the new one is kept by the engine).
    if side == "target":
        assert old.name in vp.cleanup_target and mid.name in vp.cleanup_target


def test_fallback_failure_cannot_lose_the_common_base() -> None:
    # The review's case: last_sync 300 is missing on the target; another job's snapshot is the
    # newest common one. This job's own @200 must stay on the target until the send succeeds.
    own_old, other, own_last = snap("100-0", 200), snap("100-1", 250), snap("100-0", 300)
    plan = make_plan("100-0", 100, 400, 300, [V0], {D0: [own_old, other, own_last]}, {D0: [own_old, other]})
    (vp,) = plan.volumes
    assert vp.fallback and vp.base == other
    assert vp.prune_target == []


def test_fallback_uses_other_jobs_snapshot_when_common() -> None:
    """After a guest move the common snapshot may belong to another job of the guest."""
    theirs = snap("100-1", 900)
    plan = make_plan("100-0", 100, 2000, 1000, [V0], {D0: [theirs]}, {D0: [theirs]})
    (vp,) = plan.volumes
    assert vp.base == theirs and vp.fallback
    assert vp.prune_target == [] and vp.cleanup_target == []


def test_only_replication_snapshots_are_bases() -> None:
    user = Snapshot("daily", 42, 800)
    with pytest.raises(NoCommonBase):
        make_plan("100-0", 100, 2000, None, [V0], {D0: [user]}, {D0: [user]})


def test_foreign_dataset_on_target_is_refused() -> None:
    with pytest.raises(NoCommonBase) as exc:
        make_plan("100-0", 100, 2000, None, [V0, V1], {D0: [], D1: []}, {D1: []})
    assert exc.value.volumes == [V1.volid]


def test_no_common_base_on_one_volume_refuses_all() -> None:
    s1 = snap("100-0", 1000)
    with pytest.raises(NoCommonBase) as exc:
        make_plan("100-0", 100, 2000, 1000, [V0, V1], {D0: [s1], D1: [s1]}, {D0: [s1], D1: [snap("100-0", 3)]})
    assert exc.value.volumes == [V1.volid]


def test_volume_added_is_full_while_others_incremental() -> None:
    s1 = snap("100-0", 1000)
    plan = make_plan("100-0", 100, 2000, 1000, [V0, V1], {D0: [s1], D1: []}, {D0: [s1]})
    assert [(v.dataset, v.mode) for v in plan.volumes] == [(D0, "incremental"), (D1, "full")]


def test_removed_or_unreplicated_volume_removed_on_target() -> None:
    s1 = snap("100-0", 1000)
    d2 = f"{POOL}/subvol-100-disk-2"  # disk removed or replicate=0 now
    foreign = f"{POOL}/subvol-100-disk-3"  # same guest, but no snapshot of this job: untouched
    other_guest = f"{POOL}/subvol-101-disk-0"
    other_job = f"{POOL}/subvol-100-disk-4"
    target = {
        D0: [s1],
        d2: [s1],
        foreign: [Snapshot("x", 1, 1)],
        other_guest: [snap("100-0", 1000)],
        other_job: [snap("100-10", 1000)],
        POOL: [],
    }
    source = {D0: [s1], d2: [s1, Snapshot("mine", 5, 5)], foreign: [], other_guest: [snap("100-0", 1000)]}
    plan = make_plan("100-0", 100, 2000, 1000, [V0], source, target)
    assert plan.remove_target_volumes == [d2]
    # On the source the volume stays; only this job's snapshots on it go (after success).
    assert plan.cleanup_source_other == {d2: [s1.name]}


def test_source_volume_missing() -> None:
    with pytest.raises(SourceVolumeMissing):
        make_plan("100-0", 100, 2000, None, [V0], {}, {})


def test_new_snapshot_already_exists() -> None:
    with pytest.raises(SnapshotExists):
        make_plan("100-0", 100, 2000, None, [V0], {D0: [snap("100-0", 2000)]}, {})


def test_jobs_100_1_and_100_10_side_by_side() -> None:
    a1, b1 = snap("100-1", 1000), snap("100-10", 1100)
    a0 = snap("100-1", 600)
    plan = make_plan("100-1", 100, 2000, 1000, [V0], {D0: [a0, a1, b1]}, {D0: [a0, a1, b1]})
    (vp,) = plan.volumes
    assert vp.base == a1
    assert vp.prune_target == [a0.name]
    assert sorted(vp.cleanup_source) == sorted([a0.name, a1.name])
    assert b1.name not in vp.cleanup_target + vp.cleanup_source + vp.prune_target


def test_full_send_cleans_job_snapshots_that_travel_with_it() -> None:
    """`send -R` carries all snapshots: after a full send the old job snapshots are on both sides."""
    old = snap("100-0", 500)
    plan = make_plan("100-0", 100, 2000, None, [V0], {D0: [old]}, {})
    (vp,) = plan.volumes
    assert vp.cleanup_source == [old.name] and vp.cleanup_target == [old.name]


def test_choose_base_prefers_last_sync_over_newer_common() -> None:
    last, newer = snap("100-0", 1000), snap("100-1", 1500)
    base, fallback = choose_base("100-0", 1000, [last, newer], [last, newer])
    assert base == last and not fallback


def test_plan_as_dict() -> None:
    s1 = snap("100-0", 1000)
    d = make_plan("100-0", 100, 2000, 1000, [V0], {D0: [s1]}, {D0: [s1]}).as_dict()
    assert d["volumes"][0]["mode"] == "incremental" and d["volumes"][0]["base"] == s1.name


def test_held_bases() -> None:
    ds = "rpool/data/subvol-100-disk-0"
    a, b, c = (Snapshot("__replicate_100-0_100__", 1, 100), Snapshot("__replicate_100-0_200__", 2, 200),
               Snapshot("__replicate_100-0_400__", 3, 400))  # fmt: skip
    # 100-1 (last sync 300) has not synced from this node (its snapshot is not here): the newest
    # replication snapshot before its last sync stays, as its base.
    assert held_bases([("100-1", 300)], {ds: [a, b, c]}) == {(ds, b.name): "100-1"}
    # Once it has synced from here, nothing is held.
    own = Snapshot("__replicate_100-1_300__", 9, 300)
    assert held_bases([("100-1", 300)], {ds: [a, b, own, c]}) == {}
    # A job that never synced needs no base; nothing older than its last sync: nothing held.
    assert held_bases([("100-1", 0)], {ds: [a, b, c]}) == {}
    assert held_bases([("100-1", 50)], {ds: [a, b, c]}) == {}
