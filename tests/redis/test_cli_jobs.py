"""The pvesr job commands end to end: text/JSON output, exit codes, garbage refused cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import redis

from replq.model import Job
from replq.store import Store
from tests.support.helpers import ok, refused
from tests.support.helpers import refused_inproc as inproc


def test_create_list_read(store: Store) -> None:
    ok("create-local-job", "100-0", "pve2", "--schedule", "*/5", "--rate", "10", "--comment", "DR copy")
    ok("create-local-job", "101-1", "pve3", "--disable")
    assert ok("list") == (  # pvesr's printf "%-20s %-20s %10s %5s %8s\n" (more in test_pvesr_output.py)
        "JobID                Target                 Schedule  Rate  Enabled\n"
        "100-0                local/pve2                  */5    10      yes\n"
        "101-1                local/pve3                 */15     -       no\n")
    rows = json.loads(ok("list", "--output-format", "json"))
    assert rows[0] == {"id": "100-0", "type": "local", "guest": 100, "jobnum": 0, "target": "pve2", "schedule": "*/5",
                       "rate": 10.0, "enabled": True, "comment": "DR copy", "source": None, "remove_job": None}
    data = json.loads(ok("read", "100-0", "--output-format", "json-pretty"))
    assert data["digest"] and len(data["digest"]) == 40 and data["comment"] == "DR copy" and "disable" not in data
    assert json.loads(ok("read", "101-1", "--output-format", "json"))["disable"] is True
    assert json.loads(ok("read", "100-0")) == {**data, "rate": 10}
    assert ok("list", "--output-format", "yaml").startswith("- id: 100-0")


def test_seed_examples(store: Store) -> None:
    # The seed document's commands, verbatim.
    ok("create-local-job", "100-0", "pve2", "--schedule", "*/5", "--rate", "10")
    ok("disable", "100-0")
    assert "no" in ok("list").splitlines()[1]
    ok("enable", "100-0")
    assert ok("list").splitlines()[1].endswith("yes")
    ok("update", "100-0", "--schedule", "*/00")
    assert json.loads(ok("read", "100-0", "--output-format", "json"))["schedule"] == "*/00"


def test_refusals_one_line_exit_1(store: Store) -> None:
    ok("create-local-job", "100-0", "pve2")
    assert "replication job '100-0' already exists" in refused("create-local-job", "100-0", "pve3")
    assert "replication job for guest '100' to target 'pve2' already exists" in refused("create-local-job", "100-1",
                                                                                       "pve2")
    assert "Source and target must not be identical" in refused("create-local-job", "101-0", "pve1")
    assert "guest IDs < 100 are reserved" in refused("create-local-job", "99-0", "pve2")
    assert "leading zeros" in refused("create-local-job", "100-01", "pve2")
    assert "minimum value of 1" in refused("update", "100-0", "--rate", "0.5")
    refused("update", "100-0", "--schedule", "*/0")
    assert "does not exist" in refused("read", "100-9")
    assert "fixed property 'target'" in refused("update", "100-0", "--delete", "target")
    assert "does not exist" in refused("update", "100-9")  # nothing to change, of a job that is not there
    refused("delete", "100-0", "--keep", "--force", code=2)
    refused("create-local-job", "100-0", code=2)  # missing TARGET
    refused("list", "--output-format", "xml", code=2)


def test_comment_is_free_text_stored_exactly(store: Store) -> None:
    comment = "DR; rm -rf / `id` $(x) | 'q' \"dq\" 100% a:b é ✓"
    ok("create-local-job", "100-0", "pve2", "--comment", comment)
    assert store.get_job("100-0").comment == comment
    assert json.loads(ok("read", "100-0", "--output-format", "json"))["comment"] == comment
    ok("update", "100-0", "--remove_job", "local")
    assert store.get_job("100-0").remove_job == "local"
    assert "remove_job" in refused("update", "100-0", "--remove_job", "all")


def test_digest(store: Store) -> None:
    ok("create-local-job", "100-0", "pve2")
    d = json.loads(ok("read", "100-0", "--output-format", "json"))["digest"]
    ok("update", "100-0", "--rate", "5", "--digest", d)
    assert "detected modified configuration" in refused("update", "100-0", "--rate", "6", "--digest", d)
    assert store.get_job("100-0").rate == 5
    assert "set and delete" in refused("update", "100-0", "--delete", "rate", "--rate", "3")


def test_delete_modes(store: Store) -> None:
    for jid in ("100-0", "101-0", "102-0"):
        ok("create-local-job", jid, "pve2")
    ok("delete", "100-0")
    ok("delete", "101-0", "--keep")
    ok("delete", "102-0", "--force")
    assert store.get_job("100-0").remove_job == "full" and store.get_job("101-0").remove_job == "local"
    assert [j.id for j in store.list_jobs()] == ["100-0", "101-0"]
    assert set(store.due_jobs()) == {"100-0", "101-0"}


def test_status_text_and_json(store: Store) -> None:
    ok("create-local-job", "100-0", "pve2", "--rate", "2.5")
    ok("create-local-job", "101-0", "pve2")
    ok("create-local-job", "102-0", "pve3", "--disable")
    t = 1_773_144_000.0  # 2026-03-10 12:00:00 UTC
    store.update_state("100-0", last_sync=t, last_try=t, duration=12.345, bytes=4096)
    store.update_state("101-0", last_try=t, fail_count=2, error="storage 'local-zfs' is not available\non 'pve2'")
    lines = ok("status").splitlines()
    assert lines[0].split() == ["JobID", "Enabled", "Target", "LastSync", "NextSync", "Duration", "FailCount", "State"]
    assert lines[1].split() == ["100-0", "Yes", "local/pve2", "2026-03-10_12:00:00", "pending", "12.345", "0", "OK"]
    assert lines[2].split()[:7] == ["101-0", "Yes", "local/pve2", "-", "pending", "-", "2"]
    assert lines[2].endswith("storage 'local-zfs' is not available on 'pve2'")
    # A disabled job shows when it would be due, as pvesr does.
    assert lines[3].split() == ["102-0", "No", "local/pve3", "-", "pending", "-", "0", "OK"]
    rows = json.loads(ok("status", "--output-format", "json"))
    keys = ["id", "guest", "jobnum", "target", "source", "schedule", "rate", "enabled", "last_sync", "last_try",
            "next_sync", "duration", "fail_count", "error", "state", "bytes"]
    assert [list(r) for r in rows] == [keys] * 3
    assert rows[0]["last_sync"] == t and rows[0]["bytes"] == 4096 and rows[0]["rate"] == 2.5
    assert rows[1]["next_sync"] == t + 1800 and rows[1]["state"].startswith("storage")
    assert rows[2]["next_sync"] is None and rows[2]["last_sync"] is None and rows[2]["enabled"] is False
    # A running job shows SYNCING and its progress.
    store.update_state("100-0", last_try=time.time(), worker="pve1-worker", task_id="t-1")
    store.set_progress("100-0", {"bytes": 10, "total": 100, "rate": 1.0, "eta": 90})
    row = json.loads(ok("status", "--guest", "100", "--output-format", "json"))
    assert len(row) == 1 and row[0]["state"] == "SYNCING" and row[0]["progress"]["total"] == 100
    assert ok("status", "--guest", "100").splitlines()[1].endswith(" SYNCING")  # progress only in JSON
    # The future next_sync is shown as local time of the cluster zone.
    store.set_setting("timezone", "Asia/Tokyo")
    store.update_state("100-0", worker=None, task_id=None, progress=None, last_try=t + 3600 * 24 * 365)
    assert ok("status", "--guest", "100").splitlines()[1].split()[4] == "2027-03-10_21:15:00"


def test_schedule_now_and_set_state(store: Store) -> None:
    ok("create-local-job", "100-0", "pve2")
    ok("create-local-job", "100-1", "pve3")
    t = 1_773_144_000
    state = {"100-0": {"last_sync": t, "last_try": t, "fail_count": 1, "error": "x", "duration": 2.5,
                       "last_node": "pve1", "storeid_list": ["local-zfs"], "pid": 77, "ptime": "123"},
             "100-1": {}}
    ok("set-state", "100", json.dumps(state))
    st = store.get_state("100-0")
    assert (st.last_sync, st.fail_count, st.error, st.storeid_list) == (t, 1, "x", ["local-zfs"])
    assert store.next_sync("100-0") == t + 1800
    ok("schedule-now", "100-0")
    st = store.get_state("100-0")
    assert (st.last_try, st.fail_count, st.last_sync) == (0, 1, t)
    assert "100-0" in store.due_jobs()
    for bad, msg in [("[]", "expected a JSON object"), ("{", "invalid JSON"), ('{"101-0": {}}', "does not belong"),
                     ('{"100-9": {}}', "does not exist"), ('{"100-0": {"fail_count": -1}}', "fail_count"),
                     ('{"100-0": {"bogus": 1}}', "unknown job state field"), ('{"100-0": {"worker": "x"}}', "unknown"),
                     ('{"100-0": {"last_sync": NaN}}', "NaN"), ('{"100-0": {}, "100-0": {}}', "duplicate"),
                     ('{"100-0": 5}', "must be an object"), ('{"x": {}}', "invalid replication job id")]:
        assert msg in inproc("set-state", "100", bad), bad
    assert "does not exist" in inproc("set-state", "150", "{}")
    assert store.get_state("100-0").error == "x"


# What pvesr's set-state gets during a migration: PVE::ReplicationState's state of one guest,
# keyed by target (get_unique_target_id), as encode_json writes it (any key order).
PVESR_STATE = ('{"local/pve3":{"last_node":"pve1","last_iteration":1773144000,"storeid_list":["local-zfs"],'
               '"fail_count":0,"last_try":1773144000,"duration":1.843127,"last_sync":1773144000},'
               '"local/pve2":{"pid":4242,"ptime":"123456","fail_count":2,"error":"storage \'local-zfs\' is not '
               'available on node \'pve2\'","last_try":1773147600,"last_sync":1773140400,"duration":0.071,'
               '"last_node":"pve1","storeid_list":["local-zfs"],"last_iteration":1773147600}}')


def test_set_state_in_pvesr_form_round_trip(store: Store) -> None:
    ok("create-local-job", "100-0", "pve2")
    ok("create-local-job", "100-1", "pve3")
    ok("create-local-job", "101-0", "pve2")
    store.update_state("101-0", last_sync=5, last_try=5)
    ok("set-state", "100", PVESR_STATE)
    sent = json.loads(PVESR_STATE)
    for job_id, target in (("100-0", "local/pve2"), ("100-1", "local/pve3")):
        st = store.get_state(job_id).to_dict()
        expected = {k: v for k, v in sent[target].items() if k not in ("pid", "ptime", "last_iteration")}
        assert {k: st[k] for k in expected} == expected, job_id
        assert st["worker"] is None and st["task_id"] is None  # a foreign pid never reads as running
    assert store.get_state("101-0").last_sync == 5  # another guest's job: untouched
    rows = {r["id"]: r for r in json.loads(ok("status", "--output-format", "json"))}
    assert rows["100-0"]["state"] == "storage 'local-zfs' is not available on node 'pve2'"
    assert rows["100-0"]["fail_count"] == 2 and rows["100-1"]["duration"] == 1.843127
    # ... and back: the job-id form of what status shows sets the same state.
    again = {j: {k: rows[j][k] or 0 for k in ("last_sync", "last_try", "fail_count", "duration")} for j in rows
             if j.startswith("100-")}
    for j in again:
        again[j] |= {"error": rows[j]["error"], "last_node": "pve1", "storeid_list": ["local-zfs"]}
    before = {j: store.get_state(j) for j in again}
    ok("set-state", "100", json.dumps(again))
    assert {j: store.get_state(j) for j in again} == before


def test_set_state_pvesr_form_replaces_the_guests_state(store: Store) -> None:
    # pvesr writes the object as the guest's whole state: a job it does not name is reset.
    ok("create-local-job", "100-0", "pve2")
    ok("create-local-job", "100-1", "pve3")
    store.update_state("100-1", last_sync=7, last_try=7)
    ok("set-state", "100", '{"local/pve2": {"last_sync": 9, "last_try": 9}}')
    assert store.get_state("100-0").last_sync == 9 and store.get_state("100-1").last_sync == 0
    assert "no replication job to target 'pve9'" in inproc("set-state", "100", '{"local/pve9": {}}')
    assert "given twice" in inproc("set-state", "100", '{"local/pve2": {}, "100-0": {}}')
    assert "invalid target node name" in inproc("set-state", "100", '{"local/-x": {}}')
    assert store.get_state("100-0").last_sync == 9


def test_unreachable_redis_is_one_line(redis_url: str) -> None:
    r = subprocess.run([sys.executable, "-m", "replq", "--redis", "redis://127.0.0.1:1/0", "list"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Redis" in r.stderr


def test_invalid_utf8_argument_via_subprocess(store: Store) -> None:
    r = subprocess.run([sys.executable.encode(), b"-m", b"replq", b"create-local-job", b"100-0", b"pve\xff"],
                       capture_output=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr
    assert store.list_jobs() == []


# ---- garbage in every argument (in-process through replq.cli.main, the real entry point) ----

GARBAGE = ["a;rm -rf /", "$(reboot)", "`id`", "x\ny", "pve\udcff", "ä😀", "", " ", "../../etc/passwd", "'\"|&<>",
           "100-0\x00", "-x;y", "*" * 5000]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFh"
COMMANDS = [
    ["create-local-job", "{}", "pve2"], ["create-local-job", "101-0", "{}"],
    ["create-local-job", "101-0", "pve2", "--schedule", "{}"], ["create-local-job", "101-0", "pve2", "--rate", "{}"],
    ["create-local-job", "101-0", "pve2", "--source", "{}"],
    ["update", "{}", "--rate", "5"], ["update", "100-0", "--schedule", "{}"], ["update", "100-0", "--rate", "{}"],
    ["update", "100-0", "--disable", "{}"], ["update", "100-0", "--delete", "{}"],
    ["update", "100-0", "--rate", "5", "--digest", "{}"], ["update", "100-0", "--source", "{}"],
    ["update", "100-0", "--remove_job", "{}"],
    ["delete", "{}"], ["enable", "{}"], ["disable", "{}"], ["read", "{}"], ["schedule-now", "{}"],
    ["status", "--guest", "{}"], ["set-state", "{}", "{{}}"], ["set-state", "100", "{}"],
    ["list", "--output-format", "{}"],
    ["node", "add", "{}", "--address", "10.0.0.9", "--host-key", KEY],
    ["node", "add", "pve9", "--address", "{}", "--host-key", KEY],
    ["node", "add", "pve9", "--address", "10.0.0.9", "--user", "{}", "--host-key", KEY],
    ["node", "add", "pve9", "--address", "10.0.0.9", "--host-key", "{}"], ["node", "remove", "{}"],
    ["storage", "add", "{}", "--pool", "tank"], ["storage", "add", "tank", "--pool", "{}"],
    ["storage", "add", "tank", "--pool", "tank", "--nodes", "{}"], ["storage", "add", "tank", "--type", "{}"],
    ["storage", "remove", "{}"],
    ["guest", "add", "{}", "--node", "pve1", "--disk", "local-zfs:subvol-300-disk-0"],
    ["guest", "add", "300", "--node", "{}"], ["guest", "add", "300", "--node", "pve1", "--type", "{}"],
    ["guest", "add", "300", "--node", "pve1", "--disk", "{}"], ["guest", "show", "{}"], ["guest", "remove", "{}"],
    ["settings", "set", "{}", "1"], ["settings", "set", "timezone", "{}"], ["settings", "set", "retry_interval", "{}"],
    ["config", "import", "{}"],
]


def _snapshot(url: str) -> dict[bytes, bytes]:
    raw = redis.Redis.from_url(url)
    return {k: raw.dump(k) for k in sorted(raw.keys("*"))}


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(a for a in c if a != "{}")[:40])
def test_garbage_refused_cleanly(store: Store, redis_url: str, cmd: list[str],
                                capsys: pytest.CaptureFixture[str]) -> None:
    from replq.cli import main

    store.create_job(Job("100-0", "pve2"))
    before = _snapshot(redis_url)
    for g in GARBAGE:
        argv = [a.replace("{}", g) if a == "{}" else a.replace("{{}}", "{}") for a in cmd]
        with pytest.raises(SystemExit) as exc:
            main(argv)
        out, err = capsys.readouterr()
        if exc.value.code == 0:  # as in pvesr, an empty --delete list is nothing to change
            assert cmd[2] == "--delete" and not g.strip(), argv
        else:
            assert exc.value.code in (1, 2), (argv, exc.value.code, out, err)
            assert err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err, (argv, err)
        assert _snapshot(redis_url) == before, argv
