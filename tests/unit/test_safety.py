"""The pure decisions of replq/safety.py (SPEC §10), exhaustively, without a cluster."""

from __future__ import annotations

import pytest

from replq.model import Snapshot
from replq.safety import (
    Markers,
    Replica,
    after_base,
    age_text,
    divergence,
    fresher,
    freshest_node,
    is_own_copy,
    live_markers,
    measure_from,
    newest_replica,
    node_alive,
    removal_refusal,
    replica_markers,
    source_refusal,
)

A, B = Snapshot("__replicate_100-0_1000__", 11, 1000), Snapshot("__replicate_100-1_1500__", 12, 1500)
NEW = Snapshot("__replicate_100-0_2000__", 13, 2000)
SENT = [A, B, NEW]


# ------------------------------------------------------------------------- is_own_copy (item 7)


@pytest.mark.parametrize(("target", "own"), [
    ([A, B, NEW], True),                       # the -R copy as sent
    ([NEW], True),                             # a subset of what was sent, the new snapshot included
    (None, False),                             # nothing there
    ([], False),                               # a dataset without snapshots: not what this run sent
    ([A, B], False),                           # the new snapshot did not arrive
    ([A, B, Snapshot(NEW.name, 99, 2000)], False),  # same name, another guid: another hand's
    ([A, B, NEW, Snapshot("manual", 5, 2100)], False),  # gained a snapshot of its own
    ([Snapshot("precious", 77, 5)], False),    # appeared by another hand
])
def test_a_target_dataset_is_destroyed_only_when_it_is_this_runs_copy(target: list[Snapshot] | None,
                                                                       own: bool) -> None:
    assert is_own_copy(target, SENT, NEW.name, NEW.guid) is own


def test_a_guid_that_was_not_sent_proves_nothing() -> None:
    assert not is_own_copy([A, B, NEW], SENT, NEW.name, 99)
    assert not is_own_copy([A, B, NEW], [A, B], NEW.name, NEW.guid)


# ------------------------------------------------------------------------- divergence (item 1)

BASE = Snapshot("__replicate_100-0_1000__", 21, 1000)
REPLICA = Markers(guest=100, role="replica", job="100-0", source="node1")
NONE = Markers()


def _div(target: Markers = REPLICA, source: Markers = NONE, newer: list[Snapshot] | None = None,
         changed: int | None = 0) -> list[str] | None:
    d = divergence("node2", "rpool/data/subvol-100-disk-0", 100, "100-0", target, source, newer or [], changed,
                   BASE.name)
    return None if d is None else d.reasons


def test_an_unchanged_replica_of_this_job_may_receive() -> None:
    assert _div() is None
    assert _div(target=NONE) is None  # received before replq marked replicas
    assert _div(target=Markers(guest=100, role="replica", job="100-0", source="node9")) is None  # the guest moved


@pytest.mark.parametrize(("target", "source", "changed", "newer", "reason"), [
    (REPLICA, NONE, 4096, [], "was written after the common base __replicate_100-0_1000__"),
    (REPLICA, NONE, None, [], "could not be checked for changes"),
    (REPLICA, NONE, 9, [Snapshot("manual", 5, 1500)], "holds data newer than the common base"),
    (REPLICA, NONE, None, [Snapshot("manual", 5, 1500)], "could not be checked"),
    (Markers(guest=200, role="replica", job="200-0"), NONE, 0, [], "belongs to guest 200"),
    (Markers(guest=100, role="replica", job="100-1"), NONE, 0, [], "is the replica of job 100-1, not 100-0"),
    (Markers(guest=100, role="live", since=50), NONE, 0, [], "is marked as the guest's live disk (since 50)"),
    # live there, and here since earlier (or not marked here): the store may be older than the disks
    (Markers(guest=100, role="live", since=50), Markers(guest=100, role="live", since=50), 0, [], "live disk"),
    (Markers(guest=100, role="live", since=50), Markers(guest=100, role="live", since=40), 0, [], "live disk"),
])
def test_divergence(target: Markers, source: Markers, changed: int | None, newer: list[Snapshot],
                    reason: str) -> None:
    reasons = _div(target, source, newer, changed)
    assert reasons is not None and any(reason in r for r in reasons), reasons


def test_the_old_live_disk_after_a_move_may_receive_if_unchanged() -> None:
    """The guest moved away from node2 (its disk there became live before the one here)."""
    old_live = Markers(guest=100, role="live", since=50)
    assert _div(old_live, Markers(guest=100, role="live", since=60)) is None
    assert _div(old_live, Markers(guest=100, role="live", since=60), changed=1) is not None  # but never if written


def test_newer_snapshots_that_hold_nothing_new_go_with_the_rollback() -> None:
    """After a failover a replica may carry a later sync of another job that changed nothing."""
    assert _div(newer=[Snapshot("__replicate_100-1_1500__", 5, 1500)], changed=0) is None


def test_every_reason_is_reported_with_the_amount() -> None:
    d = divergence("node2", "ds", 100, "100-0", Markers(guest=200, role="live"), NONE, [Snapshot("x", 1, 2000)],
                   10, BASE.name)
    assert d is not None and len(d.reasons) == 3 and d.lost == 10 and (d.node, d.dataset) == ("node2", "ds")


def test_after_base_tells_own_committed_receives_from_other_newer_snapshots() -> None:
    own = Snapshot("__replicate_100-0_1500__", 31, 1500)  # committed while its run failed: not on the source
    other = Snapshot("__replicate_100-1_1600__", 32, 1600)
    manual = Snapshot("manual", 33, 1700)
    common = Snapshot("__replicate_100-1_1200__", 34, 1200)  # newer than the base, but on both sides
    check = Snapshot("__replq_check_1800__", 35, 1800)
    older = Snapshot("old-manual", 36, 900)
    target = [older, BASE, common, own, other, manual, check]
    assert after_base("100-0", BASE, target, [BASE, common], 1000) == ([own], [other, manual])
    # The job's last sync came from another node (or the job switched direction): its own newer
    # snapshot there holds data only the target has.
    assert after_base("100-0", BASE, target, [BASE, common], None) == ([], [own, other, manual])
    assert after_base("100-0", BASE, target, [BASE, common], 1500) == ([], [own, other, manual])
    assert measure_from(BASE, [own], []) == own  # changes after our own committed receive
    assert measure_from(BASE, [own], [other]) == BASE  # other snapshots hold data: everything since the base
    assert measure_from(BASE, [], []) == BASE


def test_the_guests_own_disk_marked_as_a_replica_refuses_the_run() -> None:
    assert source_refusal("node1", "ds", 100, NONE) is None
    assert source_refusal("node1", "ds", 100, Markers(guest=100, role="live", since=5)) is None
    msg = source_refusal("node1", "ds", 100, Markers(guest=100, role="replica", job="100-0", source="node2"))
    assert msg is not None and msg.startswith("diverged: 'ds' on node 'node1' is marked as a replica of job 100-0")
    assert "zfs inherit replq:role ds" in msg


def test_markers_parse_only_what_replq_wrote() -> None:
    m = Markers.parse({"replq:guest": "100", "replq:role": "live", "replq:since": "77", "replq:job": ""})
    assert m == Markers(guest=100, role="live", since=77)
    assert Markers.parse({"replq:guest": "x1"}).guest is None
    assert replica_markers(100, "100-0", "node1") == {"replq:guest": "100", "replq:role": "replica",
                                                      "replq:job": "100-0", "replq:source": "node1"}
    assert live_markers(100, 77) == {"replq:guest": "100", "replq:role": "live", "replq:since": "77"}


@pytest.mark.parametrize(("markers", "keep"), [
    (NONE, None), (REPLICA, None),
    (Markers(guest=100, role="live"), "live disk of guest 100"),
    (Markers(guest=200, role="replica"), "belongs to guest 200"),
    (Markers(guest=100, role="replica", job="100-1"), "replica of job 100-1"),
])
def test_a_volume_no_longer_wanted_goes_only_if_it_is_this_jobs_replica(markers: Markers, keep: str | None) -> None:
    why = removal_refusal(markers, 100, "100-0")
    assert (why is None) if keep is None else (keep in (why or ""))


# ------------------------------------------------------------------------- liveness (item 4)

NOW = 10_000.0
SILENT = ("silent", "node 'node1' (10.0.0.1:22) is unreachable: [Errno 111] Connection refused")


@pytest.mark.parametrize(("heartbeat", "ssh", "evidence"), [
    (NOW - 3, SILENT, "its worker sent a heartbeat 3 s ago (liveness window 60 s)"),
    (NOW - 60, SILENT, "heartbeat 1 min ago"),  # the window's edge still counts
    (None, ("refused", "its SSH server (10.0.0.1:22) answers with the pinned host key (our login failed: …)"),
     "answers with the pinned host key"),  # a refused login: the node runs
    (None, ("login", "its SSH server (10.0.0.1:22) answers with the pinned host key"), "pinned host key"),
    (None, ("other-key", "host key of node 'node1' changed"), "with another host key"),
    (NOW - 5, ("refused", "its SSH server answers"), "5 s ago (liveness window 60 s); its SSH server answers"),
])
def test_a_node_is_alive_when_anything_says_so(heartbeat: float | None, ssh: tuple[str, str], evidence: str) -> None:
    alive = node_alive(heartbeat, NOW, 60, ssh)
    assert alive is not None and evidence in alive, alive


@pytest.mark.parametrize("heartbeat", [None, NOW - 61, NOW - 3600])
def test_a_node_is_dead_only_without_heartbeat_and_without_ssh(heartbeat: float | None) -> None:
    assert node_alive(heartbeat, NOW, 60, SILENT) is None


def test_age_text() -> None:
    assert [age_text(s) for s in (0, 59, 60, 3599, 3600, 86400 * 2 + 5, -3)] == \
        ["0 s", "59 s", "1 min", "59 min", "1 h", "2 d", "0 s"]


# ------------------------------------------------------------------------- freshest replica (item 5)

DS0, DS1 = "rpool/data/subvol-100-disk-0", "rpool/data/subvol-100-disk-1"
S_A = Snapshot("__replicate_100-0_1000__", 1, 1000)  # node2's last sync
S_B = Snapshot("__replicate_100-1_2000__", 2, 2000)  # node3's, later
FOREIGN = Snapshot("__replicate_200-0_9000__", 9, 9000)  # another guest's: never counts


def test_newest_replica_counts_only_the_guests_replication_snapshots() -> None:
    assert newest_replica("node3", DS0, [S_A, S_B, FOREIGN, Snapshot("manual", 5, 9500)], 100).snapshot == S_B
    assert newest_replica("node3", DS0, [Snapshot("manual", 5, 9500)], 100).snapshot is None


def test_a_node_with_an_older_replica_is_refused_and_the_newer_one_named() -> None:
    found = [Replica("node2", DS0, S_A), Replica("node3", DS0, S_B)]
    assert fresher(found, "node2") == [(found[1], found[0])]
    assert fresher(found, "node3") == []
    assert freshest_node(found) == "node3"


def test_the_same_snapshot_on_both_is_equally_fresh() -> None:
    found = [Replica("node2", DS0, S_B), Replica("node3", DS0, S_B)]
    assert fresher(found, "node2") == fresher(found, "node3") == []
    # Same name, another guid (a diverged history): the later creation wins.
    other = Snapshot(S_B.name, 99, 2500)
    assert fresher([Replica("node2", DS0, S_B), Replica("node3", DS0, other)], "node2") != []


def test_freshness_is_per_disk() -> None:
    """node2 is newer for disk-0, node3 for disk-1: neither is the freshest for every disk."""
    found = [Replica("node2", DS0, S_B), Replica("node3", DS0, S_A), Replica("node2", DS1, S_A),
             Replica("node3", DS1, S_B)]
    assert [r.dataset for r, _ in fresher(found, "node2")] == [DS1]
    assert freshest_node(found) is None
    assert freshest_node([Replica("node2", DS0, S_B)]) == "node2"
    # A node without one of the disks is never the freshest.
    assert freshest_node([Replica("node2", DS0, S_A), Replica("node3", DS0, S_B), Replica("node2", DS1, S_A)]) is None
    # A node without a replication snapshot of the guest is older than any that has one.
    assert fresher([Replica("node2", DS0, None), Replica("node3", DS0, S_A)], "node2") != []
