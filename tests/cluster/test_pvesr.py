"""pvesr's commands on real nodes (real zfs-fuse), run inside a node as pvesr runs them:
prepare-local-job and finalize-local-job on a target (what they delete, keep and print), and
`run --id --verbose`, whose output is pvesr's log messages. Guests are 160x.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from replq.sandbox import Sandbox
from tests.support.cluster import POOL, Nodes, snap

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def nodes(sandbox: Sandbox) -> Iterator[Nodes]:
    n = Nodes(sandbox, range(1600, 1610))
    try:
        yield n
    finally:
        n.cleanup()


def _target_volume(nodes: Nodes, name: str, snaps: list[str]) -> str:
    ds = f"{POOL}/{name}"
    nodes.zfs("node2", "create", ds)
    for s in snaps:
        nodes.zfs("node2", "snapshot", f"{ds}@{s}")
    return ds


def _info(nodes: Nodes, ds: str) -> dict[str, dict[str, str]]:
    out = nodes.sh("node2", f"zfs get -Hp -r -o name,property,value guid,creation {ds}")
    info: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        name, prop, value = line.split("\t")
        if "@" not in name:
            continue
        info.setdefault(name.split("@", 1)[1], {})["id" if prop == "guid" else "timestamp"] = value
    return info


def test_prepare_removes_stale_snapshots_and_volumes(nodes: Nodes) -> None:
    nodes.guest(1600, "node1", ndisks=1, mb=1)  # the guest lives on node1; node2 is the target
    disk0 = _target_volume(nodes, "subvol-1600-disk-0",
                           [snap("1600-0", 1000), snap("1600-0", 2000), snap("1600-10", 1500), "before-upgrade"])
    disk1 = _target_volume(nodes, "subvol-1600-disk-1", [snap("1600-0", 2000)])  # no longer replicated
    disk2 = _target_volume(nodes, "subvol-1600-disk-2", ["manual"])  # the guest's, not this job's

    r = nodes.ok("node2", "prepare-local-job", "1600-0", "local-zfs:subvol-1600-disk-0", "--scan", "local-zfs",
                 "--last_sync", "2000")
    # What is left on the guest's volumes here, as volume_snapshot_info reports it (strings);
    # disk-2 is listed too (scanned, not stale), as pvesr does.
    assert json.loads(r.stdout) == {"local-zfs:subvol-1600-disk-0": _info(nodes, disk0),
                                    "local-zfs:subvol-1600-disk-2": _info(nodes, disk2)}
    assert set(_info(nodes, disk0)) == {snap("1600-0", 2000), snap("1600-10", 1500), "before-upgrade"}
    assert r.stdout.count("\n") == 1  # one JSON line, as pvesr's to_json
    assert r.stderr.splitlines() == [
        f"delete stale replication snapshot '{snap('1600-0', 1000)}' on local-zfs:subvol-1600-disk-0",
        "1600-0: delete stale volume 'local-zfs:subvol-1600-disk-1'",
    ]
    # Job 1600-10's snapshot stays (pvesr's prefix match would have taken it for 1600-1's or 1600-0's
    # kin); the guest's own snapshot and the volume without the job's snapshots stay.
    assert nodes.snapshots("node2", disk0) == sorted([snap("1600-0", 2000), snap("1600-10", 1500), "before-upgrade"])
    assert not nodes.exists("node2", disk1) and nodes.snapshots("node2", disk2) == ["manual"]


def test_prepare_without_last_sync_snapshot_removes_nothing(nodes: Nodes) -> None:
    nodes.guest(1601, "node1", ndisks=1, mb=1)
    ds = _target_volume(nodes, "subvol-1601-disk-0", [snap("1601-0", 1000)])
    r = nodes.ok("node2", "prepare-local-job", "1601-0", "local-zfs:subvol-1601-disk-0", "--last_sync", "3000")
    assert r.stderr.splitlines() == [
        f"expected snapshot {snap('1601-0', 3000)} not present for local-zfs:subvol-1601-disk-0, not removing others"]
    assert nodes.snapshots("node2", ds) == [snap("1601-0", 1000)]
    # last_sync 0 (a stolen guest): nothing is removed, nothing said.
    r = nodes.ok("node2", "prepare-local-job", "1601-0", "local-zfs:subvol-1601-disk-0")
    assert r.stderr == "" and nodes.snapshots("node2", ds) == [snap("1601-0", 1000)]


def test_finalize_keeps_only_last_sync(nodes: Nodes) -> None:
    nodes.guest(1602, "node1", ndisks=1, mb=1)
    ds = _target_volume(nodes, "subvol-1602-disk-0", [snap("1602-0", 1000), snap("1602-0", 2000)])
    r = nodes.ok("node2", "finalize-local-job", "1602-0", "local-zfs:subvol-1602-disk-0", "--last_sync", "2000")
    assert r.stdout == ""
    assert r.stderr.splitlines() == [
        f"delete stale replication snapshot '{snap('1602-0', 1000)}' on local-zfs:subvol-1602-disk-0"]
    assert nodes.snapshots("node2", ds) == [snap("1602-0", 2000)]


def test_refusals(nodes: Nodes) -> None:
    nodes.guest(1603, "node1", ndisks=1, mb=1)
    assert "guest '1603' is on local node" in nodes.refused(
        "node1", "prepare-local-job", "1603-0", "local-zfs:subvol-1603-disk-0")
    assert "no volumes specified" in nodes.refused("node2", "prepare-local-job", "1603-0")
    assert "no volumes specified" in nodes.refused("node2", "finalize-local-job", "1603-0")
    assert "has wrong owner" in nodes.refused("node2", "finalize-local-job", "1603-0", "local-zfs:subvol-1604-disk-0")
    assert "does not exist" in nodes.refused("node2", "finalize-local-job", "1603-0", "nosuch:subvol-1603-disk-0")


def test_run_verbose_prints_pvesr_log_messages(nodes: Nodes) -> None:
    (ds,) = nodes.guest(1604, "node1", ndisks=1, mb=1)
    nodes.job("1604-0", "node2", rate=50)
    r = nodes.ok("node1", "run", "--id", "1604-0", "--local", "--verbose")
    new = snap("1604-0", nodes.state("1604-0").last_sync)
    vol = "local-zfs:subvol-1604-disk-0"
    pvesr = [line for line in r.stdout.splitlines() if not line.startswith(("connecting to", f"{vol}: "))]
    assert pvesr == [
        "start replication job",
        "guest => CT 1604, running => 0",
        f"volumes => {vol}",
        f"create snapshot '{new}' on {vol}",
        "using secure transmission, rate limit: 50 MByte/s",
        f"full sync '{vol}' ({new})",
        f"successfully imported '{vol}'",
        "end replication job",
    ]
    # The log has the same lines behind pvesr's `%F %H:%M:%S JOB: ` prefix.
    log = nodes.store.read_log("1604-0")
    assert [line.split(" 1604-0: ", 1)[1] for line in log] == r.stdout.splitlines()
    assert nodes.snapshots("node2", ds) == [new]
