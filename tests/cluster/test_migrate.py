"""Migration and guest recovery on the real sandbox cluster (SPEC §6): real zfs-fuse pools, sshd,
Redis, and for the split-brain check a real `replq worker` inside node1.

Every replq command runs inside a node (`sandbox exec`), where an operator would run it:
`migrate` on the guest's node, `guest move` on the node taking the guest over. Guests are
7xx so they never meet other modules' guests in the shared session sandbox.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from replq.sandbox import Sandbox
from tests.support.cluster import MOUNT, POOL, MiB, Nodes, snap

pytestmark = pytest.mark.sandbox



@pytest.fixture(scope="module")
def nodes(sandbox: Sandbox) -> Iterator[Nodes]:
    n = Nodes(sandbox, range(700, 710))
    try:
        yield n
    finally:
        n.cleanup()


# ------------------------------------------------------------------------------------ migrate


def test_migrate_to_replication_target_sends_delta_and_switches(nodes: Nodes) -> None:
    """The seed's example: VM on node1 replicating to node2; migrate to node2 → node2 ⇒ node1.
    Its second job (to node3) goes on from node2, incrementally."""
    ds, norep = nodes.guest(701, "node1", ndisks=2, mb=8, norep=1)
    nodes.job("701-0", "node2")
    nodes.job("701-1", "node3")
    nodes.run("701-0", "node1")
    nodes.run("701-1", "node1")
    s1 = snap("701-1", nodes.store.get_state("701-1").last_sync)
    first = nodes.store.get_state("701-0").last_sync
    nodes.write("node1", ds, "late", 2)  # written after the last sync: the delta
    before, before_norep = nodes.checksum("node1", ds), nodes.checksum("node1", norep)
    time.sleep(1)

    r = nodes.ok("node1", "migrate", "701", "node2", "--output-format", "json")
    res = json.loads(r.stdout)
    assert res["mode"] == "delta" and res["job"] == "701-0"
    # The replicate=0 disk is not replicated: it moves by a full copy, its source volume goes.
    assert res["copied"] == [norep] and res["removed"] == [norep] and res["warnings"] == []
    assert res["switched"] == [{"id": "701-0", "target": "node1", "source": "node2"},
                               {"id": "701-1", "target": "node3", "source": "node2"}]
    assert nodes.store.get_guest(701).node == "node2"
    job, st = nodes.store.get_job("701-0"), nodes.store.get_state("701-0")
    assert (job.target, job.source) == ("node1", "node2")
    assert st.last_sync > first and st.fail_count == 0  # the job state moved with the guest
    assert 2 * MiB <= st.bytes < 4 * MiB, st.bytes  # the job sent only the delta, not the 10 MiB volume
    assert nodes.volumes("node1", 701) == [ds] and nodes.volumes("node2", 701) == [ds, norep]
    assert nodes.checksum("node2", norep) == before_norep and nodes.snapshots("node2", norep) == []
    assert nodes.checksum("node2", ds) == before == nodes.checksum("node1", ds)
    # Both sides keep exactly the migration run's snapshot (the base of the reversed job), and
    # the delta carried 701-1's snapshot along (the base for 701-1 from node2).
    assert nodes.snapshots("node1", ds) == nodes.snapshots("node2", ds) == sorted([snap("701-0", st.last_sync), s1])
    assert nodes.store.redis.sismember(nodes.store.k("nodetargets", "node1"), "701-0")
    assert not nodes.store.redis.sismember(nodes.store.k("nodetargets", "node2"), "701-0")

    # The old node's copy is the job's read-only replica now; node2's is the writable live disk.
    probe = nodes.sb.exec("node1", ["touch", f"{MOUNT}/{ds.rsplit('/', 1)[1]}/probe"], timeout=60)
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr, probe.stderr
    marks = nodes.sh("node1", f"zfs get -H -o property,value,source replq:role,replq:job,replq:source {ds}")
    assert marks.split() == ["replq:role", "replica", "local", "replq:job", "701-0", "local",
                             "replq:source", "node2", "local"], marks
    # Now it replicates node2 → node1, incrementally: about the 3 MiB written on node2.
    assert "lives on node 'node2'" in nodes.refused("node1", "run", "--id", "701-0", "--local")
    nodes.write("node2", ds, "after", 3)
    time.sleep(1)
    nodes.run("701-0", "node2")
    st2 = nodes.store.get_state("701-0")
    assert 3 * MiB <= st2.bytes < 5 * MiB, st2.bytes
    log = nodes.store.read_log("701-0")
    assert any(f"({snap('701-0', st.last_sync)} => " in line and "incremental sync '" in line for line in log), log
    assert nodes.checksum("node1", ds) == nodes.checksum("node2", ds)
    new0 = [snap("701-0", st2.last_sync)]
    assert nodes.job_snapshots("node1", ds, "701-0") == nodes.job_snapshots("node2", ds, "701-0") == new0
    nodes.run("701-1", "node2")
    st3 = nodes.store.get_state("701-1")
    assert 5 * MiB <= st3.bytes < 7 * MiB, st3.bytes  # the 2 + 3 MiB written since s1, not the volume
    assert any(f"({s1} => " in line and "incremental sync '" in line for line in nodes.store.read_log("701-1"))
    assert nodes.checksum("node3", ds) == nodes.checksum("node2", ds)
    new1 = [snap("701-1", st3.last_sync)]
    assert nodes.job_snapshots("node2", ds, "701-1") == nodes.job_snapshots("node3", ds, "701-1") == new1


def test_migrate_without_job_copies_in_full_and_removes_the_source(nodes: Nodes) -> None:
    """No job to node2: full copy (replicate=0 disk included), checked, then the source volumes go.
    The guest's job to node3 goes on from node2, incrementally (the -R copy carried its snapshot)."""
    d0, d1 = nodes.guest(702, "node1", ndisks=2, mb=3, norep=1)
    nodes.job("702-0", "node3")
    nodes.run("702-0", "node1")
    base = snap("702-0", nodes.store.get_state("702-0").last_sync)
    sums = {ds: nodes.checksum("node1", ds) for ds in (d0, d1)}
    guids = nodes.guids("node1", d0)

    r = nodes.ok("node1", "migrate", "702", "node2", "--output-format", "json")
    res = json.loads(r.stdout)
    assert res["mode"] == "full" and res["job"] is None
    assert res["copied"] == [d0, d1] and res["removed"] == [d0, d1] and res["warnings"] == []
    assert res["bytes"] >= 6 * MiB
    assert res["switched"] == [{"id": "702-0", "target": "node3", "source": "node2"}]
    assert nodes.store.get_guest(702).node == "node2"
    assert nodes.volumes("node1", 702) == []  # source volumes gone
    assert nodes.volumes("node2", 702) == [d0, d1]
    for ds in (d0, d1):
        assert nodes.checksum("node2", ds) == sums[ds]
    # The replication snapshot arrived as itself (same guid); the migration snapshot is gone.
    assert nodes.snapshots("node2", d0) == [base] and nodes.guids("node2", d0) == guids
    assert nodes.snapshots("node2", d1) == []

    nodes.write("node2", d0, "new", 1)
    time.sleep(1)
    nodes.run("702-0", "node2")
    st = nodes.store.get_state("702-0")
    assert st.bytes < 2 * MiB, st.bytes
    assert any(f"({base} => " in line and "incremental sync '" in line for line in nodes.store.read_log("702-0"))
    assert nodes.checksum("node2", d0) == nodes.checksum("node3", d0)
    assert nodes.snapshots("node2", d0) == nodes.snapshots("node3", d0) == [snap("702-0", st.last_sync)]


def test_migrate_refusals_change_nothing(nodes: Nodes) -> None:
    (ds,) = nodes.guest(703, "node1", mb=1)
    nodes.sh("node3", f"zfs create {ds}")  # a foreign volume of that name on node3
    assert "run the migration there" in nodes.refused("node2", "migrate", "703", "node3")
    assert "already lives on node 'node1'" in nodes.refused("node1", "migrate", "703", "node1")
    err = nodes.refused("node1", "migrate", "703", "node3")
    assert "already exist on node 'node3'" in err and "refusing to overwrite" in err
    assert "no such cluster node 'node9'" in nodes.refused("node1", "migrate", "703", "node9")
    assert nodes.store.get_guest(703).node == "node1"
    assert nodes.volumes("node1", 703) == [ds] and nodes.snapshots("node1", ds) == []
    assert nodes.snapshots("node3", ds) == []


def test_failed_full_copy_leaves_the_guest_where_it_was(nodes: Nodes) -> None:
    """node3's pool runs out of space mid-copy: the partial copy is deleted, the guest stays."""
    (ds,) = nodes.guest(707, "node1", mb=12)
    before = nodes.checksum("node1", ds)
    used = int(nodes.sh("node3", f"zfs get -Hp -o value used {POOL}"))
    nodes.sh("node3", f"zfs set quota={used + 4 * MiB} {POOL}")
    try:
        err = nodes.refused("node1", "migrate", "707", "node3")
    finally:
        nodes.sh("node3", f"zfs set quota=none {POOL}")
    assert "cannot migrate guest 707" in err and "the guest stays on node 'node1'" in err, err
    assert nodes.store.get_guest(707).node == "node1"
    assert nodes.volumes("node3", 707) == []  # no partial copy
    assert nodes.snapshots("node1", ds) == [] and nodes.checksum("node1", ds) == before
    # With the space back, the same migration goes through.
    r = nodes.ok("node1", "migrate", "707", "node3")
    assert "guest 707 migrated from node1 to node3 (full copy, " in r.stdout, r.stdout
    assert nodes.volumes("node1", 707) == [] and nodes.checksum("node3", ds) == before


def _wait_progress(nodes: Nodes, job_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = nodes.store.get_state(job_id).progress
        if p and p.get("bytes", 0) > MiB:
            return
        time.sleep(0.2)
    raise AssertionError(f"no progress for {job_id}: {nodes.store.read_log(job_id)}")


def test_migrate_refused_while_a_replication_of_the_guest_runs(nodes: Nodes) -> None:
    (ds,) = nodes.guest(704, "node1", mb=1)
    nodes.job("704-0", "node2")
    nodes.run("704-0", "node1")
    nodes.write("node1", ds, "big", 20)
    nodes.store.update_job("704-0", {"rate": 4})  # the next run takes ~5 s
    time.sleep(1)
    proc = nodes.popen("node1", "run", "--id", "704-0", "--local")
    try:
        _wait_progress(nodes, "704-0")
        err = nodes.refused("node1", "migrate", "704", "node2")
        assert "cannot migrate guest 704: replication job 704-0 is running" in err, err
        assert nodes.store.get_guest(704).node == "node1"
        out, errs = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + errs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # The run was not disturbed; now the migration goes through, sending almost nothing.
    nodes.store.update_job("704-0", delete=["rate"])
    assert nodes.checksum("node1", ds) == nodes.checksum("node2", ds)
    time.sleep(1)
    res = json.loads(nodes.ok("node1", "migrate", "704", "node2", "--output-format", "json").stdout)
    assert res["bytes"] < MiB and nodes.store.get_guest(704).node == "node2"
    assert nodes.checksum("node1", ds) == nodes.checksum("node2", ds)


# ------------------------------------------------------------------------------------ recovery


def test_node_failure_guest_move_and_lazy_switch(nodes: Nodes) -> None:
    """node1 fails; the guest is moved to node2 by hand (refused while node1 answers); once node1
    is back the job replicates node2 → node1 from the newest common snapshot, even without state."""
    (ds,) = nodes.guest(705, "node1", mb=6)
    nodes.job("705-0", "node2")
    nodes.run("705-0", "node1")
    base = snap("705-0", nodes.store.get_state("705-0").last_sync)
    synced = nodes.checksum("node1", ds)
    nodes.write("node1", ds, "lost", 1)  # after the last sync: lost with node1, as the seed warns

    worker = nodes.start_worker("node1")
    try:
        err = nodes.refused("node2", "guest", "move", "705", "--to", "node2")
        assert "node 'node1' is alive (its worker sent a heartbeat" in err and "liveness window 60 s" in err, err
        assert "--force" in err
    finally:
        nodes.stop(worker)  # a worker that stops cleanly takes its heartbeat back
    err = nodes.refused("node2", "guest", "move", "705", "--to", "node2")
    assert "node 'node1' is alive (its SSH server (" in err and "answers with the pinned host key" in err, err
    assert "heartbeat" not in err, err
    assert nodes.store.get_guest(705).node == "node1"
    try:
        nodes.sb.stop_node("node1")
        r = nodes.ok("node2", "guest", "move", "705", "--to", "node2")
        assert "guest 705 moved from node1 to node2" in r.stdout
        assert "job 705-0: next run replicates node2 => node1" in r.stdout, r.stdout
        assert nodes.store.get_guest(705).node == "node2"
        assert nodes.checksum("node2", ds) == synced
        nodes.write("node2", ds, "written-on-node2", 3)
        keep = nodes.checksum("node2", ds)
        # A run while node1 is still down: the direction switches, the run fails clearly.
        r = nodes.replq("node2", "run", "--id", "705-0", "--local")
        assert r.returncode == 1 and "unreachable" in r.stderr and "node1" in r.stderr, r.stderr
        job = nodes.store.get_job("705-0")
        assert (job.target, job.source) == ("node1", "node2")
        assert nodes.snapshots("node2", ds) == [base]  # the common base was not touched
    finally:
        nodes.sb.start_node("node1")
    # node1 is back with `lost`, written after the common base: never rolled back (SPEC §10), even
    # with the job's state lost (pvesr keeps it per node; the base is found by name and guid).
    nodes.store.replace_states({"705-0": {}})
    on_node1 = nodes.checksum("node1", ds)
    assert "./lost" in on_node1
    time.sleep(1)
    err = nodes.refused("node2", "run", "--id", "705-0", "--local")
    assert f"diverged: '{ds}' on node 'node1' was written after the common base {base}" in err, err
    assert "(1.0 MiB would be lost by rolling it back)" in err and nodes.checksum("node1", ds) == on_node1
    # The operator accepts it: node1's state is kept aside, then node1 gets node2's data.
    r = nodes.ok("node2", "run", "--id", "705-0", "--local", "--discard-target-changes")
    st = nodes.store.get_state("705-0")
    (kept,) = st.kept
    assert kept.startswith("node1:") and nodes.checksum("node1", kept.split(":", 1)[1]) == on_node1
    assert nodes.checksum("node2", ds) == keep == nodes.checksum("node1", ds)  # nothing of node2's lost
    assert nodes.snapshots("node1", ds) == nodes.snapshots("node2", ds) == [snap("705-0", st.last_sync)]
    # From here on incremental, and with the state lost again the job finds the common base.
    nodes.store.replace_states({"705-0": {}})
    nodes.write("node2", ds, "more", 3)
    time.sleep(1)
    nodes.run("705-0", "node2")
    st2 = nodes.store.get_state("705-0")
    assert st2.fail_count == 0 and 3 * MiB <= st2.bytes < 5 * MiB, st2.bytes
    log = nodes.store.read_log("705-0")
    base2 = snap("705-0", st.last_sync)
    assert any(f"({base2} => " in line and "incremental sync '" in line for line in log), log
    assert any(f"subvol-705-disk-0: no last sync recorded: incremental from the newest common replication "
               f"snapshot {base2}" in line for line in log), log
    assert nodes.checksum("node2", ds) == nodes.checksum("node1", ds)


def test_guest_move_force(nodes: Nodes) -> None:
    nodes.guest(706, "node3", mb=1)
    err = nodes.refused("node2", "guest", "move", "706", "--to", "node2")
    assert "node 'node3' is alive" in err
    r = nodes.ok("node2", "guest", "move", "706", "--to", "node2", "--force", "--output-format", "json")
    res = json.loads(r.stdout)
    assert res["forced"] and res["source"] == "node3" and "SSH" in res["reason"]
    assert nodes.store.get_guest(706).node == "node2"
    assert "already lives on node 'node2'" in nodes.refused("node1", "guest", "move", "706", "--to", "node2")


def _failover_with_two_jobs(nodes: Nodes, vmid: int) -> tuple[str, str]:
    """Guest on node1 with jobs -0 to node2 and -1 to node3, -1 synced later than -0 (nothing
    written in between); node1 fails and the guest is moved to node2. Returns (dataset, the one
    snapshot node2 and node3 share).

    `guest move` cannot see that node3's later sync holds nothing new, so it refuses without
    --force (node3 holds the newer replica, SPEC §6); with data written in between the jobs would
    refuse to roll node3 and node1 back (tests/cluster/test_failure_safety.py)."""
    (ds,) = nodes.guest(vmid, "node1", mb=4)
    nodes.job(f"{vmid}-0", "node2")
    nodes.job(f"{vmid}-1", "node3")
    nodes.run(f"{vmid}-0", "node1")
    shared = snap(f"{vmid}-0", nodes.store.get_state(f"{vmid}-0").last_sync)
    nodes.run(f"{vmid}-1", "node1")
    time.sleep(1)
    nodes.run(f"{vmid}-1", "node1")  # node3 synced later than node2; only `shared` is on both
    assert nodes.snapshots("node2", ds) == [shared] and shared in nodes.snapshots("node3", ds)
    try:
        nodes.sb.stop_node("node1")
        nodes.ok("node2", "guest", "move", str(vmid), "--to", "node2", "--force")
    finally:
        nodes.sb.start_node("node1")
    return ds, shared


def test_after_failover_every_job_of_the_guest_keeps_a_common_base(nodes: Nodes) -> None:
    """Jobs to node2 and node3; node1 fails after 708-1 synced later than 708-0. The guest moves to
    node2; 708-0 runs first from there, and must not delete the one snapshot node2 shares with
    node3 (708-1's base now): both jobs go on incrementally, all three copies end up identical
    (the later syncs on node1 and node3 held nothing new, so they go with the rollback)."""
    ds, shared = _failover_with_two_jobs(nodes, 708)
    nodes.write("node2", ds, "y", 2)
    time.sleep(1)
    nodes.run("708-0", "node2")
    assert any(f"keep '{ds}@{shared}' on node2: base of job 708-1" in line for line in nodes.store.read_log("708-0"))
    nodes.run("708-1", "node2")
    st = nodes.store.get_state("708-1")
    assert 2 * MiB <= st.bytes < 4 * MiB, st.bytes  # incremental from `shared`, not the volume
    assert any(f"({shared} => " in line and "incremental sync '" in line for line in nodes.store.read_log("708-1"))
    job1 = nodes.store.get_job("708-1")
    assert (job1.target, job1.source) == ("node3", "node2")
    # A second round from node2: the kept snapshot goes, each job keeps exactly its newest one.
    nodes.write("node2", ds, "z", 1)
    time.sleep(1)
    nodes.run("708-0", "node2")
    nodes.run("708-1", "node2")
    new0 = snap("708-0", nodes.store.get_state("708-0").last_sync)
    new1 = snap("708-1", nodes.store.get_state("708-1").last_sync)
    assert nodes.snapshots("node2", ds) == sorted([new0, new1])
    assert nodes.job_snapshots("node1", ds, "708-0") == [new0] and nodes.job_snapshots("node3", ds, "708-1") == [new1]
    sums = {n: nodes.checksum(n, ds) for n in ("node1", "node2", "node3")}
    assert sums["node1"] == sums["node2"] == sums["node3"] and "./y" in sums["node2"]


def test_removing_a_job_after_failover_keeps_the_other_jobs_base(nodes: Nodes) -> None:
    """As above, but 709-0 is deleted (full) from node2 before 709-1 has run there: the removal
    must keep the snapshot that is 709-1's only base with node3, so 709-1 goes on incrementally."""
    ds, shared = _failover_with_two_jobs(nodes, 709)
    nodes.ok("node2", "delete", "709-0")
    nodes.run("709-0", "node2")  # the removal run, from the guest's new node
    assert "709-0" not in nodes.store.job_ids()
    assert shared in nodes.snapshots("node2", ds)  # kept: 709-1's base
    nodes.write("node2", ds, "y", 2)
    time.sleep(1)
    nodes.run("709-1", "node2")
    st = nodes.store.get_state("709-1")
    assert 2 * MiB <= st.bytes < 4 * MiB, st.bytes  # incremental from `shared`
    assert nodes.checksum("node2", ds) == nodes.checksum("node3", ds)
