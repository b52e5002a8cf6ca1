"""Removing jobs and guests on the real sandbox cluster (SPEC §7): `delete` (full), `delete --keep`,
`delete --force`, a removal pending while its target is down, and `guest remove --purge`.

Each case checks the exact snapshots and volumes left on both sides. Guests are 71x.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from replq.sandbox import Sandbox
from tests.support.cluster import Nodes, snap

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def nodes(sandbox: Sandbox) -> Iterator[Nodes]:
    n = Nodes(sandbox, range(710, 720))
    try:
        yield n
    finally:
        n.cleanup()


def _synced(nodes: Nodes, vmid: int, target: str, runs: int = 1, ndisks: int = 1) -> tuple[list[str], str]:
    """Guest `vmid` on node1 replicated `runs` times to `target`; returns its datasets and last snapshot."""
    dss = nodes.guest(vmid, "node1", ndisks=ndisks, mb=1)
    job_id = f"{vmid}-0"
    nodes.job(job_id, target)
    for i in range(runs):
        if i:
            nodes.write("node1", dss[0], f"more{i}", 1)
            time.sleep(1)
        nodes.run(job_id, "node1")
    last = snap(job_id, nodes.store.get_state(job_id).last_sync)
    for ds in dss:
        assert nodes.snapshots("node1", ds) == nodes.snapshots(target, ds) == [last]
    return dss, last


def test_delete_full_through_the_worker(nodes: Nodes) -> None:
    """`delete`: the job's snapshots on both sides and its replicas go, then config and state;
    another job of the guest (to node3) and the guest's own volumes are untouched."""
    dss, first = _synced(nodes, 710, "node2", runs=2, ndisks=2)
    nodes.job("710-1", "node3")
    nodes.run("710-1", "node1")
    other = snap("710-1", nodes.store.get_state("710-1").last_sync)
    sums = {ds: nodes.checksum("node1", ds) for ds in dss}

    nodes.ok("node1", "delete", "710-0")
    assert nodes.store.get_job("710-0").remove_job == "full"
    # The removal runs in the background on the guest's node: here by its worker, asked by `run`.
    worker = nodes.start_worker("node1")
    try:
        r = nodes.ok("node1", "run", "--id", "710-0")
        assert "710-0: queued on node 'node1'" in r.stdout and "710-0: OK" in r.stdout, r.stdout
    finally:
        nodes.stop(worker)
    assert "710-0" not in nodes.store.job_ids()
    assert nodes.store.redis.exists(nodes.store.k("state", "710-0")) == 0
    assert nodes.volumes("node2", 710) == []  # replicas gone
    assert nodes.volumes("node1", 710) == dss  # the guest's volumes stay, with the other job's snapshot only
    for ds in dss:
        assert nodes.snapshots("node1", ds) == [other] and nodes.checksum("node1", ds) == sums[ds]
        # 710-1's first (full, -R) send had carried 710-0's snapshot of that moment to node3: the
        # removal took it there too (issue 11 §8), the source no longer having it.
        assert nodes.snapshots("node3", ds) == [other]
    time.sleep(1)
    nodes.run("710-1", "node1")  # the other job goes on
    st = nodes.store.get_state("710-1")
    for ds in dss:
        assert nodes.snapshots("node1", ds) == nodes.snapshots("node3", ds) == [snap("710-1", st.last_sync)]


def test_delete_keep(nodes: Nodes) -> None:
    (ds,), _ = _synced(nodes, 711, "node2", runs=2)
    replica = nodes.checksum("node2", ds)
    nodes.ok("node1", "delete", "711-0", "--keep")
    assert nodes.store.get_job("711-0").remove_job == "local"
    nodes.run("711-0", "node1")
    assert "711-0" not in nodes.store.job_ids()
    assert nodes.volumes("node2", 711) == [ds] and nodes.checksum("node2", ds) == replica  # kept
    assert nodes.snapshots("node2", ds) == [] and nodes.snapshots("node1", ds) == []  # snapshots cleaned


def test_delete_force(nodes: Nodes) -> None:
    (ds,), last = _synced(nodes, 712, "node2")
    nodes.ok("node1", "delete", "712-0", "--force")
    assert "712-0" not in nodes.store.job_ids()  # at once, without any cleanup
    assert nodes.store.redis.zscore(nodes.store.k("sched"), "712-0") is None
    assert nodes.volumes("node2", 712) == [ds]
    assert nodes.snapshots("node1", ds) == nodes.snapshots("node2", ds) == [last]


def test_removal_pending_while_the_target_is_down(nodes: Nodes) -> None:
    """The target is down: the removal fails, stays pending, is due again retry_interval later
    (not every tick), and completes once the target is back. Migrating to the dead node is refused."""
    (ds,), last = _synced(nodes, 713, "node3")
    (other,) = nodes.guest(714, "node1", mb=1)
    nodes.ok("node1", "delete", "713-0")
    retry = nodes.store.get_settings()["retry_interval"]
    try:
        nodes.sb.stop_node("node3")
        r = nodes.replq("node1", "run", "--id", "713-0", "--local")
        assert r.returncode == 1 and "node 'node3'" in r.stderr and "unreachable" in r.stderr, r.stderr
        st = nodes.store.get_state("713-0")
        assert st.fail_count == 1 and "unreachable" in st.error
        assert nodes.store.get_job("713-0").remove_job == "full"  # still pending
        assert nodes.store.next_sync("713-0") == pytest.approx(st.last_try + retry)
        assert nodes.snapshots("node1", ds) == [last]  # nothing removed halfway
        err = nodes.refused("node1", "migrate", "714", "node3")
        assert "cannot migrate guest 714: target node 'node3'" in err and "unreachable" in err, err
        assert nodes.store.get_guest(714).node == "node1" and nodes.volumes("node1", 714) == [other]
        assert nodes.snapshots("node1", other) == []
    finally:
        nodes.sb.start_node("node3")
    assert nodes.snapshots("node3", ds) == [last]
    nodes.run("713-0", "node1")  # the retry
    assert "713-0" not in nodes.store.job_ids()
    assert nodes.volumes("node3", 713) == []
    assert nodes.volumes("node1", 713) == [ds] and nodes.snapshots("node1", ds) == []


def test_guest_remove_purge_cleans_the_replicas(nodes: Nodes) -> None:
    (ds,), _ = _synced(nodes, 715, "node2")
    nodes.job("715-1", "node3")
    nodes.run("715-1", "node1")
    err = nodes.refused("node1", "guest", "remove", "715")
    assert "There is a replication job '715-0' for guest '715' - Please remove that first" in err
    r = nodes.ok("node1", "guest", "remove", "715", "--purge")
    assert "715-0, 715-1" in r.stdout
    assert {j.remove_job for j in nodes.store.list_jobs(715)} == {"full"}
    nodes.run("715-0", "node1")
    assert nodes.store.get_guest(715).purge  # the record stays until its last job is gone
    nodes.run("715-1", "node1")
    assert nodes.store.job_ids(715) == [] and 715 not in [g.vmid for g in nodes.store.list_guests()]
    assert nodes.volumes("node2", 715) == [] and nodes.volumes("node3", 715) == []  # no orphaned replicas
    assert nodes.volumes("node1", 715) == [ds] and nodes.snapshots("node1", ds) == []
