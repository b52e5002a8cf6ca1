"""Issue 11 (failure safety), the pure decisions: which disks a guest may claim and which
snapshots may serve as a fallback base (SPEC §10)."""

from __future__ import annotations

import pytest

from replq.errors import ValidationError
from replq.model import Disk, Guest
from replq.plan import NoCommonBase, Snapshot, Volume, choose_base, leftovers, make_plan, snapshot_name

# ------------------------------------------------------------------------- 2: a guest's own disks


@pytest.mark.parametrize("volname", ["subvol-200-disk-0", "vm-200-disk-1", "base-200-disk-0"])
def test_a_guest_cannot_claim_another_guests_volume(volname: str) -> None:
    """`vm-200-disk-0` belongs to guest 200 (SPEC §10): guest 100 must not get it."""
    with pytest.raises(ValidationError, match="200"):
        Guest(vmid=100, node="node1", disks=[Disk(f"local-zfs:{volname}")])


# ------------------------------------------------------------------------- 2: fallback base


def test_fallback_base_comes_only_from_the_same_guests_jobs() -> None:
    """Job 803-0 has never synced; the dataset on both sides carries only guest 802's replication
    snapshot (same name and guid). That is no base for guest 803: an incremental `recv -F` from it
    would roll back whatever lives on the target (SPEC §10)."""
    other = Snapshot(snapshot_name("802-0", 1_000), guid=7, creation=1_000)
    assert choose_base("803-0", None, [other], [other]) == (None, False)
    vol = Volume("local-zfs:subvol-802-disk-0", "local-zfs", "rpool/data", "subvol-802-disk-0")
    listing = {vol.dataset: [other]}
    with pytest.raises(NoCommonBase):
        make_plan("803-0", 803, 2_000, None, [vol], listing, listing)
    # The same guest's other job is a valid fallback base (after a move, SPEC §6).
    own = Snapshot(snapshot_name("803-1", 1_000), guid=8, creation=1_000)
    assert choose_base("803-0", None, [own], [own]) == (own, True)


# ------------------------------------------------------------------------- 8: leftovers of send -R


def test_leftovers_are_other_jobs_snapshots_nobody_needs() -> None:
    own = Snapshot(snapshot_name("814-0", 3_000), 1, 3_000)
    stale = Snapshot(snapshot_name("814-1", 1_000), 2, 1_000)  # carried by -R, then 814-1 synced again
    base = Snapshot(snapshot_name("814-2", 2_000), 3, 2_000)  # 814-2's last sync: a failover base
    kept_on_source = Snapshot(snapshot_name("814-3", 1_500), 4, 1_500)  # still a base there (after a move)
    foreign = Snapshot(snapshot_name("900-0", 1_000), 5, 1_000)  # another guest's: not ours to judge
    manual = Snapshot("before-upgrade", 6, 900)
    target = [own, stale, base, kept_on_source, foreign, manual]
    bases = {"814-0": own.name, "814-1": snapshot_name("814-1", 2_500), "814-2": base.name}
    assert leftovers(814, "814-0", target, [own, kept_on_source], bases) == [stale.name]
    # Seen from 814-1's removal: its own snapshots are the removal's; 814-3's is gone from the source.
    assert leftovers(814, "814-1", target, [own], {"814-0": own.name, "814-2": base.name}) == [kept_on_source.name]
