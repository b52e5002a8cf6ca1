"""The order of a run's steps (SPEC §5) and every undo path, with a fake ZFS on both nodes and a
fake transfer (tests/support/fakezfs.py) but the real store on a real redis-server. The sandbox
tests (tests/cluster/test_replicate.py) prove the same on real zfs-fuse and sshd."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import pytest

from replq import jobstate
from replq.errors import JobRefused
from replq.model import Disk, Guest, Job, Node, Storage, snapshot_name
from replq.replicate import Replication
from replq.store import Store
from tests.support.fakezfs import FakeTransfer, FakeZfs, Snap

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFFZwt0+x2oix/58y+52DIrq9zIT99kJEO991GWMMuM2"
POOL = "rpool/data"
D0, D1 = f"{POOL}/subvol-100-disk-0", f"{POOL}/subvol-100-disk-1"


class Engine:
    """Guest 100 on node1 with two disks, job 100-0 to node2; a clock the test moves."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.now = 1_000
        self.order: list[tuple[str, list[str]]] = []
        clock = lambda: self.now  # noqa: E731
        self.src = FakeZfs("node1", {POOL: [], D0: [], D1: []}, clock=clock, log=self.order)
        self.dst = FakeZfs("node2", {POOL: []}, clock=clock, log=self.order)
        self.transfer = FakeTransfer(self.src, self.dst)

    def run(self, at: int) -> object:
        self.now = at
        self.order.clear()
        self.echoed: list[str] = []  # the log lines as `run --verbose` prints them (a removal deletes the log)
        return Replication(self.store, "100-0", "node1", local=self.src, connect=lambda node: self.dst,
                           send=self.transfer, clock=lambda: self.now, echo=self.echoed.append).run()

    def steps(self) -> list[str]:
        """The order as `node verb [object]`, without the listings and feature probes."""
        out = []
        for who, argv in self.order:
            words = [a for a in argv[1:] if a != "--"]
            if "__replq_check_" in words[-1]:
                continue  # the divergence check's own snapshot (test_the_target_is_checked_before_anything)
            if words[0] in ("snapshot", "destroy", "rollback") or who == "transfer":
                out.append(f"{who} {words[0]} {words[-1]}")
        return out


@pytest.fixture
def engine(redis_url: str) -> Iterator[Engine]:
    store = Store.from_url(redis_url)
    for i in (1, 2):
        store.add_node(Node(name=f"node{i}", address=f"127.0.0.{i}:1", host_key=HOST_KEY))
    store.add_storage(Storage(id="local-zfs", pool=POOL))
    store.add_guest(Guest(vmid=100, node="node1", disks=[Disk("local-zfs:subvol-100-disk-0"),
                                                         Disk("local-zfs:subvol-100-disk-1")]))
    store.create_job(Job(id="100-0", target="node2"))
    yield Engine(store)


def snap(t: int) -> str:
    return snapshot_name("100-0", t)


def test_full_then_incremental_in_order(engine: Engine) -> None:
    res = engine.run(1_000)
    assert res.ok, res.error
    s1 = snap(1_000)
    assert engine.steps() == [f"node1 snapshot {D0}@{s1}", f"node1 snapshot {D1}@{s1}",
                              f"transfer send {D0}@{s1}", f"transfer send {D1}@{s1}"]
    assert [argv[-2] for argv, _ in engine.transfer.sends] == ["-Rp", "-Rp"]  # full: no -I
    assert engine.store.get_state("100-0").last_sync == 1_000

    res = engine.run(2_000)
    assert res.ok, res.error
    s2 = snap(2_000)
    # Snapshots first, then the sends (from the last sync's snapshot), and only then, with
    # last_sync recorded, the previous snapshots go: on the source, then on the target (as pvesr).
    assert engine.steps() == [f"node1 snapshot {D0}@{s2}", f"node1 snapshot {D1}@{s2}",
                              f"transfer send {D0}@{s2}", f"transfer send {D1}@{s2}",
                              f"node1 destroy {D0}@{s1}", f"node1 destroy {D1}@{s1}",
                              f"node2 destroy {D0}@{s1}", f"node2 destroy {D1}@{s1}"]
    assert all(["-I", f"{ds}@{s1}"] == argv[3:5] for (argv, _), ds in zip(engine.transfer.sends[2:], (D0, D1),
                                                                              strict=True))
    for ds in (D0, D1):
        assert engine.src.names(ds) == engine.dst.names(ds) == [s2]
    st = engine.store.get_state("100-0")
    assert (st.last_sync, st.fail_count, st.error, st.worker) == (2_000, 0, None, None)


def test_a_failed_cleanup_after_success_keeps_the_run_ok_and_last_sync(engine: Engine) -> None:
    engine.run(1_000)
    engine.dst.fail[f"zfs destroy -- {D0}@{snap(1_000)}"] = "cannot destroy: permission denied"
    res = engine.run(2_000)
    assert res.ok and engine.store.get_state("100-0").last_sync == 2_000
    assert engine.dst.names(D0) == [snap(1_000), snap(2_000)]  # left for the next run
    log = "\n".join(engine.store.read_log("100-0"))
    assert f"warning: could not delete '{D0}@{snap(1_000)}' on node2" in log


def test_a_failed_snapshot_removes_the_ones_made_and_sends_nothing(engine: Engine) -> None:
    engine.run(1_000)
    engine.src.fail[f"zfs snapshot -- {D1}@"] = "cannot create snapshot: out of space"
    res = engine.run(2_000)
    assert not res.ok and "no free space left on the source storage on node 'node1'" in (res.error or "")
    assert engine.steps() == [f"node1 snapshot {D0}@{snap(2_000)}", f"node1 snapshot {D1}@{snap(2_000)}",
                              f"node1 destroy {D0}@{snap(2_000)}"]
    for ds in (D0, D1):
        assert engine.src.names(ds) == engine.dst.names(ds) == [snap(1_000)]
    st = engine.store.get_state("100-0")
    assert (st.last_sync, st.last_try, st.fail_count) == (1_000, 2_000, 1)


def test_a_broken_incremental_rolls_the_target_back_and_keeps_the_base(engine: Engine) -> None:
    engine.run(1_000)
    engine.transfer.fail = "broken"
    res = engine.run(2_000)
    assert not res.ok and "invalid backup stream" in (res.error or "")
    s1, s2 = snap(1_000), snap(2_000)
    assert engine.steps() == [f"node1 snapshot {D0}@{s2}", f"node1 snapshot {D1}@{s2}", f"transfer send {D0}@{s2}",
                              f"node2 rollback {D0}@{s1}", f"node1 destroy {D0}@{s2}", f"node1 destroy {D1}@{s2}"]
    for ds in (D0, D1):
        assert engine.src.names(ds) == engine.dst.names(ds) == [s1]  # the base stays on both sides
    st = engine.store.get_state("100-0")
    assert (st.last_sync, st.fail_count) == (1_000, 1) and "invalid backup stream" in st.error
    log = engine.store.read_log("100-0")
    assert log[-1].endswith(f"end replication job with error: {st.error}")
    assert engine.run(3_000).ok  # recovery at the next run, from the same base
    assert engine.src.names(D0) == engine.dst.names(D0) == [snap(3_000)]


def test_a_failed_full_send_deletes_the_copy_it_received_proven_by_guid(engine: Engine) -> None:
    """D0 arrives complete, then D1's receive fails because D1 appeared on node2 by another hand
    meanwhile: D0's copy (this run's, same guid) goes, since its snapshot goes here too; D1 stays."""
    s1 = snap(1_000)

    def d1_appears(conn: object, send_argv: list[str], recv_argv: list[str], **kw: object) -> tuple[int, float]:
        if send_argv[-1].startswith(D1):
            engine.dst.datasets[D1] = [Snap("precious", 77, 5)]
            engine.transfer.fail = "exists"
        return engine.transfer(conn, send_argv, recv_argv, **kw)

    res = Replication(engine.store, "100-0", "node1", local=engine.src, connect=lambda node: engine.dst,
                      send=d1_appears, clock=lambda: 1_000).run()
    assert not res.ok and "exists" in (res.error or "")
    assert engine.steps()[-3:] == [f"node2 destroy {D0}", f"node1 destroy {D0}@{s1}", f"node1 destroy {D1}@{s1}"]
    assert D0 not in engine.dst.datasets
    assert engine.dst.names(D1) == ["precious"]  # never destroyed: not what this run sent
    log = "\n".join(engine.store.read_log("100-0"))
    assert f"deleted '{D0}' on node2: the copy this run received" in log
    assert f"left '{D1}' on node2 untouched: it is not the copy this run sent" in log


def test_a_first_full_receive_whose_outcome_is_unknown_keeps_the_new_snapshot(engine: Engine) -> None:
    """The connection breaks after zfs recv committed D0's copy: the run cannot tell, so the new
    snapshot stays on D0 and the next run goes on from it incrementally (no 'no common base')."""
    engine.transfer.fail = "after-commit"
    res = engine.run(1_000)
    assert not res.ok and "no exit status" in (res.error or "")
    s1 = snap(1_000)
    assert engine.src.names(D0) == engine.dst.names(D0) == [s1] and engine.src.names(D1) == []
    assert f"keep new snapshot '{D0}@{s1}'" in "\n".join(engine.store.read_log("100-0"))
    assert engine.run(2_000).ok
    assert any("-I" in argv for argv, _ in engine.transfer.sends[-2:])  # D0 went on incrementally
    assert engine.src.names(D0) == engine.dst.names(D0) == [snap(2_000)]


def test_a_lost_connection_touches_nothing_more_on_the_target(engine: Engine) -> None:
    engine.run(1_000)
    engine.transfer.fail = "lost"
    res = engine.run(2_000)
    assert not res.ok and "lost mid-stream" in (res.error or "")
    sent = [i for i, (who, _) in enumerate(engine.order) if who == "transfer"][0]
    assert not [argv for who, argv in engine.order[sent:] if who == "node2"], "no command for an unreachable target"
    assert engine.src.names(D0) == [snap(1_000)]  # the new snapshot went; the base stays
    assert "its partial receive is discarded by zfs" in "\n".join(engine.store.read_log("100-0"))


def test_a_full_target_pool_fails_the_run_in_operator_words(engine: Engine) -> None:
    engine.run(1_000)
    engine.transfer.fail = "nospace"
    res = engine.run(2_000)
    assert not res.ok and "no free space left on the replication target storage on node 'node2'" in res.error
    assert engine.dst.names(D0) == [snap(1_000)]
    assert engine.store.get_state("100-0").fail_count == 1


# ---- the replication log, in pvesr's words (pve-guest-common PVE/Replication.pm) ----------------

V0, V1 = "local-zfs:subvol-100-disk-0", "local-zfs:subvol-100-disk-1"


def pvesr_lines(engine: Engine) -> list[str]:
    """The log's messages after pvesr's `strftime("%F %H:%M:%S") $jobid: ` prefix, without replq's
    own lines (connecting, and per volume the estimated size and bytes sent)."""
    out = []
    assert engine.store.read_log("100-0") in ([], engine.echoed)
    for line in engine.echoed:
        m = re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d 100-0: (.*)", line)
        assert m, line
        if not (m.group(1).startswith(("connecting to target node", f"{V0}: ", f"{V1}: "))):
            out.append(m.group(1))
    return out


def test_log_of_full_and_incremental_runs_as_pvesr(engine: Engine) -> None:
    s1, s2 = snap(1_000), snap(2_000)
    assert engine.run(1_000).ok
    assert pvesr_lines(engine) == [
        "start replication job",
        "guest => CT 100, running => 0",
        f"volumes => {V0},{V1}",
        f"create snapshot '{s1}' on {V0}",
        f"create snapshot '{s1}' on {V1}",
        "using secure transmission, rate limit: none",
        f"full sync '{V0}' ({s1})",
        f"successfully imported '{V0}'",
        f"full sync '{V1}' ({s1})",
        f"successfully imported '{V1}'",
        "end replication job",
    ]
    engine.store.update_job("100-0", {"rate": 10})
    assert engine.run(2_000).ok
    assert pvesr_lines(engine) == [
        "start replication job",
        "guest => CT 100, running => 0",
        f"volumes => {V0},{V1}",
        f"create snapshot '{s2}' on {V0}",
        f"create snapshot '{s2}' on {V1}",
        "using secure transmission, rate limit: 10 MByte/s",
        f"incremental sync '{V0}' ({s1} => {s2})",
        f"successfully imported '{V0}'",
        f"incremental sync '{V1}' ({s1} => {s2})",
        f"successfully imported '{V1}'",
        f"delete previous replication snapshot '{s1}' on {V0}",
        f"delete previous replication snapshot '{s1}' on {V1}",
        f"(remote_finalize_local_job) delete stale replication snapshot '{s1}' on {V0}",
        f"(remote_finalize_local_job) delete stale replication snapshot '{s1}' on {V1}",
        "end replication job",
    ]
    log = engine.store.read_log("100-0")
    assert any(line.endswith("connecting to target node 'node2'") for line in log)
    assert any(f"{V0}: estimated size " in line for line in log) and any(f"{V0}: sent " in line for line in log)


def test_log_of_a_failed_run_and_a_removal_as_pvesr(engine: Engine) -> None:
    engine.run(1_000)
    engine.src.fail[f"zfs snapshot -- {D1}@"] = "cannot create snapshot: out of space"
    res = engine.run(2_000)
    assert pvesr_lines(engine)[3:] == [
        f"create snapshot '{snap(2_000)}' on {V0}",
        f"create snapshot '{snap(2_000)}' on {V1}",
        f"delete previous replication snapshot '{snap(2_000)}' on {V0}",  # pvesr's words for the undo too
        f"end replication job with error: {res.error}",
    ]
    engine.src.fail.clear()
    engine.store.mark_remove("100-0", "full")
    assert engine.run(3_000).ok
    assert pvesr_lines(engine) == [
        "start replication job",
        "guest => CT 100, running => 0",
        f"volumes => {V0},{V1}",
        "start job removal - mode 'full'",
        f"(remote_prepare_local_job) 100-0: delete stale volume '{V0}'",
        f"(remote_prepare_local_job) 100-0: delete stale volume '{V1}'",
        f"delete stale replication snapshot '{snap(1_000)}' on {V0}",
        f"delete stale replication snapshot '{snap(1_000)}' on {V1}",
        "job removed",
        "end replication job",
    ]


def test_log_of_a_fallback_base(engine: Engine) -> None:
    engine.run(1_000)
    engine.store.update_state("100-0", last_sync=900)  # a last sync whose snapshot is nowhere
    assert engine.run(2_000).ok
    lines = pvesr_lines(engine)
    for vol in (V0, V1):
        assert f"expected snapshot {snap(900)} not present for {vol}, not removing others" in lines
        assert f"incremental sync '{vol}' ({snap(1_000)} => {snap(2_000)})" in lines
    engine.store.replace_states({"100-0": {}})  # no last sync at all: replq's own line says it
    assert engine.run(3_000).ok
    assert any(line.endswith(f"{V0}: no last sync recorded: incremental from the newest common replication "
                             f"snapshot {snap(2_000)}") for line in engine.echoed)


# ---- a target that diverged is never rolled back (SPEC §10, issue 11 §1) ----------------------------


def test_every_receive_leaves_a_read_only_replica_marked_with_guest_job_and_source(engine: Engine) -> None:
    assert engine.run(1_000).ok
    for ds in (D0, D1):
        assert engine.dst.props[ds] == {"readonly": "on", "replq:guest": "100", "replq:role": "replica",
                                        "replq:job": "100-0", "replq:source": "node1"}


def test_the_target_is_checked_before_anything_is_touched(engine: Engine) -> None:
    engine.run(1_000)
    engine.run(2_000)
    checks = [i for i, (who, argv) in enumerate(engine.order) if who == "node2" and "__replq_check_" in argv[-1]]
    first_change = min(i for i, (who, argv) in enumerate(engine.order)
                       if who == "transfer" or argv[1] in ("snapshot", "destroy", "rollback")
                       and "__replq_check_" not in argv[-1])
    assert checks and max(checks) < first_change
    assert all("__replq_check_" not in s.name for ds in (D0, D1) for s in engine.dst.datasets[ds])


def test_a_target_written_after_the_base_is_refused_untouched(engine: Engine) -> None:
    engine.run(1_000)
    engine.dst.write(D1, 5000)  # a guest started on the replica by mistake
    res = engine.run(2_000)
    assert not res.ok and res.error.startswith("diverged: ")
    assert f"'{D1}' on node 'node2' was written after the common base {snap(1_000)}" in res.error
    assert "(4.9 KiB would be lost by rolling it back)" in res.error and "--discard-target-changes" in res.error
    assert engine.steps() == []  # no snapshot, no send, no destroy
    assert engine.dst.names(D1) == [snap(1_000)] and engine.dst.dirty[D1] == 5000
    st = engine.store.get_state("100-0")
    assert st.fail_count == 1 and st.last_sync == 1_000 and "diverged" in st.error


def test_discard_target_changes_keeps_the_diverged_state_aside_and_sends_in_full(engine: Engine) -> None:
    engine.run(1_000)
    engine.dst.write(D1, 5000)
    assert not engine.run(2_000).ok
    engine.now = 3_000
    res = Replication(engine.store, "100-0", "node1", local=engine.src, connect=lambda node: engine.dst,
                      send=engine.transfer, clock=lambda: 3_000, discard=True).run()
    assert res.ok, res.error
    kept = f"{POOL}/replq-diverged-subvol-100-disk-1-3000"
    assert engine.dst.names(kept) == [snap(1_000)] and engine.dst.dirty[kept] == 5000  # the state, as it was
    assert engine.dst.props[kept]["readonly"] == "on"
    sends = {argv[-1].split("@")[0]: "-I" in argv for argv, _ in engine.transfer.sends[-2:]}
    assert sends == {D0: True, D1: False}  # D0 incremental as usual, D1 in full
    st = engine.store.get_state("100-0")
    assert st.kept == [f"node2:{kept}"]
    assert jobstate.status_row(engine.store.get_job("100-0"), st, None)["kept"] == [f"node2:{kept}"]  # status JSON
    assert f"kept the diverged state of '{D1}' on node2 as '{kept}'" in "\n".join(engine.store.read_log("100-0"))
    assert engine.run(4_000).ok and kept in engine.dst.datasets  # never deleted by replq


def test_a_receive_that_committed_while_its_run_failed_is_not_divergence(engine: Engine) -> None:
    """The stall case: zfs recv committed the new snapshot on node2, the run failed and deleted it
    here. The next run rolls node2 back to the base without calling that a divergence."""
    engine.run(1_000)
    engine.dst.datasets[D0].append(Snap(snap(1_500), 4242, 1_500, written=9000))
    engine.dst.datasets[D1].append(Snap(snap(1_500), 4243, 1_500, written=9000))
    assert engine.run(2_000).ok
    assert engine.dst.names(D0) == [snap(2_000)]


def test_a_target_snapshot_newer_than_the_base_is_divergence(engine: Engine) -> None:
    """Data only node2 has, in a snapshot (another job's newer sync there, a manual snapshot)."""
    engine.run(1_000)
    engine.dst.datasets[D0].append(Snap("__replicate_100-1_1500__", 4242, 1_500, written=9000))
    res = engine.run(2_000)
    assert not res.ok and "holds data newer than the common base" in res.error, res.error
    assert "__replicate_100-1_1500__" in res.error and engine.steps() == []


@pytest.mark.parametrize(("markers", "why"), [
    ({"replq:role": "live", "replq:guest": "100", "replq:since": "1500"}, "is marked as the guest's live disk"),
    ({"replq:role": "replica", "replq:guest": "200", "replq:job": "200-0"}, "belongs to guest 200"),
    ({"replq:role": "replica", "replq:guest": "100", "replq:job": "100-1"}, "is the replica of job 100-1"),
])
def test_a_target_marked_live_or_as_anothers_is_divergence(engine: Engine, markers: dict, why: str) -> None:
    engine.run(1_000)
    engine.dst.props[D0] = dict(markers)
    res = engine.run(2_000)
    assert not res.ok and why in res.error, res.error
    assert engine.steps() == []


def test_a_source_marked_as_a_replica_is_refused(engine: Engine) -> None:
    """The store says the guest lives on node1, its disk there says it is node2's replica (Redis
    restored from a backup older than a migration): replicating would run the wrong way."""
    engine.run(1_000)
    engine.src.props[D0] = {"replq:role": "replica", "replq:job": "100-0", "replq:source": "node2"}
    res = engine.run(2_000)
    assert not res.ok and "is marked as a replica of job 100-0 received from node 'node2'" in res.error
    assert engine.steps() == []


# ---- the guest lock: re-read after taking it, checked before every destructive step (issue 11 §3) ----


def test_a_guest_moved_while_the_run_waited_for_its_lock_is_refused(engine: Engine) -> None:
    class Racing(Replication):
        @contextlib.contextmanager
        def guest_lock(self, vmid: int) -> Iterator[None]:
            self.store.set_guest_node(vmid, "node2")  # a guest move between the run's read and its lock
            with super().guest_lock(vmid):
                yield

    with pytest.raises(JobRefused, match="guest 100 moved to node 'node2' while job 100-0 waited for its lock"):
        Racing(engine.store, "100-0", "node1", local=engine.src, connect=lambda node: engine.dst,
               send=engine.transfer, clock=lambda: 1_000).run()
    assert engine.order == [] and engine.store.get_state("100-0").last_try == 0


def test_a_lock_taken_over_mid_run_stops_before_the_next_destructive_step(engine: Engine) -> None:
    """The guest lock expired while this engine was cut off and another holder took it: the
    engine must not receive D1 (a receive may roll back), nor clean anything up."""
    engine.run(1_000)

    def taken_over(conn: object, send_argv: list[str], recv_argv: list[str], **kw: object) -> tuple[int, float]:
        out = engine.transfer(conn, send_argv, recv_argv, **kw)
        engine.store.redis.set(engine.store.k("lock", "guest", 100), "99:another-holder")
        return out

    res = Replication(engine.store, "100-0", "node1", local=engine.src, connect=lambda node: engine.dst,
                      send=taken_over, clock=lambda: 2_000).run()
    assert not res.ok and "lock of guest 100 lost (expired or taken over)" in (res.error or "")
    assert "not receiving (may roll back to the base) rpool/data/subvol-100-disk-1" in res.error
    sends = [argv[-1] for argv, _ in engine.transfer.sends]
    assert sends[-1] == f"{D0}@{snap(2_000)}"  # D1 was never sent
    assert [s for s in engine.steps() if "destroy" in s or "rollback" in s] == []  # nothing cleaned up
    assert engine.store.redis.get(engine.store.k("lock", "guest", 100)) == "99:another-holder"  # not released
