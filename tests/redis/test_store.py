"""The Redis store on a real redis-server: rules, atomic races, digests, schedule index, locks."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from replq.errors import Conflict, NotFound, ValidationError
from replq.model import Disk, Guest, Job, Node, Storage
from replq.store import Store, job_digest

NOW = datetime(2026, 3, 10, 12, 7, 30, tzinfo=UTC).timestamp()


def seed(store: Store, guests: int = 3) -> None:
    store.set_setting("timezone", "UTC")
    for n in ("pve1", "pve2", "pve3"):
        store.add_node(Node(n, f"10.0.0.{n[-1]}"))
    store.add_storage(Storage("local-zfs", "rpool/data"))
    store.add_storage(Storage("nfs", None, "nfs"))
    for i in range(guests):
        store.add_guest(Guest(100 + i, "pve1", "lxc", [Disk(f"local-zfs:subvol-{100 + i}-disk-0")]))


@pytest.fixture
def store(redis_url: str) -> Store:
    s = Store.from_url(redis_url)
    seed(s)
    return s


def raises(exc: type[Exception], message: str, fn: Callable[[], object]) -> None:
    with pytest.raises(exc, match=message):
        fn()


def test_create_job_rules(store: Store) -> None:
    store.add_guest(Guest(200, "pve1", "lxc", [Disk("nfs:subvol-200-disk-0"), Disk("local-zfs:x-1", False)]))
    store.add_guest(Guest(201, "pve1", "qemu", [Disk("/dev/sdb")]))
    store.create_job(Job("100-0", "pve2"), now=NOW)
    raises(Conflict, "replication job '100-0' already exists", lambda: store.create_job(Job("100-0", "pve3")))
    raises(Conflict, "replication job for guest '100' to target 'pve2' already exists",
           lambda: store.create_job(Job("100-1", "pve2")))
    raises(ValidationError, "^Source and target must not be identical$", lambda: store.create_job(Job("100-1", "pve1")))
    raises(NotFound, "no such cluster node 'pve9'", lambda: store.create_job(Job("100-1", "pve9")))
    raises(NotFound, "guest '150' does not exist", lambda: store.create_job(Job("150-0", "pve2")))
    raises(ValidationError, "^No replicatable volumes found$", lambda: store.create_job(Job("200-0", "pve2")))
    raises(ValidationError, "unable to replicate local file/device", lambda: store.create_job(Job("201-0", "pve2")))
    raises(NotFound, "no such cluster node 'pve7'", lambda: store.create_job(Job("100-1", "pve3", source="pve7")))
    store.create_job(Job("100-1", "pve3"), now=NOW)  # a second target is fine
    assert [j.id for j in store.list_jobs()] == ["100-0", "100-1"]
    assert [j.id for j in store.list_jobs(guest=101)] == []


def test_refusals_write_nothing(store: Store) -> None:
    before = sorted(store.redis.keys("*"))
    dump = {k: store.redis.dump(k) for k in before}
    for bad in (Job("100-0", "pve1"), Job("150-0", "pve2"), Job("100-0", "pve9")):
        with pytest.raises((ValidationError, NotFound)):
            store.create_job(bad)
    with pytest.raises(ValidationError):
        store.create_jobs([Job("101-0", "pve2"), Job("102-0", "pve1")])  # all or nothing
    assert sorted(store.redis.keys("*")) == before
    assert {k: store.redis.dump(k) for k in before} == dump


def _create_same_id(url: str, barrier: threading.Barrier, results: list[str], target: str) -> None:
    s = Store.from_url(url)
    barrier.wait()
    try:
        s.create_job(Job("100-0", target))
        results.append("ok")
    except Conflict:
        results.append("conflict")


def test_race_same_job_id_threads(store: Store, redis_url: str) -> None:
    for round_ in range(5):
        stale = store.redis.keys("replq:job*") + store.redis.keys("replq:guestjobs*")
        if stale:
            store.redis.delete(*stale)
        results: list[str] = []
        barrier = threading.Barrier(16)
        threads = [threading.Thread(target=_create_same_id, args=(redis_url, barrier, results, ["pve2", "pve3"][i % 2]))
                   for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count("ok") == 1 and results.count("conflict") == 15, (round_, results)


def _proc_create(url: str, jobnum: int, barrier: multiprocessing.synchronize.Barrier,  # type: ignore[name-defined]
                 q: multiprocessing.Queue) -> None:
    s = Store.from_url(url)
    barrier.wait()
    won = 0
    for attempt in range(20):  # hammer: many ids of one guest to one target
        try:
            s.create_job(Job(f"101-{jobnum * 100 + attempt}", "pve2"))
            won += 1
        except Conflict:
            pass
    q.put(won)


def test_race_one_job_per_guest_and_target_processes(store: Store, redis_url: str) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier, q = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_proc_create, args=(redis_url, i, barrier, q)) for i in range(6)]
    for p in procs:
        p.start()
    wins = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    assert sum(wins) == 1
    assert len(store.list_jobs(guest=101)) == 1


def test_digest_refuses_stale_edit(store: Store) -> None:
    store.create_job(Job("100-0", "pve2"), now=NOW)
    d1 = job_digest(store.get_job("100-0"))
    store.update_job("100-0", {"rate": 5}, digest=d1)
    raises(Conflict, "detected modified configuration", lambda: store.update_job("100-0", {"rate": 7}, digest=d1))
    assert store.get_job("100-0").rate == 5
    d2 = job_digest(store.get_job("100-0"))
    assert d2 != d1
    store.update_job("100-0", {"comment": "x"}, digest=d2)


def test_concurrent_digest_edits_one_wins(store: Store, redis_url: str) -> None:
    store.create_job(Job("100-0", "pve2"), now=NOW)
    d = job_digest(store.get_job("100-0"))
    results: list[str] = []
    barrier = threading.Barrier(8)

    def edit(i: int) -> None:
        s = Store.from_url(redis_url)
        barrier.wait()
        try:
            s.update_job("100-0", {"rate": 10 + i}, digest=d)
            results.append("ok")
        except Conflict:
            results.append("conflict")

    threads = [threading.Thread(target=edit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 1


def test_update_rules(store: Store) -> None:
    store.create_job(Job("100-0", "pve2", rate=3, comment="c"), now=NOW)
    raises(ValidationError, "can't change fixed property 'target'", lambda: store.update_job("100-0", {"target": "x"}))
    raises(ValidationError, "fixed property 'target'", lambda: store.update_job("100-0", {}, ["target"]))
    raises(ValidationError, "unknown job property", lambda: store.update_job("100-0", {"foo": 1}))
    raises(ValidationError, "set and delete", lambda: store.update_job("100-0", {"rate": 2}, ["rate"]))
    raises(NotFound, "'100-9' does not exist", lambda: store.update_job("100-9", {"rate": 2}))
    job = store.update_job("100-0", {"schedule": "*/00"}, ["rate", "comment"])
    assert (job.schedule, job.rate, job.comment) == ("*/00", None, None)
    unset = store.update_job("100-0", {}, ["schedule"])  # unset again: the default applies, as in pvesr
    assert (unset.schedule, unset.effective_schedule) == (None, "*/15")


def test_schedule_index_follows_every_change(store: Store) -> None:
    store.create_job(Job("100-0", "pve2"), now=NOW)
    assert store.next_sync("100-0") == NOW and store.due_jobs(NOW) == ["100-0"]
    store.update_state("100-0", now=NOW, last_try=NOW, last_sync=NOW)
    assert store.next_sync("100-0") == datetime(2026, 3, 10, 12, 15, tzinfo=UTC).timestamp()
    assert store.due_jobs(NOW) == []
    store.update_state("100-0", now=NOW, fail_count=1, error="boom")
    assert store.next_sync("100-0") == NOW + 1800
    store.set_setting("retry_interval", "600", now=NOW)
    assert store.next_sync("100-0") == NOW + 600
    store.update_state("100-0", now=NOW, last_try=0)  # schedule-now keeps fail_count
    assert store.get_state("100-0").fail_count == 1 and store.due_jobs(NOW) == ["100-0"]
    store.update_job("100-0", {"disable": True}, now=NOW)
    assert store.next_sync("100-0") is None and store.due_jobs(NOW + 10**6) == []
    store.mark_remove("100-0", "local", now=NOW)
    assert store.get_job("100-0").remove_job == "local" and store.next_sync("100-0") == NOW
    store.delete_job("100-0")
    assert store.next_sync("100-0") is None
    raises(NotFound, "does not exist", lambda: store.get_job("100-0"))
    assert store.redis.keys("replq:state:*") == []


def test_due_jobs_order_and_limit(store: Store) -> None:
    for i in range(3):
        store.create_job(Job(f"10{i}-0", "pve2"), now=NOW - 10 * i)
    assert store.due_jobs(NOW) == ["102-0", "101-0", "100-0"]
    assert store.due_jobs(NOW, limit=2) == ["102-0", "101-0"]
    assert store.due_jobs(NOW - 15) == ["102-0"]


def test_settings_timezone_reindexes(store: Store) -> None:
    store.create_job(Job("100-0", "pve2", schedule="12:00"), now=NOW)
    store.update_state("100-0", now=NOW, last_try=NOW, last_sync=NOW)
    assert store.next_sync("100-0") == datetime(2026, 3, 11, 12, 0, tzinfo=UTC).timestamp()
    store.set_setting("timezone", "Asia/Tokyo", now=NOW)  # 12:00 JST = 03:00 UTC
    assert store.next_sync("100-0") == datetime(2026, 3, 11, 3, 0, tzinfo=UTC).timestamp()
    assert store.get_settings() == {"retry_interval": 1800, "timezone": "Asia/Tokyo", "liveness_window": 60,
                                    "stall_timeout": 600}
    for key, value in (("timezone", "Mars/Base"), ("timezone", "../etc/passwd"), ("retry_interval", "x"),
                       ("retry_interval", "5"), ("bogus", "1")):
        with pytest.raises(ValidationError):
            store.set_setting(key, value)


def test_state_partial_update_and_progress(store: Store) -> None:
    store.create_job(Job("100-0", "pve2"), now=NOW)
    store.update_state("100-0", now=NOW, last_try=NOW, worker="w1", task_id="t1", last_node="pve1",
                       storeid_list=["local-zfs"])
    assert store.set_progress("100-0", {"bytes": 10, "rate": 1.5, "eta": 3})
    st = store.get_state("100-0")
    assert (st.worker, st.progress, st.storeid_list) == ("w1", {"bytes": 10, "rate": 1.5, "eta": 3}, ["local-zfs"])
    store.update_state("100-0", now=NOW, worker=None, task_id=None, progress=None, bytes=123, duration=1.5)
    st = store.get_state("100-0")
    assert (st.worker, st.progress, st.bytes, st.last_try) == (None, None, 123, NOW)
    assert not store.set_progress("100-7", {"bytes": 1})
    assert store.redis.keys("replq:state:100-7") == []
    raises(ValidationError, "fail_count", lambda: store.update_state("100-0", fail_count=-1))
    raises(NotFound, "100-5", lambda: store.update_state("100-5", fail_count=1))


def test_nodes_and_pinning(store: Store) -> None:
    import base64

    k1 = "ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + b"a" * 32).decode()
    k2 = "ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + b"b" * 32).decode()
    assert store.add_node(Node("pve4", "10.0.0.4", host_key=k1))
    assert not store.add_node(Node("pve4", "10.0.0.4", host_key=k1))
    raises(Conflict, "different pinned host key", lambda: store.add_node(Node("pve4", "10.0.0.4", host_key=k2)))
    raises(Conflict, "already exists", lambda: store.add_node(Node("pve4", "10.0.0.5", host_key=k1)))
    raises(Conflict, "pinned", lambda: store.set_node_host_key("pve4", k2))
    store.set_node_host_key("pve3", k2)  # first pin
    assert store.get_node("pve3").host_key == k2
    assert [n.name for n in store.list_nodes()] == ["pve1", "pve2", "pve3", "pve4"]
    store.create_job(Job("100-0", "pve2"), now=NOW)
    raises(Conflict, "still holds guest", lambda: store.remove_node("pve1"))
    raises(Conflict, "replication job '100-0' targets node 'pve2'", lambda: store.remove_node("pve2"))
    store.remove_node("pve4")
    raises(NotFound, "no such cluster node 'pve4'", lambda: store.get_node("pve4"))


def test_storages(store: Store) -> None:
    raises(Conflict, "already defined", lambda: store.add_storage(Storage("local-zfs", "tank")))
    raises(NotFound, "pve9", lambda: store.add_storage(Storage("tank", "tank", nodes=["pve9"])))
    store.add_storage(Storage("tank", "tank/vm", nodes=["pve2", "pve1"], enabled=False))
    assert store.get_storage("tank").nodes == ["pve1", "pve2"] and not store.get_storage("tank").enabled
    assert [s.id for s in store.list_storages()] == ["local-zfs", "nfs", "tank"]
    store.remove_storage("tank")
    raises(NotFound, "does not exist", lambda: store.get_storage("tank"))


def test_guests_and_purge(store: Store) -> None:
    raises(Conflict, "already exists", lambda: store.add_guest(Guest(100, "pve2")))
    raises(NotFound, "pve9", lambda: store.add_guest(Guest(300, "pve9")))
    raises(NotFound, "storage 'zz'", lambda: store.add_guest(Guest(300, "pve1", "lxc", [Disk("zz:x")])))
    store.create_job(Job("100-0", "pve2"), now=NOW)
    store.create_job(Job("100-1", "pve3"), now=NOW)
    raises(Conflict, "^There is a replication job '100-0' for guest '100' - Please remove that first$",
           lambda: store.remove_guest(100))
    store.update_state("100-0", now=NOW, last_try=NOW)
    assert store.remove_guest(100, purge=True, now=NOW) == ["100-0", "100-1"]
    assert store.get_guest(100).purge
    assert {j.remove_job for j in store.list_jobs(100)} == {"full"} and store.due_jobs(NOW) == ["100-0", "100-1"]
    raises(Conflict, "being removed", lambda: store.add_guest(Guest(100, "pve1")))
    store.delete_job("100-0")
    assert store.get_guest(100).purge
    store.delete_job("100-1")  # the last job takes the purged guest with it
    raises(NotFound, "guest '100' does not exist", lambda: store.get_guest(100))
    store.remove_guest(101)
    store.set_guest_node(102, "pve2")
    assert store.get_guest(102).node == "pve2"
    store.remove_node("pve1")  # no guest left there


def test_locks_are_exclusive_and_non_reentrant(store: Store) -> None:
    a = store.lock("guest", 100, ttl=5)
    b = store.lock("guest", 100, ttl=5)
    assert a.acquire(blocking=False)
    assert not a.acquire(blocking=False) and not b.acquire(blocking=False)
    a.extend(5)
    a.release()
    assert b.acquire(blocking=False)
    b.release()
    with pytest.raises(ValueError):
        store.lock("bogus", 1, 1)


def test_log(store: Store) -> None:
    store.append_log("100-0", "2026-03-10 12:00:00 100-0: start replication job")
    store.append_log("100-0", "line 2")
    assert store.read_log("100-0") == ["2026-03-10 12:00:00 100-0: start replication job", "line 2"]
    store.clear_log("100-0")
    assert store.read_log("100-0") == []


def test_prefix_isolation(redis_url: str) -> None:
    a = Store.from_url(redis_url)
    b = Store.from_url(redis_url, prefix="other:")
    a.add_node(Node("pve1", "10.0.0.1"))
    assert b.list_nodes() == []
    assert all(k.startswith("replq:") for k in a.redis.keys("*"))


def test_reindex_all_skips_jobs_changed_meanwhile(store: Store) -> None:
    store.create_job(Job("100-0", "pve2"), now=NOW)
    store.create_job(Job("101-0", "pve2"), now=NOW)
    real = store._cas_index

    def racing(keys: list[str], args: list[str]) -> int:
        # A worker records a run between the bulk read and the bulk write.
        store.update_state("100-0", now=NOW, last_try=NOW, last_sync=NOW)
        return real(keys=keys, args=args)

    store._cas_index = racing  # type: ignore[method-assign]
    assert store.reindex_all(now=NOW + 1) == 1  # only 101-0 written by the bulk pass
    assert store.next_sync("100-0") == datetime(2026, 3, 10, 12, 15, tzinfo=UTC).timestamp()
    assert store.next_sync("101-0") == NOW + 1


def test_reindex_one(store: Store) -> None:
    store.create_job(Job("100-0", "pve2"), now=NOW)
    store.redis.zrem(store.k("sched"), "100-0")  # e.g. an index lost or written by an older version
    assert store.reindex("100-0", now=NOW + 5) == NOW + 5 and store.next_sync("100-0") == NOW + 5
    raises(NotFound, "does not exist", lambda: store.reindex("100-9"))
