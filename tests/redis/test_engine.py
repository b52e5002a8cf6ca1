"""Engine pieces without ZFS or SSH: log lines, progress publishing, CLI refusals (real Redis)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import paramiko
import pytest

from replq import jobstate, transfer
from replq.model import Disk, Guest, Job, Node, Storage
from replq.output import human_bytes
from replq.store import Store

REPO = str(Path(__file__).resolve().parents[2])
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFFZwt0+x2oix/58y+52DIrq9zIT99kJEO991GWMMuM2"


def test_log_line_format() -> None:
    line = jobstate.log_line("100-0", "start replication job", when=time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1)))
    assert line == "2026-01-02 03:04:05 100-0: start replication job"


def test_human() -> None:
    assert human_bytes(None) == "unknown"
    assert human_bytes(512) == "512 B"
    assert human_bytes(3 * 1024 * 1024) == "3.0 MiB"


def test_progress_published_at_most_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(transfer.time, "monotonic", lambda: now[0])
    published: list[dict | None] = []
    p = transfer.Progress(publish=published.append, total=10_000_000)
    for i in range(1, 101):  # 100 updates over 5 s: 5 publications (plus the first)
        now[0] += 0.05
        p.update(i * 100_000)
    assert 5 <= len(published) <= 6
    last = published[-1]
    assert last is not None and last["bytes"] >= 8_000_000
    assert last["total"] == 10_000_000 and last["rate"] == pytest.approx(2_000_000, rel=0.05)
    p.update(0, force=True)
    assert len(published) >= 6


def test_progress_eta() -> None:
    published: list[dict | None] = []
    p = transfer.Progress(publish=published.append, total=1000)
    p._window = [(time.monotonic() - 1.0, 0)]
    p.update(500, force=True)
    assert published[-1]["eta"] is not None and published[-1]["eta"] > 0


# ------------------------------------------------------------------------- CLI against Redis


def replq(*args: str, env_node: str = "node1") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, REPLQ_NODE=env_node)
    return subprocess.run([sys.executable, "-m", "replq", *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=60)  # fmt: skip


@pytest.fixture
def store(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    key = tmp_path / "id_ecdsa"
    paramiko.ECDSAKey.generate().write_private_key_file(str(key))
    monkeypatch.setenv("REPLQ_SSH_KEY", str(key))
    st = Store.from_url(redis_url)
    for i in (1, 2):
        st.add_node(Node(name=f"node{i}", address=f"127.0.0.{i}:1", host_key=HOST_KEY))
    st.add_storage(Storage(id="local-zfs", pool="rpool/data"))
    st.add_guest(Guest(vmid=100, node="node1", disks=[Disk("local-zfs:subvol-100-disk-0")]))
    st.create_job(Job(id="100-0", target="node2"))
    return st


def test_log_of_unknown_job(store: Store) -> None:
    r = replq("log", "100-7")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "100-7" in r.stderr


def test_log_prints_lines(store: Store) -> None:
    store.append_log("100-0", "2026-01-01 00:00:00 100-0: start replication job")
    r = replq("log", "100-0")
    assert r.returncode == 0 and r.stdout == "2026-01-01 00:00:00 100-0: start replication job\n"
    r = replq("log", "100-0", "--output-format", "json")
    assert r.stdout.strip() == '["2026-01-01 00:00:00 100-0: start replication job"]'


@pytest.mark.parametrize(
    "args",
    [["run", "--local"], ["run", "--dry-run"], ["run", "--id", "100-0", "--local", "--dry-run"]],
)
def test_run_usage_errors(store: Store, args: list[str]) -> None:
    r = replq(*args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr


def test_run_local_refused_off_the_guest_node(store: Store) -> None:
    r = replq("run", "--id", "100-0", "--local", env_node="node2")
    assert r.returncode == 1
    assert "guest 100 lives on node 'node1', not on this node 'node2'" in r.stderr
    assert store.get_state("100-0").last_try == 0  # nothing recorded


def test_run_local_unreachable_target_is_a_recorded_failure(store: Store) -> None:
    """Target address with nothing listening: the run fails cleanly, state and log say why."""
    r = replq("run", "--id", "100-0", "--local")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    st = store.get_state("100-0")
    assert st.fail_count == 1 and "node 'node2'" in st.error and "unreachable" in st.error
    assert st.last_try > 0 and st.last_sync == 0 and st.worker is None and st.progress is None
    log = store.read_log("100-0")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d 100-0: start replication job", log[0])
    assert log[-1].endswith("100-0: end replication job with error: " + st.error)
    r = replq("run", "--id", "100-0", "--local")
    assert store.get_state("100-0").fail_count == 2


def test_guest_lock_refuses_a_second_run(store: Store) -> None:
    lock = store.lock("guest", 100, 30)
    assert lock.acquire(blocking=False)
    try:
        r = replq("run", "--id", "100-0", "--local")
        assert r.returncode == 1 and "guest 100 is locked" in r.stderr
        assert store.get_state("100-0").last_try == 0
    finally:
        lock.release()


def test_disabled_job_refused(store: Store) -> None:
    store.update_job("100-0", {"disable": True})
    r = replq("run", "--id", "100-0", "--local")
    assert r.returncode == 1 and "disabled" in r.stderr
