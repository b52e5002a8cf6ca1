"""Durability: with AOF (appendfsync always), every acknowledged change survives kill -9."""

from __future__ import annotations

import signal

from replq.model import Disk, Guest, Job, Node, Storage
from replq.store import Store
from tests.support.redisproc import RedisProcess

NOW = 1_773_144_450.0


def test_acknowledged_changes_survive_kill_9(redis_url: str, redis_server: RedisProcess) -> None:
    store = Store.from_url(redis_url)
    store.set_setting("timezone", "UTC")
    store.add_node(Node("pve1", "10.0.0.1"))
    store.add_node(Node("pve2", "10.0.0.2"))
    store.add_storage(Storage("local-zfs", "rpool/data"))
    acked: dict[str, tuple[float, int]] = {}
    for i in range(150):
        vmid = 100 + i
        store.add_guest(Guest(vmid, "pve1", "lxc", [Disk(f"local-zfs:subvol-{vmid}-disk-0")]))
        store.create_job(Job(f"{vmid}-0", "pve2", rate=1 + i), now=NOW)
        store.update_state(f"{vmid}-0", now=NOW, last_try=NOW + i, last_sync=NOW + i, fail_count=i % 3, bytes=i)
        acked[f"{vmid}-0"] = (NOW + i, i % 3)
    index = {j: store.next_sync(j) for j in acked}

    redis_server.kill(signal.SIGKILL)
    redis_server.start()

    after = Store.from_url(redis_url)
    jobs = {j.id: j for j in after.list_jobs()}
    assert set(jobs) == set(acked)
    for job_id, (last_try, fails) in acked.items():
        st = after.get_state(job_id)
        assert (st.last_try, st.fail_count) == (last_try, fails)
        assert jobs[job_id].rate == 1 + job_id_num(job_id)
        assert after.next_sync(job_id) == index[job_id]
    assert len(after.list_guests()) == 150 and after.get_settings()["timezone"] == "UTC"


def job_id_num(job_id: str) -> int:
    return int(job_id.split("-")[0]) - 100
