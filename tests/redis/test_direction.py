"""The direction switch and the guest-move rules, on a real redis-server (no sandbox, no SSH)."""

from __future__ import annotations

import pytest

from replq import recovery
from replq.direction import commit_switch, lazy_switch, switched
from replq.errors import Conflict, MigrationRefused
from replq.model import Disk, Guest, Job, Node, Storage
from replq.recovery import guest_move
from replq.store import Store


@pytest.fixture
def store(redis_url: str) -> Store:
    s = Store.from_url(redis_url)
    for n in ("pve1", "pve2", "pve3", "pve4"):
        s.add_node(Node(n, f"10.0.0.{n[-1]}"))
    s.add_storage(Storage("local-zfs", "rpool/data"))
    s.add_guest(Guest(100, "pve1", "lxc", [Disk("local-zfs:subvol-100-disk-0")]))
    s.create_job(Job("100-0", "pve2", source="pve1"))
    s.create_job(Job("100-1", "pve3", source="pve1"))
    return s


def members(store: Store, kind: str, name: str) -> set[str]:
    return set(store.redis.smembers(store.k(kind, name)))


def test_switched_is_pure() -> None:
    job = Job("100-0", "pve2", schedule="*/5", rate=10, comment="DR", source="pve1")
    after = switched(job, "pve1", "pve2")
    assert (after.target, after.source) == ("pve1", "pve2")
    assert (after.schedule, after.rate, after.comment) == ("*/5", 10, "DR")
    assert (job.target, job.source) == ("pve2", "pve1")  # the input is unchanged
    other = switched(Job("100-1", "pve3", source="pve1"), "pve1", "pve2")
    assert (other.target, other.source) == ("pve3", "pve2")
    with pytest.raises(Conflict, match="the node it came from is unknown"):
        switched(Job("100-0", "pve2"), None, "pve2")


def test_commit_switch_moves_the_guest_and_reindexes_targets(store: Store) -> None:
    changes = commit_switch(store, 100, "pve2", move_from="pve1")
    assert sorted((b.id, a.target, a.source) for b, a in changes) == [("100-0", "pve1", "pve2"),
                                                                       ("100-1", "pve3", "pve2")]
    assert store.get_guest(100).node == "pve2"
    assert "100" in members(store, "nodeguests", "pve2") and "100" not in members(store, "nodeguests", "pve1")
    assert members(store, "nodetargets", "pve1") == {"100-0"} and members(store, "nodetargets", "pve2") == set()
    assert (store.get_job("100-0").target, store.get_job("100-1").source) == ("pve1", "pve2")
    # The same guest cannot be moved again from where it no longer is.
    with pytest.raises(Conflict, match="moved meanwhile"):
        commit_switch(store, 100, "pve3", move_from="pve1")


def test_lazy_switch_only_when_moved(store: Store) -> None:
    job, guest = store.get_job("100-0"), store.get_guest(100)
    assert lazy_switch(store, job, guest) == (job, None)  # nothing moved: no store access needed
    store.set_guest_node(100, "pve2")  # guest move / HA: only the guest record moves
    guest = store.get_guest(100)
    dry, note = lazy_switch(store, job, guest, persist=False)
    assert dry.target == "pve1" and "now pve2 => pve1" in (note or "")
    assert store.get_job("100-0").target == "pve2"  # a dry run writes nothing
    after, note = lazy_switch(store, job, guest)
    assert (after.target, after.source) == ("pve1", "pve2") and note
    assert store.get_job("100-0").target == "pve1" and store.get_job("100-1").source == "pve1"  # only this job
    assert lazy_switch(store, store.get_job("100-0"), guest)[1] is None  # done once


def test_lazy_switch_without_source_uses_the_last_node(store: Store) -> None:
    store.update_job("100-0", delete=["source"])
    store.update_state("100-0", last_node="pve1")
    store.set_guest_node(100, "pve2")
    after, _ = lazy_switch(store, store.get_job("100-0"), store.get_guest(100))
    assert (after.target, after.source) == ("pve1", "pve2")


def test_lazy_switch_per_job_and_collisions(store: Store) -> None:
    store.set_guest_node(100, "pve2")
    # 100-1 runs first: 100-0 still targets pve2 (it switches at its own run), which is no obstacle.
    after, _ = lazy_switch(store, store.get_job("100-1"), store.get_guest(100))
    assert (after.target, after.source) == ("pve3", "pve2") and store.get_job("100-0").target == "pve2"
    # A job whose switch would target a node another job of the guest already targets is refused.
    store.update_job("100-0", {"source": "pve3"})
    with pytest.raises(Conflict, match="job '100-1' of guest 100 already targets node 'pve3'"):
        lazy_switch(store, store.get_job("100-0"), store.get_guest(100))
    assert store.get_job("100-0").target == "pve2"


def test_guest_move_refused_while_the_old_node_is_alive(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "node_alive", lambda *a, **k: "its worker sent a heartbeat 3 s ago")
    alive = r"node .pve1. is alive \(its worker sent a heartbeat 3 s ago\).*--force"
    with pytest.raises(MigrationRefused, match=alive):
        guest_move(store, 100, "pve2")
    assert store.get_guest(100).node == "pve1"
    res = guest_move(store, 100, "pve2", force=True)
    assert res.forced and res.reason and store.get_guest(100).node == "pve2"
    assert {j["id"]: j["target"] for j in res.jobs} == {"100-0": "pve1", "100-1": "pve3"}
    with pytest.raises(MigrationRefused, match="already lives on node 'pve2'"):
        guest_move(store, 100, "pve2", force=True)


def test_guest_move_refused_while_the_guest_is_locked(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "node_alive", lambda *a, **k: None)
    lock = store.lock("guest", 100, 30)
    assert lock.acquire(blocking=False)
    store.update_state("100-1", worker="pve1:4242")
    try:
        with pytest.raises(MigrationRefused, match="replication job 100-1 is running \\(pve1:4242\\)"):
            guest_move(store, 100, "pve2", force=True)
    finally:
        lock.release()
    assert store.get_guest(100).node == "pve1"
