"""A real `replq worker` against a real redis-server, without ZFS: `run` enqueues and follows, a
refused scheduled job goes to error state instead of spinning, the worker stops on SIGTERM.

The jobs here fail fast (their target has no sshd), which is all these paths need.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from beat.scheduler import BeatCore
from replq import dispatch, settings
from replq.app import make_app, ping_worker
from replq.store import Store
from tests.redis.test_beat import make_cluster, queued_jobs
from tests.support.helpers import wait_for

REPO = str(Path(__file__).resolve().parents[2])


@pytest.fixture
def worker(redis_url: str, tmp_path: Path) -> Iterator[subprocess.Popen]:
    """Starts a worker for a node (the test makes the cluster first, so the node exists)."""
    procs: list[subprocess.Popen] = []

    def start(node: str = "n1") -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": REPO, "REPLQ_REDIS_URL": redis_url,
               "REPLQ_SSH_KEY": str(tmp_path / "no-such-key")}
        with open(tmp_path / "worker.log", "ab") as fh:
            p = subprocess.Popen([sys.executable, "-m", "replq", "worker", "--node", node], env=env, cwd=REPO,
                                 stdout=fh, stderr=fh, stdin=subprocess.DEVNULL, start_new_session=True)
        procs.append(p)
        app = make_app(redis_url)
        try:
            wait_for(lambda: ping_worker(node, 1.0, app=app), 30, "the worker to answer", ignore=(Exception,))
        finally:
            app.close()
        return p

    yield start  # type: ignore[misc]
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def test_run_enqueues_follows_and_exits_with_the_job_result(redis_url: str, worker) -> None:  # noqa: ANN001
    store = Store.from_url(redis_url)
    make_cluster(store, guests=1)
    worker()
    out = io.StringIO()
    code = dispatch.run_remote(store, ["100-0"], wait=True, out=out, redis_url=redis_url)
    text = out.getvalue()
    assert code == 1, text
    assert "100-0: queued on node 'n1'" in text and "100-0: failed: " in text
    st = store.get_state("100-0")
    assert st.fail_count == 1 and st.error and st.error in text
    assert store.read_log("100-0")[0].endswith("100-0: start replication job")


def test_run_refuses_when_no_worker_answers_and_no_wait_only_queues(redis_url: str) -> None:
    store = Store.from_url(redis_url)
    make_cluster(store, guests=2)  # 101-0 lives on n2: no worker there
    out = io.StringIO()
    assert dispatch.run_remote(store, ["101-0"], wait=True, out=out, redis_url=redis_url) == 1
    assert "no replq worker answers on node 'n2'" in out.getvalue()
    assert queued_jobs(store.redis) == []
    out = io.StringIO()
    assert dispatch.run_remote(store, ["101-0"], wait=False, out=out, redis_url=redis_url) == 0
    assert "101-0: queued on node 'n2'" in out.getvalue()
    assert queued_jobs(store.redis) == ["101-0"]
    # Queued already: a second `run` says so instead of queueing it twice.
    out = io.StringIO()
    assert dispatch.run_remote(store, ["101-0"], wait=False, out=out, redis_url=redis_url) == 0
    assert "already queued" in out.getvalue() and queued_jobs(store.redis) == ["101-0"]


def test_run_without_id_queues_every_due_job(redis_url: str) -> None:
    store = Store.from_url(redis_url)
    ids = make_cluster(store, guests=3)
    now = time.time()
    store.update_state("102-0", last_try=now, last_sync=now)  # not due
    out = io.StringIO()
    assert dispatch.run_remote(store, None, wait=False, out=out, redis_url=redis_url) == 0
    assert sorted(queued_jobs(store.redis)) == sorted(set(ids) - {"102-0"})


def test_refused_scheduled_job_goes_to_error_state_instead_of_spinning(redis_url: str, worker) -> None:  # noqa: ANN001
    store = Store.from_url(redis_url)
    make_cluster(store, guests=1)  # 100-0: guest on n1, target n2
    store.set_setting("retry_interval", 300)
    # The guest now lives on its job's target (moved there by hand): the engine refuses the run.
    store.set_guest_node(100, "n2")
    worker("n2")
    app = make_app(redis_url)
    try:
        core = BeatCore(store, app)
        assert [e.node for e in core.tick().enqueued] == ["n2"]
        wait_for(lambda: store.get_state("100-0").fail_count == 1, 30, "the refused attempt to be recorded")
        st = store.get_state("100-0")
        assert st.error and "n2" in st.error  # the engine says why (its wording is its own)
        assert store.next_sync("100-0") == pytest.approx(st.last_try + 300)
        assert store.read_log("100-0")[-1].endswith(f"end replication job with error: {st.error}")
        for _ in range(3):  # error state: not queued again every tick
            assert core.tick().enqueued == []
            time.sleep(0.3)
        assert store.get_state("100-0").fail_count == 1
    finally:
        app.close()


def test_worker_stops_on_sigterm(redis_url: str, worker) -> None:  # noqa: ANN001
    store = Store.from_url(redis_url)
    make_cluster(store, guests=1)
    p = worker()
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 0
    assert time.monotonic() - t0 < 10


def test_a_running_worker_heartbeats_and_a_stopped_one_is_not_alive(redis_url: str, worker,  # noqa: ANN001
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store.from_url(redis_url)
    make_cluster(store, guests=1)
    monkeypatch.setenv("REPLQ_HEARTBEAT_INTERVAL", "1")
    assert "n1" not in store.heartbeats()
    p = worker()
    first = wait_for(lambda: store.heartbeats().get("n1"), 10, "the first heartbeat of n1")
    wait_for(lambda: store.heartbeats().get("n1", 0) > first, 10, "a second heartbeat (every second)")
    assert settings.worker_alive(store.heartbeats()["n1"], time.time(), 60)
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0
    assert "n1" not in store.heartbeats()  # a clean stop says so at once
