"""`config backup` and `config restore` end to end against a private Redis: the round trip gives the
same cluster back (status, lists, settings, host keys), a store holding a cluster is refused
unless --force, and bad input is refused, naming the entry, before anything is written."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from replq import backup
from replq.model import Disk, Guest, Job, Node, Storage
from replq.store import Store
from tests.support.helpers import ok, refused, run

KEY1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
KEY2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHlJ0WzVJ4zHj3aX5dZ0QFZzXo7x7Yq0nY3cZ0xk8mVn"
LISTS = {"nodes": ["node", "list"], "storages": ["storage", "list"], "guests": ["guest", "list"], "jobs": ["list"]}


def build(store: Store) -> None:
    """A cluster with a bit of everything: pinned and unpinned keys, a restricted disabled storage,
    replicate=0 disks, a guest being purged, jobs with every option, settings, states of every kind."""
    store.add_node(Node("pve1", "10.0.0.1", host_key=KEY1))
    store.add_node(Node("pve2", "10.0.0.2:2222", "replq", KEY2))
    store.add_node(Node("pve3", "[fd00::3]:22"))
    store.add_storage(Storage("local-zfs", "rpool/data"))
    store.add_storage(Storage("tank", "tank/vm", nodes=["pve1", "pve2"], enabled=False))
    store.add_storage(Storage("shared", None, "nfs"))
    store.add_guest(Guest(100, "pve1", "lxc", [Disk("local-zfs:subvol-100-disk-0"),
                                               Disk("local-zfs:subvol-100-disk-1", replicate=False)]))
    store.add_guest(Guest(101, "pve2", "qemu", [Disk("local-zfs:vm-101-disk-0"), Disk("shared:vm-101-disk-1")]))
    store.add_guest(Guest(102, "pve1", "lxc", [Disk("local-zfs:subvol-102-disk-0")]))
    store.add_guest(Guest(103, "pve3", "lxc", []))
    store.set_setting("timezone", "Europe/Vienna")
    store.set_setting("retry_interval", "900")
    store.set_setting("flower_user", "admin")
    store.set_setting("flower_password", "flower-secret-1")
    store.set_setting("notify_url", "https://hooks.example.test/replq?token=abc")
    store.create_job(Job("100-0", "pve2", schedule="*/5", rate=10, comment="DR copy"))
    store.create_job(Job("100-1", "pve3", schedule="mon..fri 22:00", disable=True))
    store.create_job(Job("101-0", "pve1", rate=50.5, source="pve2"))
    store.create_job(Job("102-0", "pve2"))
    store.create_job(Job("102-1", "pve3"))
    now = time.time()
    store.update_state("100-0", last_sync=now - 600, last_try=now - 600, duration=12.5, bytes=123456789,
                       last_node="pve1", storeid_list=["local-zfs"])
    store.update_state("101-0", last_sync=now - 7200, last_try=now - 60, fail_count=3,
                       error="node 'pve1' is unreachable: connection refused")
    store.mark_remove("102-1", "local")
    store.remove_guest(102, purge=True)  # both its jobs marked for full removal; the guest record stays


def views() -> dict[str, str]:
    """What an operator sees of the cluster."""
    out = {"status": ok("status"), "status-json": ok("status", "--output-format", "json"),
           "settings": ok("settings", "show")}
    for name, cmd in LISTS.items():
        out[name] = ok(*cmd, "--output-format", "json")
    return out


def test_round_trip(redis_url: str, tmp_path: Path) -> None:
    store = Store.from_url(redis_url)
    build(store)
    text = ok("config", "backup", "--state")
    doc = json.loads(text)
    for name, cmd in LISTS.items():  # each entry exactly as its list command prints it
        assert doc[name] == json.loads(ok(*cmd, "--output-format", "json")), name
    assert doc["nodes"][0]["host_key"] == KEY1 and doc["nodes"][2]["host_key"] is None
    assert doc["settings"] == {"timezone": "Europe/Vienna", "retry_interval": 900, "flower_user": "admin",
                               "flower_password": "flower-secret-1",
                               "notify_url": "https://hooks.example.test/replq?token=abc"}
    assert set(doc["state"]) == {"100-0", "101-0"} and doc["state"]["101-0"]["fail_count"] == 3
    before = views()
    index = dict(store.redis.zrange(store.k("sched"), 0, -1, withscores=True))
    (tmp_path / "backup.json").write_text(text)

    store.redis.flushdb()
    assert ok("config", "restore", str(tmp_path / "backup.json")).strip() == \
        "restored 3 node(s), 3 storage(s), 4 guest(s), 5 job(s) with state"
    after = views()
    assert after["status"] == before["status"]
    for name in ("nodes", "storages", "guests", "jobs", "settings"):
        assert after[name] == before[name], name
    rows = {r["id"]: r for r in json.loads(after["status-json"])}
    for r in json.loads(before["status-json"]):
        assert rows[r["id"]] == r | {"next_sync": rows[r["id"]]["next_sync"]}
        if r["id"] in ("100-0", "101-0"):  # from the calendar or the retry interval: exactly the same
            assert rows[r["id"]]["next_sync"] == pytest.approx(r["next_sync"])
    restored_index = dict(store.redis.zrange(store.k("sched"), 0, -1, withscores=True))
    assert set(restored_index) == set(index) == {"100-0", "101-0", "102-0", "102-1"}  # 100-1: disabled
    assert {**json.loads(ok("config", "backup", "--state")), "created": 0} == {**doc, "created": 0}
    # The restored store works as any other: ids, pairs and references are enforced again.
    assert "already exists" in refused("create-local-job", "100-0", "pve3")
    assert "to target 'pve2' already exists" in refused("create-local-job", "100-5", "pve2")
    assert "pve3" in refused("node", "remove", "pve3")


def test_restore_from_stdin_without_state(redis_url: str) -> None:
    store = Store.from_url(redis_url)
    build(store)
    text = ok("config", "backup")
    assert "state" not in json.loads(text)
    store.redis.flushdb()
    r = run("config", "restore", "-", stdin=text)
    assert r.returncode == 0 and r.stdout.strip() == "restored 3 node(s), 3 storage(s), 4 guest(s), 5 job(s)"
    rows = json.loads(ok("status", "--output-format", "json"))
    assert all(r["last_sync"] is None and r["fail_count"] == 0 for r in rows)
    assert sorted(store.due_jobs()) == ["100-0", "101-0", "102-0", "102-1"]  # never ran: due now


def test_a_job_imported_from_proxmox_outside_the_job_limits_is_restored(redis_url: str, tmp_path: Path) -> None:
    """config import accepts a pvesr schedule replq would refuse for a new job: its backup restores."""
    store = Store.from_url(redis_url)
    build(store)
    store.add_guest(Guest(104, "pve1", "lxc", [Disk("local-zfs:subvol-104-disk-0")]))
    cfg = tmp_path / "replication.cfg"
    cfg.write_text("local: 104-0\n\ttarget pve2\n\tschedule sat *-1..7 15:00\n")
    r = run("config", "import", str(cfg))
    assert r.returncode == 0 and "warning" in r.stderr, r.stderr
    text = ok("config", "backup")
    store.redis.flushdb()
    r = run("config", "restore", "-", stdin=text)
    assert r.returncode == 0, r.stderr
    assert store.get_job("104-0").schedule == "sat *-1..7 15:00"


def test_restore_refuses_a_store_that_holds_a_cluster(redis_url: str, tmp_path: Path) -> None:
    store = Store.from_url(redis_url)
    build(store)
    path = tmp_path / "backup.json"
    path.write_text(ok("config", "backup", "--state"))
    store.redis.flushdb()
    store.add_node(Node("other", "10.9.9.9"))
    store.set_setting("retry_interval", "600")
    store.append_log("100-0", "an old log line")
    keys = sorted(store.redis.keys("*"))
    err = refused("config", "restore", str(path))
    assert err == ("replq: the store already holds a cluster (nodes: 1, settings: 1); restore refuses to replace "
                   "it (--force replaces it)\n")
    assert sorted(store.redis.keys("*")) == keys
    # A store with only settings holds a cluster too.
    store.remove_node("other")
    assert "settings: 1" in refused("config", "restore", str(path))

    lock = store.lock("job", "100-0", 60)
    assert lock.acquire(blocking=False)
    store.add_node(Node("other", "10.9.9.9"))
    assert ok("config", "restore", "--force", str(path)).startswith("restored 3 node(s)")
    assert [n["name"] for n in json.loads(ok("node", "list", "--output-format", "json"))] == ["pve1", "pve2", "pve3"]
    assert store.get_settings()["retry_interval"] == 900
    assert store.read_log("100-0") == []  # the old cluster's records are gone with it...
    assert store.redis.exists(store.k("lock", "job", "100-0"))  # ...but a lock held by a running job stays


def good_doc(redis_url: str) -> dict[str, Any]:
    """The backup of build()'s cluster (made in-process for speed), the store left empty."""
    store = Store.from_url(redis_url)
    build(store)
    doc = backup.document(store.read_cluster(with_state=True), time.time())
    store.redis.flushdb()
    return doc


def _set(path: str, value: Any) -> Any:
    """An edit of the good document: set a value at a dotted path (list indexes as numbers)."""
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = doc
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target[p]
        if value is _DELETE:
            del target[int(last) if isinstance(target, list) else last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return edit


_DELETE = object()

BAD_DOCS = [
    (_set("nodes.1.name", "pve 2"), "backup: nodes[1] 'pve 2': "),
    (_set("nodes.1.name", "pve1"), "backup: nodes[1] 'pve1': listed twice"),
    (_set("nodes.0.address", "10.0.0.1:99999"), "backup: nodes[0] 'pve1': invalid address"),
    (_set("nodes.0.host_key", "ssh-ed25519 garbage"), "backup: nodes[0] 'pve1': "),
    (_set("nodes.0.fingerprint", "ssh-ed25519 SHA256:forged"), "backup: nodes[0] 'pve1': fingerprint"),
    (_set("nodes.0.extra", 1), "backup: nodes[0] 'pve1': unknown key 'extra'"),
    (_set("nodes.0.user", _DELETE), "backup: nodes[0] 'pve1': missing key 'user'"),
    (_set("storages.0.pool", "rpool//data"), "backup: storages[0] 'local-zfs': invalid pool"),
    (_set("storages.2.nodes", "pve1"), "backup: storages[2] 'tank': nodes: expected a list"),
    (_set("storages.2.enabled", "no"), "backup: storages[2] 'tank': enabled: expected true or false"),
    (_set("guests.0.node", "pve9"), "backup: guests[0] '100': no such node 'pve9'"),
    (_set("guests.0.vmid", "100"), "backup: guests[0] '100': vmid: expected a number"),
    (lambda doc: doc["guests"].__setitem__(1, dict(doc["guests"][0])), "backup: guests[1] '100': listed twice"),
    (_set("guests.1.vmid", 100), "backup: guests[1] '100': volume 'local-zfs:vm-101-disk-0' belongs to guest 101, "
                                 "not 100"),
    (_set("guests.0.disks.0.volid", "local-zfs:../../etc"), "backup: guests[0] '100': invalid volume name"),
    (_set("guests.0.disks.0.replicate", 0), "backup: guests[0] '100': disk replicate: expected true or false"),
    (_set("jobs.0.target", "pve9"), "backup: jobs[0] '100-0': no such node 'pve9' (target)"),
    (_set("jobs.0.schedule", "every day"), "backup: jobs[0] '100-0': "),
    (_set("jobs.0.rate", -1), "backup: jobs[0] '100-0': "),
    (_set("jobs.0.id", "100-01"), "backup: jobs[0] '100-01': "),
    (_set("jobs.0.jobnum", 7), "backup: jobs[0] '100-0': guest and jobnum (100, 7) do not match the id"),
    (_set("jobs.0.type", "remote"), "backup: jobs[0] '100-0': type: only 'local' jobs exist"),
    (_set("jobs.1.target", "pve2"), "backup: jobs[1] '100-1': a second job for guest '100' to target 'pve2'"),
    (lambda doc: doc["jobs"].append(dict(doc["jobs"][3])), "backup: jobs[5] '102-0': listed twice"),
    (_set("jobs.2", {"id": "104-0", "type": "local", "guest": 104, "jobnum": 0, "target": "pve1", "schedule": "*/15",
                     "rate": None, "enabled": True, "comment": None, "source": None, "remove_job": None}),
     "backup: jobs[2] '104-0': no such guest 104"),
    (_set("settings.notify_command", "/bin/sh -c id"), "backup: settings 'notify_command': notify_command is not"),
    (_set("settings.retry_interval", 5), "backup: settings 'retry_interval': retry_interval: value must be"),
    (_set("settings.timezone", "Mars/Base"), "backup: settings 'timezone': timezone: unknown time zone"),
    (_set("state.100-0.fail_count", -1), "backup: state '100-0': fail_count: expected a non-negative number"),
    (_set("state.100-0.worker", "w1"), "backup: state '100-0': unknown job state field 'worker'"),
    (_set("state.999-0", {}), "backup: state '999-0': no such job in the backup"),
    (_set("jobs", {}), "backup: jobs: expected a list"),
    (_set("guests", _DELETE), "backup: missing top-level key 'guests'"),
    (_set("extra", []), "backup: unknown top-level key 'extra'"),
    (_set("version", 2), "backup: version 2 is not supported"),
]


@pytest.mark.parametrize(("edit", "message"), BAD_DOCS, ids=[m for _, m in BAD_DOCS])
def test_bad_entry_refused_naming_it_and_nothing_written(redis_url: str, tmp_path: Path, edit: Any,
                                                         message: str) -> None:
    doc = good_doc(redis_url)
    edit(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    err = refused("config", "restore", str(path))
    assert err.startswith("replq: " + message), err
    assert redis.Redis.from_url(redis_url).dbsize() == 0


@pytest.mark.parametrize(("text", "message"), [
    ("", "backup: empty input"),
    ("{\"nodes\": [", "backup: not valid JSON"),
    ("[]", "backup: expected a JSON object"),
    ('{"nodes": [], "nodes": [], "storages": [], "guests": [], "jobs": [], "settings": {}}',
     "backup: not valid JSON (duplicate key 'nodes')"),
    ('{"nodes": [], "storages": [], "guests": [], "jobs": [], "settings": {"retry_interval": NaN}}',
     "backup: not valid JSON (NaN is not a number)"),
    ("nodes: []", "backup: not valid JSON"),
])
def test_garbage_refused_without_writing(redis_url: str, tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "garbage.json"
    path.write_text(text)
    assert refused("config", "restore", str(path)).startswith("replq: " + message)
    assert redis.Redis.from_url(redis_url).dbsize() == 0


def test_unreadable_input_refused(redis_url: str, tmp_path: Path) -> None:
    assert refused("config", "restore", str(tmp_path / "missing.json")).startswith("replq: cannot read")
    (tmp_path / "binary").write_bytes(b"\xff\xfe{}")
    assert "not UTF-8 text" in refused("config", "restore", str(tmp_path / "binary"))
    assert redis.Redis.from_url(redis_url).dbsize() == 0


def test_a_bad_last_job_after_many_good_ones_writes_nothing(redis_url: str, tmp_path: Path) -> None:
    """Validation covers the whole document before the first write, however long it is."""
    doc = good_doc(redis_url)
    doc["guests"] += [{"vmid": v, "node": "pve1", "type": "lxc", "purge": False,
                       "disks": [{"volid": f"local-zfs:subvol-{v}-disk-0", "replicate": True}]}
                      for v in range(1000, 3000)]
    doc["jobs"] += [{"id": f"{v}-0", "type": "local", "guest": v, "jobnum": 0, "target": "pve2", "schedule": "*/15",
                     "rate": None, "enabled": True, "comment": None, "source": None, "remove_job": None}
                    for v in range(1000, 3000)]
    doc["jobs"][-1]["schedule"] = "not a schedule"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    assert refused("config", "restore", str(path)).startswith("replq: backup: jobs[2004] '2999-0': ")
    assert redis.Redis.from_url(redis_url).dbsize() == 0
    doc["jobs"][-1]["schedule"] = "*/15"
    path.write_text(json.dumps(doc))
    assert ok("config", "restore", str(path)).strip() == "restored 3 node(s), 3 storage(s), 2004 guest(s), " \
                                                         "2005 job(s) with state"
