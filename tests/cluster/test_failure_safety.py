"""Issue 11 (failure safety) on the real sandbox cluster: nothing is lost at the moment of failure.

Each test stages one failure of the issue (a node that comes back, a forced move, a worker cut
off from Redis, a hung zfs, a dataset appearing by another hand, ...) and asserts, with
checksums, that the data which must survive does, and that the operator is told what happened.

The engine runs inside a node (`replq run --id J --local` through `sb.exec`), the way a node
worker runs it. Guests are 8xx (tests/support/faults.py has the fault injection).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from replq import procs, ssh
from replq.sandbox import Sandbox
from tests.support.cluster import MOUNT, MiB
from tests.support.faults import Faults, RedisLink, blocked_in, finished, stopped
from tests.support.helpers import stop_procs, wait_for

pytestmark = pytest.mark.sandbox

STALL_TIMEOUT = 15  # `replq settings set stall_timeout 15` (issue 11 §6)


@pytest.fixture(scope="module")
def faults(sandbox: Sandbox) -> Iterator[Faults]:
    f = Faults(sandbox, range(800, 900))
    try:
        yield f
    finally:
        f.cleanup()


def assert_not_rolled_back(f: Faults, r: subprocess.CompletedProcess, node: str, dataset: str, before: str,
                           marker: str, job_id: str) -> None:  # fmt: skip
    """The run failed and left `dataset` on `node` as it was (`marker` is the file at stake)."""
    after = f.checksum(node, dataset)
    assert r.returncode == 1 and after == before, (
        f"run exit {r.returncode}; {dataset} on {node} unchanged: {after == before} "
        f"(./{marker} {'kept' if f'./{marker}' in after else 'GONE'}); log:\n{f.log(job_id)}"
    )


def assert_move_refused(f: Faults, r: subprocess.CompletedProcess, vmid: int, what: str) -> None:
    """`guest move` was refused and guest `vmid` still lives on node1."""
    node = f.store.get_guest(vmid).node
    assert r.returncode == 1 and node == "node1", (
        f"{what}: guest move exit {r.returncode}, guest now on {node}: {r.stdout}{r.stderr}"
    )


# ------------------------------------------------------------------------------------ 1 divergence


def test_run_refuses_to_roll_back_a_target_written_after_the_base(faults: Faults) -> None:
    """Issue 11 §1: the replica on node2 was written after the common base (a guest started there by
    mistake). The next run must not roll it back: error state with `diverged`, node2's data stays.
    Only `--discard-target-changes` overwrites it, and keeps the diverged state first."""
    f = faults
    ds = f.replicated(801, mb=2)
    (base,) = f.job_snapshots("node2", ds, "801-0")
    props = f.props("node2", ds)  # the replica as received, before anyone touched it
    # zfs-fuse reports a mounted dataset's readonly as the mount's ("off temporary"): try to write.
    probe = f.sb.exec("node2", ["touch", f"{MOUNT}/{ds.rsplit('/', 1)[1]}/probe"], timeout=60)
    f.live("node2", ds)
    f.write("node2", ds, "written-on-node2", 1)
    on_node2 = f.checksum("node2", ds)
    f.write("node1", ds, "newer-on-node1", 1)
    time.sleep(1)

    r = f.replq("node1", "run", "--id", "801-0", "--local")
    assert_not_rolled_back(f, r, "node2", ds, on_node2, "written-on-node2", "801-0")
    st = f.state("801-0")
    assert st.fail_count == 1 and "diverged" in st.error, st.error
    assert "node2" in st.error and ds in st.error, st.error
    assert base in f.snapshots("node2", ds)
    # Replicas are received read-only and marked as replicas of this guest, job and source.
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr, probe.stderr
    marks = " ".join(f"{k}={v}" for k, v in props.items() if k.startswith("replq:"))
    assert "801" in marks and "801-0" in marks and "node1" in marks, marks

    # The operator accepts the loss for this job: the diverged state is kept first, and named.
    time.sleep(1)
    r = f.replq("node1", "run", "--id", "801-0", "--local", "--discard-target-changes")
    assert r.returncode == 0, r.stderr + f.log("801-0")
    assert f.checksum("node1", ds) == f.checksum("node2", ds)
    assert f.kept_state("node2", ds, f.log("801-0")) == on_node2


def test_forced_move_never_rolls_back_the_old_nodes_newer_data(faults: Faults) -> None:
    """Issue 11 §1/§5: node1 was judged dead and the guest moved to node2 by force, but node1 lives
    and its guest wrote after the last sync. The job, now node2 => node1, must not roll node1 back."""
    f = faults
    ds = f.replicated(802, mb=2)
    f.write("node1", ds, "after-last-sync", 1)  # the guest still runs on node1
    on_node1 = f.checksum("node1", ds)
    r = f.replq("node2", "guest", "move", "802", "--to", "node2", "--force")
    assert r.returncode == 0, r.stderr
    f.live("node2", ds)
    f.write("node2", ds, "started-on-node2", 1)
    time.sleep(1)

    r = f.replq("node2", "run", "--id", "802-0", "--local")
    assert_not_rolled_back(f, r, "node1", ds, on_node1, "after-last-sync", "802-0")
    st = f.state("802-0")
    assert "diverged" in st.error and "node1" in st.error and ds in st.error, st.error


# ------------------------------------------------------------------------------------ 2 foreign disks


def test_a_guest_cannot_claim_another_guests_disk(faults: Faults) -> None:
    """Issue 11 §2: guest 804 on node2 registered with guest 803's volume (a typo). `guest add`
    must refuse it. Today it is accepted, and 804's job (node2 => node1) takes 803's replication
    snapshot as its fallback base and rolls back guest 803's live volume on node1."""
    f = faults
    ds = f.replicated(803, mb=2)
    f.write("node1", ds, "live-data-of-803", 1)  # guest 803 runs on node1 and writes
    live = f.checksum("node1", ds)

    r = f.host("guest", "add", "804", "--node", "node2", "--disk", "local-zfs:subvol-803-disk-0")
    accepted = r.returncode == 0
    log = ""
    if accepted:  # today: what accepting it costs
        f.job("804-0", "node1")
        f.replq("node2", "run", "--id", "804-0", "--local")
        log = f.log("804-0")
    after = f.checksum("node1", ds)
    assert not accepted and after == live, (
        f"guest add 804 with guest 803's disk accepted: {accepted}; guest 803's live volume on node1 "
        f"intact: {after == live} (./live-data-of-803 {'kept' if './live-data-of-803' in after else 'GONE'}); "
        f"log of 804-0:\n{log}"
    )
    assert "803" in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------------------------ 3 lock and fencing


def test_worker_cut_off_from_redis_stops_before_its_lock_expires(faults: Faults) -> None:
    """Issue 11 §3: the engine on node1 loses Redis mid-transfer. Its guest lock expires; the
    operator, seeing node1's worker gone, moves the guest to node2 (--force) and starts it there.
    The engine must have stopped (0.8 x TTL without renewal) and must not `recv -F` over it."""
    f = faults
    ds = f.replicated(805)
    f.write("node1", ds, "big", 60)
    f.store.update_job("805-0", {"rate": 2})  # ~30 s of sending
    time.sleep(1)
    link = RedisLink(f.sb.redis_url)
    proc = f.popen("node1", "run", "--id", "805-0", "--local",
                    env={"REPLQ_REDIS_URL": link.url, "REPLQ_GUEST_LOCK_TTL": "6"})  # fmt: skip
    try:
        f.wait_progress("805-0", 2 * MiB)
        link.cut()
        t_cut = time.monotonic()
        wait_for(lambda: not f.lock_held(805), 30, "the engine's guest lock to expire in Redis")
        t_expired = time.monotonic() - t_cut
        r = f.replq("node2", "guest", "move", "805", "--to", "node2", "--force")
        assert r.returncode == 0, r.stderr
        f.live("node2", ds)
        f.write("node2", ds, "started-on-node2", 2)
        on_node2 = f.checksum("node2", ds)
        engine_running = proc.poll() is None
        t_written = time.monotonic() - t_cut
        _, out = finished(proc, 120)
    finally:
        if proc.poll() is None:
            stop_procs([proc])
    after = f.checksum("node2", ds)
    assert after == on_node2, (
        f"engine cut off from Redis at t=0; its lock expired at t={t_expired:.1f} s; guest moved and written on "
        f"node2 at t={t_written:.1f} s while the engine was {'STILL SENDING' if engine_running else 'stopped'}; "
        f"node2's writes after that: {'kept' if './started-on-node2' in after else 'GONE (recv -F)'}; "
        f"engine exit {proc.returncode}:\n{out[-1500:]}"
    )


# ------------------------------------------------------------------------------------ 4 liveness


def test_login_refused_on_a_live_node_is_not_a_dead_node(faults: Faults) -> None:
    """Issue 11 §4: node1 runs (sshd answers with its pinned host key) but refuses our login.
    An authentication failure means alive: `guest move` without --force must refuse."""
    f = faults
    f.replicated(806)
    cfg = f.sb.dir / "nodes" / "node1" / "ssh" / "sshd_config"
    saved = cfg.read_text()
    sshd = f.sb.node_info("node1")["sshd"]["pid"]
    try:
        cfg.write_text(saved + "DenyUsers root\n")
        os.kill(sshd, signal.SIGHUP)  # sshd re-executes with the new configuration
        time.sleep(1.5)
        with pytest.raises(ssh.NodeUnreachable, match="login as 'root' .* refused"):  # the fault is in place
            ssh.connect_node(f.store.get_node("node1"), f.sb.ssh_key).close()
        r = f.replq("node2", "guest", "move", "806", "--to", "node2")
    finally:
        cfg.write_text(saved)
        os.kill(sshd, signal.SIGHUP)
        time.sleep(1.5)
    assert_move_refused(f, r, 806, "live node1 (login refused) judged dead")
    assert "node1" in r.stderr and "SSH" in r.stderr, r.stderr


def test_worker_heartbeat_within_the_window_means_alive(faults: Faults) -> None:
    """Issue 11 §4: node1's worker sent heartbeats seconds ago but misses the 2 s ping (busy,
    frozen) and node1's SSH port refuses connections. It is alive (heartbeat within 60 s)."""
    f = faults
    f.replicated(807)
    worker = f.start_worker("node1")
    try:
        time.sleep(3)  # a few heartbeats
        procs.stop([f.sb.node_info("node1")["sshd"]])  # the port refuses connections now
        with stopped([worker.pid]):
            r = f.replq("node2", "guest", "move", "807", "--to", "node2")
    finally:
        stop_procs([worker])
        f.sb.start_node("node1")
    assert_move_refused(f, r, 807, "node1 with a worker heartbeat seconds ago judged dead")
    assert "heartbeat" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------ 5 freshest replica


def _two_replicas_node3_newer(f: Faults, vmid: int) -> str:
    """Guest on node1 with jobs -0 → node2 and -1 → node3; node3 got a sync after node2's."""
    ds = f.replicated(vmid, mb=2, targets=("node2", "node3"))
    f.write("node1", ds, "only-on-node3", 1)
    time.sleep(1)
    f.run(f"{vmid}-1")
    return ds


def test_guest_move_refuses_a_node_without_the_freshest_replica(faults: Faults) -> None:
    """Issue 11 §5: node1 dies; node3 holds a newer replica than node2. `guest move --to node2`
    without --force must refuse and name node3 (and the age of both replicas)."""
    f = faults
    _two_replicas_node3_newer(f, 808)
    try:
        f.sb.stop_node("node1")
        r = f.replq("node2", "guest", "move", "808", "--to", "node2")
        proposal = f.replq("node2", "guest", "move", "808")  # without --to: which node is freshest?
    finally:
        f.sb.start_node("node1")
    assert_move_refused(f, r, 808, "guest moved onto node2's older replica although node3 holds a newer one")
    assert "node3" in r.stderr and "newer" in r.stderr, r.stderr
    assert r.stderr.count("synced") == 2 and "ago" in r.stderr, r.stderr  # the age of both replicas
    assert proposal.returncode == 0, proposal.stderr
    assert "the freshest replicas are on node 'node3': replq guest move 808 --to node3" in proposal.stdout
    assert f.store.get_guest(808).node == "node1"  # the proposal moves nothing


def test_after_a_move_the_newer_replica_is_not_rolled_back(faults: Faults) -> None:
    """Issue 11 §5: the guest was moved to node2 anyway (--force). The job to node3 now runs
    node2 => node3 from the base they share; node3's newer data must not be rolled back."""
    f = faults
    ds = _two_replicas_node3_newer(f, 809)
    fresh = f.checksum("node3", ds)
    try:
        f.sb.stop_node("node1")
        r = f.replq("node2", "guest", "move", "809", "--to", "node2", "--force")
        assert r.returncode == 0, r.stderr
    finally:
        f.sb.start_node("node1")
    f.live("node2", ds)
    f.write("node2", ds, "started-on-node2", 1)
    time.sleep(1)
    r = f.replq("node2", "run", "--id", "809-1", "--local")
    assert_not_rolled_back(f, r, "node3", ds, fresh, "only-on-node3", "809-1")
    assert "diverged" in f.state("809-1").error


# ------------------------------------------------------------------------------------ 6 stalls


def _stall_setup(f: Faults, vmid: int) -> tuple[str, str, str, subprocess.CompletedProcess]:
    settings = f.host("settings", "set", "stall_timeout", str(STALL_TIMEOUT))
    ds = f.replicated(vmid)
    job_id = f"{vmid}-0"
    (base,) = f.job_snapshots("node2", ds, job_id)
    target = f.checksum("node2", ds)
    f.write("node1", ds, "big", 15)
    f.store.update_job(job_id, {"rate": 3})  # ~5 s of sending
    time.sleep(1)
    return ds, base, target, settings


def _stall(f: Faults, vmid: int, node: str, verb: str) -> None:
    """Run the job, freeze `zfs VERB` on `node` mid-stream; the run must end within
    stall_timeout + 30 s with `stalled`, release its lock, and the next run must recover."""
    ds, base, target, settings = _stall_setup(f, vmid)
    job_id = f"{vmid}-0"
    proc = f.popen("node1", "run", "--id", job_id, "--local")
    try:
        _stalled_run(f, vmid, node, verb, ds, proc, settings)
    finally:
        if proc.poll() is None:
            stop_procs([proc])
        f.store.redis.hdel(f.store.k("settings"), "stall_timeout")  # later modules run with the default
    st = f.state(job_id)
    assert proc.returncode == 1 and st.fail_count == 1 and "stalled" in st.error, st.error
    assert not f.lock_held(vmid)
    # The target is as the last committed receive left it: at the base, or (zfs committed the
    # stream before it hung) at the new snapshot, never half-way.
    assert base in f.snapshots("node2", ds) and f.checksum("node2", ds) in (target, f.checksum("node1", ds))
    f.store.update_job(job_id, delete=["rate"])
    time.sleep(1)
    f.run(job_id)
    assert f.checksum("node1", ds) == f.checksum("node2", ds)


def _stalled_run(f: Faults, vmid: int, node: str, verb: str, ds: str, proc: subprocess.Popen,
                 settings: subprocess.CompletedProcess) -> None:  # fmt: skip
    """Freeze `zfs VERB` of the running job on `node`; the run must end in bounded time."""
    job_id = f"{vmid}-0"
    f.wait_progress(job_id, MiB)
    pids = f.pids(node, verb, ds)
    assert pids, f"no zfs {verb} of {ds} found on {node}"
    with stopped(pids):
        t0 = time.monotonic()
        # The stream may still drain for ~5 s (zfs-fuse's daemon moves the data), then nothing moves.
        done, _ = finished(proc, 5 + STALL_TIMEOUT + 30 + 15)
        waited = time.monotonic() - t0
        lock_held, st, where = f.lock_held(vmid), f.state(job_id), blocked_in(proc.pid)
    assert done, (
        f"run still going {waited:.0f} s after zfs {verb} on {node} froze (stall_timeout {STALL_TIMEOUT}, "
        f"'settings set stall_timeout' exit {settings.returncode}: {settings.stderr.strip()}); guest lock held: "
        f"{lock_held}; engine blocked in {where}(); progress: {st.progress}; log:\n{f.log(job_id)}"
    )
    assert settings.returncode == 0, settings.stderr


def test_a_frozen_zfs_send_aborts_the_run(faults: Faults) -> None:
    """Issue 11 §6: `zfs send` on the source stops making progress (or never exits after its
    stream): today the engine waits in read()/wait() forever, holding the guest lock."""
    _stall(faults, 810, "node1", "send")


def test_a_frozen_zfs_recv_aborts_the_run(faults: Faults) -> None:
    """Issue 11 §6: `zfs recv` on the target hangs (target ZFS stuck): today the engine waits for
    its exit status up to 600 s, then cleanup on the hung node has no timeout of its own."""
    _stall(faults, 811, "node2", "recv")


# ------------------------------------------------------------------------------------ 7 destroy by GUID


def appears_meanwhile(f: Faults, proc: subprocess.Popen, job_id: str, dataset: str) -> None:
    """While `proc` sends job_id's stream, another hand creates `dataset` on node2 and writes to it.
    When proc has ended, that dataset must be there, unchanged."""
    out = ""
    try:
        f.wait_progress(job_id, MiB)
        f.zfs("node2", "create", dataset)
        f.write("node2", dataset, "precious", 1)
        precious = f.checksum("node2", dataset)
        _, out = finished(proc, 120)
    finally:
        if proc.poll() is None:
            stop_procs([proc])
    exists = f.exists("node2", dataset)
    assert exists and f.checksum("node2", dataset) == precious, (
        f"{dataset} created on node2 by another hand while {' '.join(proc.args[-4:])} ran: "
        f"{'survived' if exists else 'DESTROYED'}; exit {proc.returncode}:\n{out[-1500:]}\nlog of {job_id}:\n"
        f"{f.log(job_id)}"
    )


def test_failed_full_receive_never_destroys_a_dataset_of_another_hand(faults: Faults) -> None:
    """Issue 11 §7: while disk-0 is sent in full, a dataset named like disk-1 appears on node2 by
    another hand (a restore, another tool). disk-1's full receive fails; the cleanup must not
    `zfs destroy -r` what this run did not create."""
    f = faults
    d0, d1 = f.guest(812, "node1", ndisks=2, mb=1)
    f.write("node1", d0, "big", 20)
    f.job("812-0", "node2", rate=4)  # ~5 s for disk-0
    proc = f.popen("node1", "run", "--id", "812-0", "--local")
    appears_meanwhile(f, proc, "812-0", d1)
    assert proc.returncode == 1


def test_failed_migration_copy_never_destroys_a_dataset_of_another_hand(faults: Faults) -> None:
    """Issue 11 §7, migration: while the job's delta runs, a dataset named like the guest's
    replicate=0 disk appears on node2. Its full copy fails; the dataset must survive."""
    f = faults
    d0, d1 = f.guest(813, "node1", ndisks=2, norep=1, mb=1)
    f.job("813-0", "node2")
    f.run("813-0")
    f.write("node1", d0, "big", 20)
    f.store.update_job("813-0", {"rate": 4})  # the delta takes ~5 s
    time.sleep(1)
    proc = f.popen("node1", "migrate", "813", "node2")
    appears_meanwhile(f, proc, "813-0", d1)
    assert proc.returncode == 1 and f.store.get_guest(813).node == "node1"


# ------------------------------------------------------------------------------------ 8 leftovers of -R


def _carry(f: Faults, vmid: int) -> tuple[str, list[str]]:
    """Jobs -0 → node2 and -1 → node3; -0's `send -R -I` carries -1's snapshot to node2, then -1
    syncs again, so that carried snapshot is nobody's base any more. Returns (dataset, carried)."""
    ds = f.replicated(vmid, targets=("node2", "node3"))
    f.write("node1", ds, "a", 1)
    time.sleep(1)
    f.run(f"{vmid}-0")
    carried = f.job_snapshots("node2", ds, f"{vmid}-1")
    f.write("node1", ds, "b", 1)
    time.sleep(1)
    f.run(f"{vmid}-1")
    return ds, carried


def test_delete_keep_leaves_no_replication_snapshots_on_the_target(faults: Faults) -> None:
    """Issue 11 §8: after `delete 814-0 --keep` no job of guest 814 targets node2: its replica stays,
    with no replication snapshots (814-1's, carried there by -R, included)."""
    f = faults
    ds, carried = _carry(f, 814)
    r = f.host("delete", "814-0", "--keep")
    assert r.returncode == 0, r.stderr
    before = f.checksum("node2", ds)
    f.run("814-0")  # the removal
    assert "814-0" not in f.store.job_ids()
    left = f.replication_snapshots("node2", ds)
    assert left == [], f"replication snapshots left on node2 after delete --keep: {left} (carried by -R: {carried})"
    assert f.checksum("node2", ds) == before


def test_a_removed_jobs_snapshots_do_not_stay_behind_a_disabled_job(faults: Faults) -> None:
    """Issue 11 §8: 815-0 (→ node2) carried 815-1's snapshot to node2 and was disabled; 815-1 is
    then deleted. Its snapshots must not stay on node2 forever."""
    f = faults
    ds, carried = _carry(f, 815)
    r = f.host("disable", "815-0")
    assert r.returncode == 0, r.stderr
    r = f.host("delete", "815-1")
    assert r.returncode == 0, r.stderr
    f.run("815-1")  # the removal
    assert "815-1" not in f.store.job_ids()
    left = f.job_snapshots("node2", ds, "815-1")
    assert left == [], f"snapshots of the removed job 815-1 left on node2: {left} (carried by 815-0's -R: {carried})"
