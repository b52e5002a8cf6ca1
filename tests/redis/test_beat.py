"""The beat scheduler against a real redis-server: enqueue once, overdue once, schedule-now,
running/queued jobs skipped, interrupted runs recorded, two beat processes with one active.

No ZFS here: messages are read back from the node queues in Redis, where Celery left them.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from beat.scheduler import BeatCore, HALock, Sweeper
from replq import dispatch
from replq.app import make_app, queue_name
from replq.model import Disk, Guest, Job, Node, Storage
from replq.store import Store
from tests.support.helpers import stop_procs, wait_for

REPO = str(Path(__file__).resolve().parents[2])
NODES = ("n1", "n2", "n3")


def host_key(seed: int) -> str:
    blob = b"\x00\x00\x00\x0bssh-ed25519" + b"\x00\x00\x00\x20" + bytes([seed]) * 32
    return "ssh-ed25519 " + base64.b64encode(blob).decode()


def make_cluster(store: Store, guests: int, jobs_per_guest: int = 1, schedule: str = "*/15") -> list[str]:
    for i, n in enumerate(NODES):
        store.add_node(Node(name=n, address=f"127.0.0.{i + 1}", host_key=host_key(i + 1)))
    store.add_storage(Storage(id="local-zfs", pool="rpool/data"))
    ids = []
    for g in range(guests):
        vmid = 100 + g
        node = NODES[g % len(NODES)]
        store.add_guest(Guest(vmid=vmid, node=node, disks=[Disk(f"local-zfs:subvol-{vmid}-disk-0")]))
        for n in range(jobs_per_guest):
            target = NODES[(g + 1 + n) % len(NODES)]
            store.create_job(Job(id=f"{vmid}-{n}", target=target, schedule=schedule))
            ids.append(f"{vmid}-{n}")
    return ids


def queued_jobs(client: redis.Redis, node: str | None = None) -> list[str]:
    """Job ids of the messages waiting in the node queues (kombu keeps each queue as a Redis list)."""
    out = []
    for n in [node] if node else NODES:
        for raw in client.lrange(queue_name(n), 0, -1):
            msg = json.loads(raw)
            body = json.loads(base64.b64decode(msg["body"]))
            out.append(body[0][0])
    return out


@pytest.fixture
def env(redis_url: str) -> Iterator[tuple[Store, object, redis.Redis]]:
    store = Store.from_url(redis_url)
    app = make_app(redis_url)
    yield store, app, redis.Redis.from_url(redis_url)
    app.close()


def test_due_jobs_are_queued_once_to_the_guests_node(env: tuple) -> None:
    store, app, client = env
    ids = make_cluster(store, guests=6)
    core = BeatCore(store, app)
    rep = core.tick()
    assert sorted(e.job_id for e in rep.enqueued) == sorted(ids)
    for e in rep.enqueued:
        assert e.node == store.get_guest(int(e.job_id.split("-")[0])).node
        assert e.job_id in queued_jobs(client, e.node)
    # Still due (nobody ran them) but queued: the next ticks add nothing.
    for _ in range(3):
        rep = core.tick()
        assert rep.enqueued == [] and rep.skipped_queued == len(ids)
    assert sorted(queued_jobs(client)) == sorted(ids)


def test_message_carries_expiry_job_id_and_node_queue(env: tuple) -> None:
    store, app, client = env
    make_cluster(store, guests=1)
    BeatCore(store, app).tick()
    msg = json.loads(client.lrange(queue_name("n1"), 0, -1)[0])
    headers = msg["headers"]
    assert headers["task"] == "replq.replicate"
    assert headers["shadow"] == "replq.replicate 100-0"
    assert headers["id"].startswith("100-0.")
    assert headers["expires"]  # a stale message is dropped, not run
    assert msg["properties"]["delivery_info"]["routing_key"] == "replq.node.n1"


def test_overdue_job_after_downtime_is_queued_once(env: tuple) -> None:
    store, app, client = env
    make_cluster(store, guests=1, schedule="*/5")
    # Last attempt a day ago: 288 events were missed while the scheduler was down.
    store.update_state("100-0", last_try=time.time() - 86400, last_sync=time.time() - 86400)
    core = BeatCore(store, app)
    for _ in range(3):
        core.tick()
    assert queued_jobs(client) == ["100-0"]


def test_schedule_now_is_picked_up_at_the_next_tick(env: tuple) -> None:
    store, app, client = env
    make_cluster(store, guests=1)
    now = time.time()
    store.update_state("100-0", last_try=now, last_sync=now)
    core = BeatCore(store, app)
    assert core.tick().enqueued == []
    r = subprocess.run([sys.executable, "-m", "replq", "schedule-now", "100-0"], env={**os.environ, "PYTHONPATH": REPO},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert [e.job_id for e in core.tick().enqueued] == ["100-0"]


def test_running_job_and_busy_guest_are_not_queued(env: tuple) -> None:
    store, app, client = env
    make_cluster(store, guests=1, jobs_per_guest=2)
    held = dispatch.job_lock(store, "100-0")
    assert held.acquire(blocking=False)
    guest = store.lock("guest", 100, 30)
    core = BeatCore(store, app)
    rep = core.tick()
    assert [e.job_id for e in rep.enqueued] == ["100-1"] and rep.skipped_running == 1
    dispatch.clear_queued(store, "100-1", rep.enqueued[0].task_id)
    held.release()
    assert guest.acquire(blocking=False)  # another job of the guest runs: both wait
    rep = core.tick()
    assert rep.enqueued == [] and rep.skipped_running == 2
    guest.release()
    assert sorted(e.job_id for e in core.tick().enqueued) == ["100-0", "100-1"]


def test_publish_failure_releases_the_claim(env: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    store, app, _client = env
    make_cluster(store, guests=1)

    def broken(*_a: object, **_k: object) -> None:  # the broker went away between claim and publish
        raise redis.exceptions.ConnectionError("Connection refused")

    monkeypatch.setattr(dispatch, "enqueue", broken)
    with pytest.raises(redis.exceptions.ConnectionError):
        BeatCore(store, app).tick()
    assert not dispatch.job_routes(store, ["100-0"])[0].queued  # not blocked for an hour


def test_sweeper_records_an_interrupted_run_as_a_failure(env: tuple) -> None:
    store, _app, _client = env
    make_cluster(store, guests=1)
    store.set_setting("retry_interval", 120)
    start = int(time.time()) - 30
    # What a worker killed mid-run leaves behind: the attempt recorded, nobody holding the locks.
    store.update_state("100-0", last_try=start, worker="replq@n1:4242", task_id="100-0.dead")
    store.set_progress("100-0", {"bytes": 100, "total": 1000})
    running = dispatch.job_lock(store, "100-1")  # unrelated lock: irrelevant
    assert running.acquire(blocking=False)
    assert Sweeper(store).sweep() == ["100-0"]
    st = store.get_state("100-0")
    assert st.fail_count == 1 and "interrupted" in (st.error or "") and st.worker is None and st.progress is None
    assert store.next_sync("100-0") == pytest.approx(start + 120)
    assert "end replication job with error" in store.read_log("100-0")[-1]
    assert Sweeper(store).sweep() == []  # once


def test_sweeper_leaves_a_live_run_alone(env: tuple) -> None:
    store, _app, _client = env
    make_cluster(store, guests=1)
    store.update_state("100-0", last_try=int(time.time()), worker="replq@n1:1", task_id="100-0.live")
    lock = dispatch.job_lock(store, "100-0")
    assert lock.acquire(blocking=False)
    assert Sweeper(store).sweep() == []
    lock.release()
    guest = store.lock("guest", 100, 30)  # a `run --local` holds only the guest lock
    assert guest.acquire(blocking=False)
    assert Sweeper(store).sweep() == []
    assert store.get_state("100-0").fail_count == 0


def test_ha_lock_one_active_then_takeover(env: tuple) -> None:
    store, _app, _client = env
    a, b = HALock(store, ttl=2), HALock(store, ttl=2)
    assert a.hold() and not b.hold()
    assert a.hold()  # renewing
    a.active = False  # a dies without releasing: b takes over once the TTL ran out
    b._next_try = 0
    assert not b.hold()
    time.sleep(2.2)
    b._next_try = 0
    assert b.hold()


# ---- two real beat processes -------------------------------------------------------------------

def _start_beat(redis_url: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": REPO, "REPLQ_REDIS_URL": redis_url, "REPLQ_BEAT_LOCK_TTL": "4"}
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "replq", "beat"], env=env, cwd=REPO, stdout=fh, stderr=fh,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    stop_procs(procs, timeout=15)


def test_two_beats_queue_each_job_once_and_standby_takes_over(env: tuple, redis_url: str, tmp_path: Path) -> None:
    store, _app, client = env
    ids = make_cluster(store, guests=12)
    procs = [_start_beat(redis_url, tmp_path / "beat1.log"), _start_beat(redis_url, tmp_path / "beat2.log")]
    try:
        wait_for(lambda: len(queued_jobs(client)) >= len(ids), 20, "every due job queued")
        time.sleep(3)  # both beats keep ticking: nothing more may appear
        assert sorted(queued_jobs(client)) == sorted(ids)
        token = client.get(store.lock("beat", "active", 1).name).decode()
        active = [p for p in procs if f":{p.pid}:" in token]
        assert len(active) == 1, token
        standby = [p for p in procs if p is not active[0]][0]
        active[0].kill()  # dies without releasing its lock
        active[0].wait(5)
        store.create_job(Job(id="100-1", target="n3"))
        # The standby takes over once the dead one's lock expires (TTL in this test: seconds).
        wait_for(lambda: "100-1" in queued_jobs(client), 30, "the standby to queue a new job")
        token = client.get(store.lock("beat", "active", 1).name).decode()
        assert f":{standby.pid}:" in token
        time.sleep(2)
        assert sorted(queued_jobs(client)) == sorted([*ids, "100-1"])
    finally:
        _stop(procs)
    # The surviving beat stopped cleanly on SIGTERM and gave its lock back.
    assert procs[0].returncode in (0, -9) and procs[1].returncode in (0, -9)
    assert client.get(store.lock("beat", "active", 1).name) is None


def test_a_backlog_of_queued_jobs_does_not_starve_the_others(env: tuple) -> None:
    store, app, client = env
    ids = make_cluster(store, guests=9)
    core = BeatCore(store, app, max_per_tick=2)  # tiny pages: the backlog spans several
    for j in ids[:6]:  # queued long ago, their node's worker is down
        dispatch.claim(store, [j])
    rep = core.tick()
    assert sorted(e.job_id for e in rep.enqueued) == sorted(ids[6:]) and rep.skipped_queued == 6
