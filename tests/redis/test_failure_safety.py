"""Issue 11 (failure safety) against a real redis-server: a guest cannot be given another guest's
disk through the CLI, and a lock that cannot be renewed stops the work it guards (SPEC §10)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from replq.errors import NotFound
from replq.locks import Heartbeat
from replq.model import Disk, Guest, Node, Storage
from replq.store import Store
from tests.support.helpers import refused
from tests.support.redisproc import RedisProcess


def test_guest_add_and_set_disks_refuse_another_guests_volume(redis_url: str) -> None:
    store = Store.from_url(redis_url)
    store.add_node(Node(name="node1", address="127.0.0.1:22", host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA=="))
    store.add_storage(Storage(id="local-zfs", pool="rpool/data"))
    err = refused("--redis", redis_url, "guest", "add", "100", "--node", "node1", "--disk",
                  "local-zfs:subvol-200-disk-0")  # fmt: skip
    assert "200" in err and "100" in err, err
    with pytest.raises(NotFound):  # nothing was written
        store.get_guest(100)
    store.add_guest(Guest(vmid=100, node="node1", disks=[Disk("local-zfs:subvol-100-disk-0")]))
    err = refused("--redis", redis_url, "guest", "set-disks", "100", "--disk", "local-zfs:subvol-100-disk-0",
                  "--disk", "local-zfs:vm-200-disk-0")  # fmt: skip
    assert "200" in err, err
    assert [d.volid for d in store.get_guest(100).disks] == ["local-zfs:subvol-100-disk-0"]


@pytest.fixture
def lone_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test alone (it is killed mid-test)."""
    server = RedisProcess(tmp_path / "redis", aof=False)
    server.start()
    yield server
    server.stop()


def test_work_stops_when_its_lock_cannot_be_renewed(lone_redis: RedisProcess) -> None:
    """Redis goes away (a worker cut off from it): the lock expires there after its TTL and another
    worker may take it. The holder must stop before that, at 0.8 x TTL without renewal (SPEC §10)."""
    ttl = 3.0
    client = redis.Redis.from_url(lone_redis.url, socket_timeout=1, socket_connect_timeout=1)
    lock = client.lock("replq:lock:guest:100", timeout=ttl, thread_local=False)
    assert lock.acquire(blocking=False)
    lost = threading.Event()
    beat = Heartbeat([lock], ttl, on_lost=lost.set, name="test-heartbeat").start()
    try:
        # Renewed at least once, so the last renewal is at most ttl/3 before the cut.
        assert not lost.wait(ttl / 3 + 0.5)
        lone_redis.kill()
        # By cut + ttl the lock has expired in Redis, whatever happened: the work must have stopped.
        assert lost.wait(ttl), f"lock not renewable for {ttl} s (its TTL), but its holder was not told to stop"
    finally:
        beat.stop(release=False)


def test_a_run_refuses_a_guest_registered_with_another_guests_volume(redis_url: str) -> None:
    """A guest stored before `guest add` checked volume names: its run refuses before touching anything."""
    from replq.model import Job, trusted
    from replq.replicate import Replication
    from tests.support.fakezfs import FakeTransfer, FakeZfs

    store = Store.from_url(redis_url)
    for i in (1, 2):
        store.add_node(Node(name=f"node{i}", address=f"127.0.0.{i}:1",
                            host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA=="))
    store.add_storage(Storage(id="local-zfs", pool="rpool/data"))
    store.add_guest(trusted(Guest, vmid=100, node="node1", type="lxc", purge=False,
                            disks=[Disk("local-zfs:subvol-200-disk-0")]))
    store.create_job(Job(id="100-0", target="node2"))
    src = FakeZfs("node1", {"rpool/data": [], "rpool/data/subvol-200-disk-0": []})
    dst = FakeZfs("node2", {"rpool/data": []})
    res = Replication(store, "100-0", "node1", local=src, connect=lambda node: dst,
                      send=FakeTransfer(src, dst)).run()
    assert not res.ok and "belongs to guest 200, not 100" in (res.error or ""), res.error
    assert src.calls == [] or all(c[1] in ("get", "list") for c in src.calls)
    assert dst.calls == []


def test_discard_target_changes_is_for_one_job_and_not_for_a_dry_run(redis_url: str) -> None:
    assert "need --id" in refused("--redis", redis_url, "run", "--discard-target-changes", code=2)
    assert "exclude each other" in refused("--redis", redis_url, "run", "--id", "100-0", "--dry-run",
                                           "--discard-target-changes", code=2)
    store = Store.from_url(redis_url)
    store.request_discard("100-0", 60)
    assert store.take_discard("100-0") and not store.take_discard("100-0")  # one run takes it
