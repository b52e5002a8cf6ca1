"""The Celery runtime on the sandbox cluster: a real beat, a real `replq worker` inside each node,
real zfs-fuse pools and sshd, the sandbox's redis-server. No `run` command anywhere: beat decides.

Timing knobs are shortened through the environment (job lock TTL 20 s, interrupted-run sweep
every 3 s, retry_interval 60 s — the smallest the store accepts), so the module takes a few minutes.
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replq import dispatch
from replq.app import TASK_REPLICATE, enqueue, make_app, new_task_id, ping_worker
from replq.calendar import next_event_epoch
from replq.model import Job
from replq.sandbox import Sandbox, process_alive
from tests.support.cluster import MOUNT, POOL, Runtime
from tests.support.helpers import wait_for

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]


def ds_of(vmid: int) -> str:
    return f"{POOL}/subvol-{vmid}-disk-0"

RETRY = 60
# The job lock must outlive a worker restart on a loaded 2-core machine (the kill test sends a
# duplicate message while the dead run's lock still stands), so not much shorter than production's 60 s.
KNOBS = {"REPLQ_JOB_LOCK_TTL": "45", "REPLQ_SWEEP_INTERVAL": "3", "REPLQ_BEAT_LOCK_TTL": "10"}


@pytest.fixture(scope="module")
def rt(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    r = Runtime(sandbox, range(3000, 3100), tmp_path_factory.mktemp("runtime-logs"), KNOBS)
    r.store.set_setting("retry_interval", RETRY)
    try:
        r.start_beat()
        for node in sandbox.node_names():
            r.start_worker(node)
        yield r
    finally:
        r.stop_all()
        r.store.set_setting("retry_interval", 1800)
        r.cleanup()  # later modules share the sandbox: none of this module's guests, jobs or datasets
    for name, p in [("beat", r.beat), *r.workers.items()]:
        assert p is not None and p.returncode == 0, f"{name} exited {p.returncode if p else None}"


def test_new_job_is_synced_by_beat_and_worker(rt: Runtime) -> None:
    rt.guest(3001, "node1")
    created = time.time()
    rt.store.create_job(Job(id="3001-0", target="node2", schedule="*/15"))
    wait_for(lambda: rt.synced_after("3001-0", 0), 40, "the first sync")
    st = rt.state("3001-0")
    assert st.last_node == "node1" and st.bytes > 0
    assert rt.checksum("node1", ds_of(3001)) == rt.checksum("node2", ds_of(3001))
    assert st.last_try - created < 5  # due at creation; beat ticks every second
    log = rt.store.read_log("3001-0")
    assert log[0].endswith("start replication job") and log[-1].endswith("end replication job")
    # Calendar schedule: next due at the next quarter hour after this attempt.
    assert rt.store.next_sync("3001-0") == pytest.approx(
        next_event_epoch("*/15", st.last_try, rt.store.get_settings()["timezone"]))


def test_minutely_job_runs_at_each_minute(rt: Runtime) -> None:
    rt.guest(3002, "node2")
    rt.store.create_job(Job(id="3002-0", target="node3", schedule="*/1"))
    wait_for(lambda: rt.synced_after("3002-0", 0), 40, "the first sync")
    first = rt.state("3002-0").last_sync
    boundary = (int(first) // 60 + 1) * 60
    rt.sh("node2", f"head -c 1M /dev/urandom > {MOUNT}/subvol-3002-disk-0/more && sync")
    wait_for(lambda: rt.state("3002-0").last_sync >= boundary, boundary - time.time() + 30, "the run at the minute")
    st = rt.state("3002-0")
    lag = st.last_try - boundary
    print(f"due -> run start: {lag:.1f} s")
    assert 0 <= lag < 30, lag  # started at its calendar event, not a minute later (latency: bench/beat.py)
    assert rt.checksum("node2", ds_of(3002)) == rt.checksum("node3", ds_of(3002))


def test_error_state_retry_and_recovery(rt: Runtime) -> None:
    rt.guest(3003, "node1")
    rt.store.create_job(Job(id="3003-0", target="node3", schedule="*/15"))
    wait_for(lambda: rt.synced_after("3003-0", 0), 40, "the first sync")
    good = rt.state("3003-0").last_sync
    rt.sb.stop_node("node3")  # its sshd, its worker and its ZFS
    try:
        rt.sh("node1", f"head -c 1M /dev/urandom > {MOUNT}/subvol-3003-disk-0/more && sync")
        r = rt.host("schedule-now", "3003-0")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: rt.state("3003-0").fail_count == 1, 60, "the failed attempt")
        st = rt.state("3003-0")
        assert "node3" in (st.error or ""), st.error
        assert st.last_sync == good
        # Error state: the calendar is suspended, the retry is retry_interval after the attempt.
        assert rt.store.next_sync("3003-0") == pytest.approx(st.last_try + RETRY)
        failed_try = st.last_try
    finally:
        rt.sb.start_node("node3")
        rt.start_worker("node3")
    wait_for(lambda: rt.synced_after("3003-0", good), RETRY + 40, "the retry to succeed")
    st = rt.state("3003-0")
    assert st.last_try >= failed_try + RETRY - 1 and st.error is None and st.fail_count == 0
    assert rt.checksum("node1", ds_of(3003)) == rt.checksum("node3", ds_of(3003))
    # Recovered: the calendar schedule applies again.
    assert rt.store.next_sync("3003-0") == pytest.approx(
        next_event_epoch("*/15", st.last_try, rt.store.get_settings()["timezone"]))


def _sends(sb: Sandbox, node: str, dataset: str) -> list[int]:
    """PIDs of `zfs send` processes of `dataset` inside `node` of this sandbox. Only that node's
    mount namespace counts: other sandboxes on this machine (a CI run of these very tests) have
    datasets of the same names, and all share the PID space."""
    ns = os.readlink(f"/proc/{sb.node_info(node)['zfs']['pid']}/ns/mnt")
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if os.readlink(f"/proc/{entry}/ns/mnt") != ns:
                    continue
            except OSError:
                continue
            # zfs-fuse splits `dataset@snap` in place in its argv: match either spelling.
            if len(argv) > 2 and argv[0].endswith(b"zfs") and argv[1] == b"send" and \
                    any(a == dataset.encode() or a.startswith(dataset.encode() + b"@") for a in argv):
                out.append(int(entry))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "?"


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[1])
    except OSError:
        return -1


def _ancestry(pid: int, depth: int = 4) -> list[tuple[int, str]]:
    out = []
    while pid > 1 and depth > 0:
        out.append((pid, _cmdline(pid)[:80]))
        pid, depth = _ppid(pid), depth - 1
    return out


def test_worker_killed_mid_transfer_never_runs_twice_and_recovers(rt: Runtime) -> None:
    (ds,) = rt.guest(3004, "node2", mb=30)
    peak: dict[str, object] = {"sends": 0}
    phase = ["first run"]
    stop = threading.Event()

    def monitor() -> None:
        while not stop.is_set():
            pids = _sends(rt.sb, "node2", ds)
            if len(pids) > peak["sends"]:
                peak["sends"] = len(pids)
                peak["seen"] = [_ancestry(p) for p in pids]  # type: ignore[assignment]
                peak["when"] = phase[0]
            time.sleep(0.1)

    mon = threading.Thread(target=monitor, daemon=True)
    mon.start()
    try:
        rt.store.create_job(Job(id="3004-0", target="node1", schedule="*/15", rate=3))
        wait_for(lambda: (rt.state("3004-0").progress or {}).get("bytes", 0) > 3_000_000, 40, "the transfer")
        first = rt.state("3004-0")
        victim = rt.workers["node2"]
        phase[0] = f"after killing worker {victim.pid}"
        os.kill(victim.pid, signal.SIGKILL)  # the pool processes follow (PDEATHSIG), zfs send gets EPIPE
        victim.wait(10)
        wait_for(lambda: not _sends(rt.sb, "node2", ds), 20, "the orphaned zfs send to end")
        rt.start_worker("node2")
        # A redelivered or manual message while the dead run's lock is still alive: refused, not run.
        app = make_app(rt.sb.redis_url)
        try:
            tid = new_task_id("3004-0")
            enqueue(app, TASK_REPLICATE, "3004-0", "node2", tid, force=True)
            res = app.AsyncResult(tid).get(timeout=30)
        finally:
            app.close()
        assert res["status"] == "running", res
        # The beat's sweep sees the attempt with nobody behind it: a failure, retried after retry_interval.
        wait_for(lambda: rt.state("3004-0").fail_count == 1, 90, "the interrupted run to be recorded")
        st = rt.state("3004-0")
        assert "interrupted" in (st.error or "") and st.last_try == first.last_try
        assert rt.store.next_sync("3004-0") == pytest.approx(st.last_try + RETRY)
        phase[0] = "waiting for the retry"
        wait_for(lambda: rt.synced_after("3004-0", 0), RETRY + 60, "the retry to succeed")
    finally:
        stop.set()
        mon.join(5)
    assert peak["sends"] == 1, peak  # with the pids, command lines and parents seen at the peak
    assert rt.checksum("node2", ds_of(3004)) == rt.checksum("node1", ds_of(3004))
    log = rt.store.read_log("3004-0")
    assert sum(line.endswith("start replication job") for line in log) == 1 and log[-1].endswith("end replication job")


def test_redis_restart_services_reconnect_nothing_lost(rt: Runtime) -> None:
    rt.guest(3005, "node3")
    rt.store.create_job(Job(id="3005-0", target="node1", schedule="*/15"))
    wait_for(lambda: rt.synced_after("3005-0", 0), 40, "the first sync")
    before = {job.id: (st.last_sync, st.fail_count) for job, st, _ in rt.store.jobs_with_state()}
    rec = rt.sb.state["redis"]["proc"]
    os.kill(rec["pid"], signal.SIGTERM)  # AOF on: a clean restart keeps everything
    wait_for(lambda: not process_alive(rec), 20, "redis to stop")
    time.sleep(3)  # services see the connection drop
    rt.sb._start_redis()  # same port, same AOF directory
    after = {job.id: (st.last_sync, st.fail_count) for job, st, _ in rt.store.jobs_with_state()}
    assert after == before
    t = time.time()
    r = rt.host("schedule-now", "3005-0")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: rt.synced_after("3005-0", before["3005-0"][0]), 60, "a run after the restart")
    assert rt.state("3005-0").last_try >= int(t)
    assert all(p.poll() is None for p in [rt.beat, *rt.workers.values()])


def _start_slow_job(rt: Runtime, vmid: int, node: str, target: str) -> tuple[str, str]:
    (ds,) = rt.guest(vmid, node, mb=30)
    job_id = f"{vmid}-0"
    rt.store.create_job(Job(id=job_id, target=target, schedule="*/15", rate=2))
    wait_for(lambda: (rt.state(job_id).progress or {}).get("bytes", 0) > 2_000_000, 40, "the transfer")
    assert _sends(rt.sb, node, ds)
    # `replq status` shows the running job as SYNCING with its progress.
    r = rt.host("status", "--guest", str(vmid), "--output-format", "json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)[0]
    assert row["state"] == "SYNCING" and row["progress"]["bytes"] > 0 and row["progress"]["total"], row
    assert "SYNCING" in rt.host("status", "--guest", str(vmid)).stdout
    return job_id, ds


def _assert_cancelled_cleanly(rt: Runtime, job_id: str, ds: str, node: str, target: str) -> None:
    wait_for(lambda: not _sends(rt.sb, node, ds), 20, "zfs send to be killed")
    wait_for(lambda: rt.state(job_id).fail_count == 1, 30, "the cancelled run to be recorded")
    st = rt.state(job_id)
    assert "cancelled" in (st.error or ""), st.error
    assert not st.worker and not st.progress
    # Full send cancelled: no partial volume on the target, no new snapshot left on the source.
    assert rt.sb.exec(target, ["zfs", "list", "-H", ds], timeout=60).returncode != 0
    snaps = rt.sh(node, f"zfs list -H -o name -t snapshot -r {ds} || true")
    assert "__replicate_" not in snaps, snaps
    rt.store.update_job(job_id, {"disable": True})  # keep the rest of the module quiet


def test_revoke_with_terminate_kills_the_send_and_records_the_failure(rt: Runtime) -> None:
    job_id, ds = _start_slow_job(rt, 3006, "node3", "node2")
    app = make_app(rt.sb.redis_url)
    try:
        app.control.revoke(rt.state(job_id).task_id, terminate=True)
    finally:
        app.close()
    _assert_cancelled_cleanly(rt, job_id, ds, "node3", "node2")
    app = make_app(rt.sb.redis_url)
    try:  # the worker goes on (its terminated pool process is replaced)
        wait_for(lambda: ping_worker("node3", 1.0, app=app), 20, "the worker to answer", ignore=(Exception,))
    finally:
        app.close()


def test_worker_sigterm_cancels_its_run_and_stops(rt: Runtime) -> None:
    job_id, ds = _start_slow_job(rt, 3007, "node1", "node3")
    w = rt.workers["node1"]
    t0 = time.monotonic()
    w.send_signal(signal.SIGTERM)
    assert w.wait(30) == 0
    assert time.monotonic() - t0 < 60  # not the hour a warm shutdown would wait for the run
    _assert_cancelled_cleanly(rt, job_id, ds, "node1", "node3")
    rt.start_worker("node1")


def test_run_enqueues_to_the_guests_node_and_follows_it_to_the_end(rt: Runtime) -> None:
    rt.guest(3008, "node2")
    rt.store.create_job(Job(id="3008-0", target="node3", schedule="*/15", rate=2))
    wait_for(lambda: rt.synced_after("3008-0", 0), 40, "the first sync")
    first = rt.state("3008-0").last_sync
    rt.sh("node2", f"head -c 12M /dev/urandom > {MOUNT}/subvol-3008-disk-0/more && sync")
    out = io.StringIO()
    code = dispatch.run_remote(rt.store, ["3008-0"], wait=True, out=out, redis_url=rt.sb.redis_url, poll=0.3)
    text = out.getvalue()
    assert code == 0, text
    assert "3008-0: queued on node 'node2'" in text and "3008-0: OK (sent" in text
    assert " MB/s" in text and " of " in text  # at least one progress line (the run takes ~6 s)
    assert rt.state("3008-0").last_sync > first
    assert rt.checksum("node2", ds_of(3008)) == rt.checksum("node3", ds_of(3008))


def test_deleted_job_is_removed_by_its_worker(rt: Runtime) -> None:
    (ds,) = rt.guest(3009, "node3")
    rt.store.create_job(Job(id="3009-0", target="node2", schedule="*/15"))
    wait_for(lambda: rt.synced_after("3009-0", 0), 40, "the first sync")
    assert rt.sb.exec("node2", ["zfs", "list", "-H", ds], timeout=60).returncode == 0
    r = rt.host("delete", "3009-0")  # remove_job=full: beat queues replq.remove_job to node3's worker
    assert r.returncode == 0, r.stderr
    wait_for(lambda: "3009-0" not in rt.store.job_ids(), 40, "the job to be removed")
    assert rt.sb.exec("node2", ["zfs", "list", "-H", ds], timeout=60).returncode != 0  # replica gone
    assert "__replicate_" not in rt.sh("node3", f"zfs list -H -o name -t snapshot -r {ds} || true")
