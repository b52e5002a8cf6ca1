"""`replq metrics`: a real exporter process scraped over HTTP, job state set in a private Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from replq.model import Disk, Guest, Job, Node, Storage
from replq.store import Store
from tests.support.redisproc import free_port


def seed(store: Store) -> None:
    for n in ("pve1", "pve2", "pve3"):
        store.add_node(Node(n, f"10.0.0.{n[-1]}"))
    store.add_storage(Storage("local-zfs", "rpool/data"))
    store.add_guest(Guest(100, "pve1", "lxc", [Disk("local-zfs:subvol-100-disk-0")]))
    store.add_guest(Guest(101, "pve2", "qemu", [Disk("local-zfs:subvol-101-disk-0")]))
    store.create_job(Job("100-0", "pve2", schedule="*/5"))
    store.create_job(Job("100-1", "pve3", rate=10))
    store.create_job(Job("101-0", "pve1", disable=True))


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def get(url: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read().decode()
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
def exporter(redis_url: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = start([sys.executable, "-m", "replq", "--redis", redis_url, "metrics", "--port", str(port)],
                 dict(os.environ), tmp_path / "metrics.log")
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        stop(proc)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def lab(job: str, guest: str, target: str, source: str, **extra: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"job": job, "guest": guest, "target": target, "source": source, **extra}.items()))


def test_metrics_per_job_values(redis_url: str, exporter: str) -> None:
    store = Store.from_url(redis_url)
    seed(store)
    now = time.time()
    store.update_state("100-0", last_sync=now - 120, last_try=now - 120, duration=3.5, bytes=123456)
    store.update_state("100-1", last_sync=now - 4000, last_try=now - 60, fail_count=4,
                       error="node 'pve3' is unreachable", duration=1.25, bytes=0)
    store.update_state("101-0", last_try=now - 5, worker="celery@pve2", progress={"bytes": 10})

    m = samples(get(exporter))
    a, b = lab("100-0", "100", "pve2", "pve1"), lab("100-1", "100", "pve3", "pve1")
    c = lab("101-0", "101", "pve1", "pve2")
    assert m[("replq_up", ())] == 1
    assert m[("replq_jobs", ())] == 3
    assert m[("replq_job_last_sync_age_seconds", a)] == pytest.approx(120, abs=15)
    assert m[("replq_job_last_sync_age_seconds", b)] == pytest.approx(4000, abs=15)
    assert ("replq_job_last_sync_age_seconds", c) not in m  # never synced: no age, timestamp 0
    assert m[("replq_job_last_sync_timestamp_seconds", c)] == 0
    assert m[("replq_job_fail_count", a)] == 0 and m[("replq_job_fail_count", b)] == 4
    assert m[("replq_job_duration_seconds", a)] == 3.5 and m[("replq_job_duration_seconds", b)] == 1.25
    assert m[("replq_job_bytes", a)] == 123456
    assert m[("replq_job_enabled", a)] == 1 and m[("replq_job_enabled", c)] == 0
    for labels, current in ((a, "ok"), (b, "error"), (c, "syncing")):
        for s in ("ok", "error", "syncing"):
            assert m[("replq_job_state", tuple(sorted((*labels, ("state", s)))))] == (1 if s == current else 0)
    assert now - 120 < m[("replq_job_next_sync_timestamp_seconds", a)] <= now - 120 + 300  # */5 after last_try
    assert ("replq_job_next_sync_timestamp_seconds", c) not in m  # disabled: never due

    # Per scrape: a change in the store shows on the next scrape, and a removed job disappears.
    store.update_state("100-1", fail_count=0, error=None, last_sync=now)
    store.delete_job("101-0")
    m = samples(get(exporter))
    assert m[("replq_jobs", ())] == 2
    assert m[("replq_job_fail_count", b)] == 0
    assert m[("replq_job_state", tuple(sorted((*b, ("state", "ok")))))] == 1
    assert not any(k[1] and dict(k[1]).get("job") == "101-0" for k in m)


def test_metrics_store_down_is_up_zero(tmp_path: Path) -> None:
    port, dead = free_port(), free_port()
    proc = start([sys.executable, "-m", "replq", "--redis", f"redis://127.0.0.1:{dead}/0", "metrics",
                  "--port", str(port)], dict(os.environ), tmp_path / "metrics.log")
    try:
        m = samples(get(f"http://127.0.0.1:{port}/metrics"))
        assert m[("replq_up", ())] == 0
        with pytest.raises(urllib.error.HTTPError):
            get(f"http://127.0.0.1:{port}/nothing")
    finally:
        stop(proc)


def test_metrics_port_in_use_is_one_line(redis_url: str) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "replq", "metrics", "--port", str(port)], capture_output=True,
                           text=True, timeout=30)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "Address already in use" in r.stderr


def fetch(url: str, auth: str | None = None, timeout: float = 20) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) of a GET, with `USER:PASSWORD` as basic auth if given; waits for
    the exporter to listen."""
    import base64

    req = urllib.request.Request(url)
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, dict(r.headers), r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read().decode()
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("via", ["flag", "environment"])
def test_metrics_basic_auth(redis_url: str, tmp_path: Path, via: str) -> None:
    """With credentials, a scrape without them, or with wrong ones, gets 401 and no metrics."""
    seed(Store.from_url(redis_url))
    port = free_port()
    argv = [sys.executable, "-m", "replq", "metrics", "--port", str(port)]
    env = dict(os.environ)
    if via == "flag":
        argv += ["--basic-auth", "prometheus:scrape-pw-1"]
    else:
        env |= {"REPLQ_METRICS_USER": "prometheus", "REPLQ_METRICS_PASSWORD": "scrape-pw-1"}
    proc = start(argv, env, tmp_path / "metrics.log")
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        status, headers, body = fetch(url)
        assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="replq metrics"'
        assert "replq_job" not in body
        for wrong in ("prometheus:scrape-pw-2", "other:scrape-pw-1", "prometheus:", "prometheus:scrape-pw-1x"):
            assert fetch(url, wrong)[0] == 401, wrong
        assert fetch(f"http://127.0.0.1:{port}/", "prometheus:wrong")[0] == 401
        status, _, body = fetch(url, "prometheus:scrape-pw-1")
        assert status == 200 and samples(body)[("replq_jobs", ())] == 3
        assert "(basic auth)" in (tmp_path / "metrics.log").read_text()
    finally:
        stop(proc)


def test_metrics_beyond_loopback_without_auth_warns(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    proc = start([sys.executable, "-m", "replq", "metrics", "--address", "0.0.0.0", "--port", str(port)],
                 dict(os.environ), tmp_path / "metrics.log")
    try:
        assert fetch(f"http://127.0.0.1:{port}/metrics")[0] == 200
        assert "warning: serving on '0.0.0.0' without basic auth" in (tmp_path / "metrics.log").read_text()
    finally:
        stop(proc)
