"""The replication engine on the real sandbox cluster: real zfs-fuse pools, real sshd, real Redis.

The engine always runs inside the guest's node (`replq run --id J --local` through
`sb.exec`), the way a node worker runs it; ZFS is inspected inside each node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replq.model import Storage, parse_snapshot_name
from replq.sandbox import Sandbox
from tests.support.cluster import Nodes

pytestmark = pytest.mark.sandbox



@pytest.fixture(scope="module")
def cluster(sandbox: Sandbox) -> Iterator[Nodes]:
    c = Nodes(sandbox, range(200, 300))
    try:
        yield c
    finally:
        c.cleanup()


# ------------------------------------------------------------------------------------ runs


def test_full_then_incremental(cluster: Nodes) -> None:
    (ds,) = cluster.guest(200, disks=["local-zfs:subvol-200-disk-0"], mb=20)
    cluster.job("200-0", "node2")
    # Dry run first: plan only, nothing changes.
    r = cluster.replq("node1", "run", "--id", "200-0", "--dry-run", "--output-format", "json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["volumes"][0]["mode"] == "full" and plan["volumes"][0]["base"] is None
    assert plan["estimated_size"] > 0  # zfs-fuse's space accounting lags the writes until the next txg
    assert cluster.snapshots("node1", ds) == [] and not cluster.exists("node2", ds)

    cluster.run("200-0")
    st = cluster.state("200-0")
    assert st.fail_count == 0 and st.error is None and st.last_sync > 0 and st.last_sync == st.last_try
    assert st.bytes > 20_000_000
    assert st.progress is None and st.worker is None
    assert cluster.store.get_job("200-0").source == "node1"  # filled in by the first run
    assert cluster.checksum("node1", ds) == cluster.checksum("node2", ds)
    first = cluster.job_snapshots("node1", ds, "200-0")
    assert first == cluster.job_snapshots("node2", ds, "200-0") and len(first) == 1

    log = cluster.store.read_log("200-0")
    assert log[0].endswith("200-0: start replication job") and log[-1].endswith("200-0: end replication job")
    assert all(line[:19].replace("-", "").replace(":", "").replace(" ", "").isdigit() for line in log)
    r = cluster.replq("node1", "log", "200-0")
    assert r.returncode == 0 and r.stdout.splitlines() == log

    # Change 3 MiB of 20: the incremental run sends about that, not the volume.
    cluster.write("node1", ds, "more", 3)
    time.sleep(1)  # snapshot names are per second
    r = cluster.replq("node1", "run", "--id", "200-0", "--dry-run")
    assert r.returncode == 0 and "incremental" in r.stdout and first[0] in r.stdout
    cluster.run("200-0")
    st = cluster.state("200-0")
    assert 3_000_000 < st.bytes < 6_000_000, st.bytes
    assert cluster.checksum("node1", ds) == cluster.checksum("node2", ds)
    second = cluster.job_snapshots("node1", ds, "200-0")
    assert len(second) == 1 and second != first
    assert cluster.job_snapshots("node2", ds, "200-0") == second
    assert parse_snapshot_name(second[0])[1] == int(st.last_sync)


def test_several_volumes_and_replicate_0(cluster: Nodes) -> None:
    disks = ["local-zfs:subvol-201-disk-0", "local-zfs:subvol-201-disk-1", "local-zfs:subvol-201-disk-2,replicate=0"]
    d0, d1, d2 = cluster.guest(201, disks=disks, mb=2)
    cluster.job("201-0", "node2")
    cluster.run("201-0")
    for ds in (d0, d1):
        assert cluster.checksum("node1", ds) == cluster.checksum("node2", ds)
    assert not cluster.exists("node2", d2) and cluster.snapshots("node1", d2) == []
    cluster.write("node1", d1, "x", 1)
    time.sleep(1)
    cluster.run("201-0")
    for ds in (d0, d1):
        assert cluster.checksum("node1", ds) == cluster.checksum("node2", ds)
        assert len(cluster.job_snapshots("node2", ds, "201-0")) == 1
    assert 1_000_000 < cluster.state("201-0").bytes < 2_000_000


def test_two_jobs_two_targets_1_and_10_side_by_side(cluster: Nodes) -> None:
    """Jobs 202-1 (→ node2) and 202-10 (→ node3) of one guest never touch each other's snapshots."""
    (ds,) = cluster.guest(202, disks=["local-zfs:subvol-202-disk-0"], mb=2)
    cluster.job("202-1", "node2")
    cluster.job("202-10", "node3")
    for _ in range(2):
        cluster.run("202-1")
        cluster.run("202-10")
        cluster.write("node1", ds, "f", 1)
        time.sleep(1)
    cluster.run("202-1")
    one, ten = cluster.job_snapshots("node1", ds, "202-1"), cluster.job_snapshots("node1", ds, "202-10")
    assert len(one) == 1 and len(ten) == 1
    assert cluster.job_snapshots("node2", ds, "202-1") == one
    assert cluster.job_snapshots("node3", ds, "202-10") == ten
    assert cluster.checksum("node1", ds) == cluster.checksum("node2", ds)
    assert cluster.state("202-1").fail_count == 0 and cluster.state("202-10").fail_count == 0


def test_refused_off_the_guest_node(cluster: Nodes) -> None:
    cluster.guest(203, disks=["local-zfs:subvol-203-disk-0"], mb=1)
    cluster.job("203-0", "node2")
    r = cluster.replq("node3", "run", "--id", "203-0", "--local")
    assert r.returncode == 1 and "lives on node 'node1'" in r.stderr and "Traceback" not in r.stderr
    assert cluster.state("203-0").last_try == 0
    # Without --local the job goes to the node's worker: none runs in this sandbox.
    r = cluster.replq("node1", "run", "--id", "203-0")
    assert r.returncode == 1 and "no replq worker answers on node 'node1'" in r.stdout + r.stderr


# ------------------------------------------------------------------------------------ faults


def test_foreign_dataset_on_target_refused_untouched(cluster: Nodes) -> None:
    (ds,) = cluster.guest(204, disks=["local-zfs:subvol-204-disk-0"], mb=1)
    cluster.zfs("node2", "create", ds)
    cluster.write("node2", ds, "precious", 1)
    before = cluster.checksum("node2", ds)
    cluster.job("204-0", "node2")
    r = cluster.run("204-0", ok=False)
    assert "No common base snapshot on volume(s) local-zfs:subvol-204-disk-0" in r.stderr
    st = cluster.state("204-0")
    assert st.fail_count == 1 and "No common base" in st.error
    assert cluster.checksum("node2", ds) == before and cluster.snapshots("node2", ds) == []
    assert cluster.snapshots("node1", ds) == []
    assert cluster.store.read_log("204-0")[-1].endswith("end replication job with error: " + st.error)
    # The operator removes the foreign dataset: the next run works.
    cluster.zfs("node2", "destroy", "-r", ds)
    cluster.run("204-0")
    assert cluster.state("204-0").fail_count == 0
    assert cluster.checksum("node1", ds) == cluster.checksum("node2", ds)


def _zfs_send_pids(dataset: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # zfs-fuse rewrites its argv in place: "ds@snap" shows as "ds\0snap".
        name = dataset.encode()
        if argv[:2] == [b"zfs", b"send"] and any(a == name or a.startswith(name + b"@") for a in argv):
            pids.append(int(entry))
    return pids


def _wait_progress(cluster: Nodes, job_id: str, min_bytes: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = cluster.state(job_id).progress
        if p and p.get("bytes", 0) >= min_bytes:
            return
        time.sleep(0.2)
    raise AssertionError(f"no progress for {job_id}: {cluster.store.read_log(job_id)}")


def _base_setup(cluster: Nodes, vmid: int, target: str, mb: int, rate: float) -> tuple[str, str, str]:
    """A guest replicated once, then `mb` MiB more and a rate limit: the next run takes a while."""
    (ds,) = cluster.guest(vmid, disks=[f"local-zfs:subvol-{vmid}-disk-0"], mb=1)
    job_id = f"{vmid}-0"
    cluster.job(job_id, target)
    cluster.run(job_id)
    (base,) = cluster.job_snapshots("node1", ds, job_id)
    target_sum = cluster.checksum(target, ds)
    cluster.write("node1", ds, "big", mb)
    cluster.store.update_job(job_id, {"rate": rate})
    time.sleep(1)
    return ds, base, target_sum


def test_zfs_send_killed_mid_stream(cluster: Nodes) -> None:
    ds, base, target_sum = _base_setup(cluster, 205, "node2", mb=30, rate=5)
    proc = cluster.popen("node1", "run", "--id", "205-0", "--local")
    _wait_progress(cluster, "205-0", 2_000_000)
    pids = _zfs_send_pids(ds)
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 1, out + err
    st = cluster.state("205-0")
    assert st.fail_count == 1 and "was killed (signal 9)" in st.error, st.error
    # Target back at the base: no partial receive. Source keeps its base. (A zfs-fuse client
    # killed mid-send leaves its snapshot "busy" in the daemon: the new snapshot may linger.)
    orphan = [s for s in cluster.job_snapshots("node1", ds, "205-0") if s != base]
    assert base in cluster.job_snapshots("node1", ds, "205-0") and len(orphan) <= 1
    assert cluster.snapshots("node2", ds) == [base]
    assert cluster.checksum("node2", ds) == target_sum
    cluster.store.update_job("205-0", delete=["rate"])
    time.sleep(1)
    cluster.run("205-0")
    st = cluster.state("205-0")
    assert st.fail_count == 0 and st.error is None
    assert 30_000_000 < st.bytes < 34_000_000  # incremental from the old base, not the volume again
    assert any(f"incremental sync 'local-zfs:subvol-205-disk-0' ({base} => " in line
               for line in cluster.store.read_log("205-0"))
    assert cluster.checksum("node1", ds) == cluster.checksum("node2", ds)
    (newest,) = cluster.job_snapshots("node2", ds, "205-0")
    # Snapshots the killed client held stay busy in zfs-fuse: the run says so and goes on.
    leftover = set(cluster.job_snapshots("node1", ds, "205-0")) - {newest}
    assert leftover <= {base, *orphan}
    if leftover:
        assert any("warning: could not delete" in line for line in cluster.store.read_log("205-0"))


def test_engine_killed_mid_stream(cluster: Nodes) -> None:
    """The whole sending process (`replq run`) SIGKILLed: its lock expires, the next run goes on."""
    ds, base, target_sum = _base_setup(cluster, 209, "node2", mb=30, rate=5)
    proc = cluster.popen("node1", "run", "--id", "209-0", "--local", env={"REPLQ_GUEST_LOCK_TTL": "6"})
    _wait_progress(cluster, "209-0", 2_000_000)
    proc.send_signal(signal.SIGKILL)  # nsenter execs the engine: this pid is the engine itself
    proc.communicate(timeout=30)
    cluster.store.update_job("209-0", delete=["rate"])
    deadline = time.monotonic() + 60
    while True:
        r = cluster.replq("node1", "run", "--id", "209-0", "--local")
        if r.returncode == 0 or "is locked" not in r.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert r.returncode == 0, r.stderr + "\n".join(cluster.store.read_log("209-0"))
    st = cluster.state("209-0")
    assert st.fail_count == 0 and st.error is None and st.bytes < 34_000_000
    assert any(f"incremental sync 'local-zfs:subvol-209-disk-0' ({base} => " in line
               for line in cluster.store.read_log("209-0"))
    assert cluster.checksum("node1", ds) == cluster.checksum("node2", ds)
    (newest,) = cluster.job_snapshots("node2", ds, "209-0")
    assert cluster.job_snapshots("node1", ds, "209-0") == [newest]
    assert cluster.snapshots("node2", ds) == [newest]


def test_target_node_stopped_mid_stream(cluster: Nodes) -> None:
    ds, base, target_sum = _base_setup(cluster, 206, "node3", mb=30, rate=5)
    proc = cluster.popen("node1", "run", "--id", "206-0", "--local")
    _wait_progress(cluster, "206-0", 2_000_000)
    t0 = time.monotonic()
    try:
        cluster.sb.stop_node("node3")
        out, err = proc.communicate(timeout=120)
        assert time.monotonic() - t0 < 75  # a dead peer fails the run within about a minute
        assert proc.returncode == 1, out + err
        assert "lost" in err, out + err
        st = cluster.state("206-0")
        assert st.fail_count == 1 and "node3" in st.error, st.error
        assert "lost" in st.error or "unreachable" in st.error, st.error
        assert cluster.job_snapshots("node1", ds, "206-0") == [base]
        # While the node is down, the next attempt says so clearly.
        r = cluster.run("206-0", ok=False)
        assert "unreachable" in r.stderr and "node3" in r.stderr
        assert cluster.state("206-0").fail_count == 2
    finally:
        cluster.sb.start_node("node3")
    assert cluster.snapshots("node3", ds) == [base]
    assert cluster.checksum("node3", ds) == target_sum
    cluster.store.update_job("206-0", delete=["rate"])
    cluster.run("206-0")
    assert cluster.state("206-0").fail_count == 0
    assert cluster.checksum("node1", ds) == cluster.checksum("node3", ds)


def test_host_key_changed_on_target(cluster: Nodes) -> None:
    (ds,) = cluster.guest(207, disks=["local-zfs:subvol-207-disk-0"], mb=1)
    cluster.job("207-0", "node2")
    sb = cluster.sb
    keyfile = sb.dir / "nodes" / "node2" / "ssh" / "ssh_host_ed25519_key"
    saved = {p: p.read_bytes() for p in (keyfile, keyfile.with_suffix(".pub"))}
    sshd = sb.node_info("node2")["sshd"]["pid"]
    try:
        for p in saved:
            p.unlink()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keyfile)], check=True)
        os.kill(sshd, signal.SIGHUP)  # sshd re-executes and loads the new host key
        time.sleep(1.5)
        r = cluster.run("207-0", ok=False)
        assert "host key of node 'node2'" in r.stderr and "refusing" in r.stderr, r.stderr
        st = cluster.state("207-0")
        assert st.fail_count == 1 and "host key" in st.error
        assert cluster.snapshots("node1", ds) == [] and not cluster.exists("node2", ds)
    finally:
        for p, data in saved.items():
            p.write_bytes(data)
        os.chmod(keyfile, 0o600)
        os.kill(sshd, signal.SIGHUP)
        time.sleep(1.5)
    cluster.run("207-0")
    assert cluster.state("207-0").fail_count == 0


@pytest.fixture
def small_pools(cluster: Nodes) -> Iterator[str]:
    """Storage `small-zfs` (pool `small/data`): 256 MiB on node1, 64 MiB on node2, absent on node3."""
    made = []
    for node, size in (("node1", "256M"), ("node2", "64M")):
        img = cluster.sb.dir / "nodes" / node / "small.img"
        subprocess.run(["truncate", "-s", size, str(img)], check=True)
        cluster.sh(node, f"zpool create -m none small {img} && zfs create -o mountpoint=/rpool/small small/data")
        made.append((node, img))
    cluster.store.add_storage(Storage(id="small-zfs", pool="small/data"))
    try:
        yield "small-zfs"
    finally:
        # Leave the shared sandbox as found: no guest or storage on the pool, no pool.
        for g in cluster.store.list_guests():
            if any(d.storage == "small-zfs" for d in g.disks):
                cluster.forget(g.vmid)
        cluster.store.remove_storage("small-zfs")
        for node, img in made:
            for _ in range(30):  # zfs-fuse: "pool is busy" for a moment after its files were used
                r = cluster.sb.exec(node, ["zpool", "destroy", "-f", "small"], timeout=120)
                if r.returncode == 0:
                    break
                time.sleep(0.5)
            assert r.returncode == 0, f"{node}: zpool destroy small: {r.stderr}"
            img.unlink(missing_ok=True)


def test_target_pool_full_and_storage_missing(cluster: Nodes, small_pools: str) -> None:
    (ds,) = cluster.guest(208, disks=["small-zfs:subvol-208-disk-0"], mb=100, pool="small/data",
                          mount="/rpool/small")  # fmt: skip
    cluster.job("208-0", "node2")
    cluster.job("208-1", "node3")
    src = cluster.checksum("node1", ds, "/rpool/small")

    r = cluster.run("208-0", ok=False)
    assert "no free space left on the replication target storage 'small-zfs' on node 'node2'" in r.stderr, r.stderr
    st = cluster.state("208-0")
    assert st.fail_count == 1 and st.error.startswith("no free space")
    assert not cluster.exists("node2", ds)  # no partial volume left
    assert cluster.snapshots("node1", ds) == [] and cluster.checksum("node1", ds, "/rpool/small") == src

    r = cluster.run("208-1", ok=False)
    assert "storage 'small-zfs' is not available on node 'node3'" in r.stderr, r.stderr
    assert cluster.state("208-1").fail_count == 1
    assert cluster.snapshots("node1", ds) == []

    # Free space on the target: the operator deletes most data on the source → next run fits.
    cluster.sh("node1", "rm /rpool/small/subvol-208-disk-0/data && head -c 5M /dev/urandom > "
                        "/rpool/small/subvol-208-disk-0/data && sync")  # fmt: skip
    time.sleep(1)
    cluster.run("208-0")
    assert cluster.state("208-0").fail_count == 0
    assert cluster.checksum("node1", ds, "/rpool/small") == cluster.checksum("node2", ds, "/rpool/small")


# ------------------------------------------------------------------------------------ removal


def test_remove_job_full_and_keep(cluster: Nodes) -> None:
    (d1,) = cluster.guest(211, disks=["local-zfs:subvol-211-disk-0"], mb=1)
    (d2,) = cluster.guest(212, disks=["local-zfs:subvol-212-disk-0"], mb=1)
    foreign = "rpool/data/subvol-211-disk-9"  # same guest, no snapshot of the job: never touched
    cluster.zfs("node2", "create", foreign)
    cluster.job("211-0", "node2")
    cluster.job("212-0", "node2")
    cluster.run("211-0")
    cluster.run("212-0")
    assert cluster.exists("node2", d1) and cluster.exists("node2", d2)

    cluster.store.mark_remove("211-0", "full")
    cluster.run("211-0")
    assert not cluster.exists("node2", d1) and cluster.exists("node2", foreign)
    assert cluster.job_snapshots("node1", d1, "211-0") == []
    assert cluster.exists("node1", d1)  # the guest's own volume stays
    assert "211-0" not in cluster.store.job_ids()

    cluster.store.mark_remove("212-0", "local")
    before = cluster.checksum("node2", d2)
    cluster.run("212-0")
    assert cluster.exists("node2", d2) and cluster.checksum("node2", d2) == before
    assert cluster.job_snapshots("node2", d2, "212-0") == [] and cluster.job_snapshots("node1", d2, "212-0") == []
    assert "212-0" not in cluster.store.job_ids()


def test_volume_no_longer_replicated_is_removed_on_target(cluster: Nodes) -> None:
    d0, d1 = cluster.guest(213, disks=["local-zfs:subvol-213-disk-0", "local-zfs:subvol-213-disk-1"], mb=1)
    cluster.job("213-0", "node2")
    cluster.run("213-0")
    assert cluster.exists("node2", d1)
    # The operator marks disk-1 replicate=0.
    r = subprocess.run([sys.executable, "-m", "replq", "--redis", cluster.sb.redis_url, "guest", "set-disks", "213",
                        "--disk", "local-zfs:subvol-213-disk-0", "--disk", "local-zfs:subvol-213-disk-1,replicate=0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not cluster.store.get_guest(213).disks[1].replicate
    time.sleep(1)
    cluster.run("213-0")
    assert not cluster.exists("node2", d1)  # the replica of the unreplicated disk is gone
    assert cluster.exists("node1", d1) and cluster.job_snapshots("node1", d1, "213-0") == []  # source volume kept
    assert len(cluster.job_snapshots("node2", d0, "213-0")) == 1
    assert any(line.endswith("(remote_prepare_local_job) 213-0: delete stale volume 'local-zfs:subvol-213-disk-1'")
               for line in cluster.store.read_log("213-0"))
