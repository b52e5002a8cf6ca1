"""Golden tests: `list`, `status` and `read` print exactly what pvesr prints for the same jobs.

The expected text is built from pvesr's own printf formats (pve-manager PVE/CLI/pvesr.pm,
$print_job_list and $print_job_status, copied here verbatim) with the values pvesr would show,
and from JSON::XS's pretty/canonical layout for `read`. Perl's printf %s and Python's % agree
for these ASCII fields; one line of each is also spelled out in full.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from replq.model import Job
from replq.store import Store
from tests.support.helpers import REPO, job_cluster, ok

LIST = "%-20s %-20s %10s %5s %8s\n"  # pvesr.pm $print_job_list
STATUS = "%-10s %-10s %-20s %20s %20s %10s %10s %s\n"  # pvesr.pm $print_job_status

T_SYNC = 1_773_144_000  # 2026-03-10 12:00:00 UTC
T_FUTURE = 1_893_456_000  # 2030-01-01 00:00:00 UTC: a last_try after now keeps NextSync a date


@pytest.fixture
def store(redis_url: str) -> Store:
    s = job_cluster(redis_url, ("pve1", "pve2", "pve3", "pve4"),
                    {100: "pve1", 101: "pve1", 102: "pve1", 103: "pve1", 104: "pve2", 105: "pve1", 106: "pve1"})
    # Created out of pvesr's order on purpose: 104-2 before 104-10, guest 106 first.
    s.create_job(Job("106-0", "pve2"))
    s.create_job(Job("104-2", "pve4", schedule="mon..fri 22:00"))
    s.create_job(Job("104-10", "pve3", rate=1000))
    s.create_job(Job("104-1", "pve1"))
    s.create_job(Job("100-0", "pve2", schedule="*/5", rate=2.5, comment="Büro: täglich"))
    s.create_job(Job("101-0", "pve2"))
    s.create_job(Job("102-0", "pve3", disable=True))
    s.create_job(Job("103-0", "pve2", schedule="daily", disable=True, source="pve1"))
    s.create_job(Job("105-0", "pve3", rate=12.75))
    s.update_state("100-0", last_sync=T_SYNC, last_try=T_FUTURE, duration=1.843127, last_node="pve1")
    s.update_state("101-0", last_sync=T_SYNC - 3600, last_try=T_FUTURE, fail_count=2, duration=0.071,
                   error="No common base snapshot on volume(s) local-zfs:subvol-101-disk-0")
    s.update_state("103-0", last_sync=T_SYNC, last_try=T_FUTURE, duration=25.0)
    s.update_state("104-1", last_sync=T_SYNC, last_try=T_FUTURE, duration=3.5)
    s.update_state("104-10", last_sync=T_SYNC, last_try=T_FUTURE, duration=0.25)
    s.update_state("104-2", last_sync=T_SYNC, last_try=T_FUTURE, duration=120.000001)
    s.update_state("105-0", last_sync=T_SYNC, last_try=T_SYNC + 900, duration=10.5, worker="pve1:4242", task_id="t")
    s.set_progress("105-0", {"bytes": 10, "total": 100, "rate": 1e6, "eta": 90})
    s.mark_remove("106-0")
    return s


def test_list_golden(store: Store) -> None:
    expected = (LIST % ("JobID", "Target", "Schedule", "Rate", "Enabled")
                + LIST % ("100-0", "local/pve2", "*/5", "2.5", "yes")
                + LIST % ("101-0", "local/pve2", "*/15", "-", "yes")
                + LIST % ("102-0", "local/pve3", "*/15", "-", "no")
                + LIST % ("103-0", "local/pve2", "daily", "-", "no")
                + LIST % ("104-1", "local/pve1", "*/15", "-", "yes")
                + LIST % ("104-10", "local/pve3", "*/15", "1000", "yes")
                + LIST % ("104-2", "local/pve4", "mon..fri 22:00", "-", "yes")
                + LIST % ("105-0", "local/pve3", "*/15", "12.75", "yes")
                + LIST % ("106-0", "local/pve2", "*/15", "-", "yes"))
    out = ok("list")
    assert out == expected
    assert out.splitlines()[1] == "100-0                local/pve2                  */5   2.5      yes"


STATUS_HEADER = STATUS % ("JobID", "Enabled", "Target", "LastSync", "NextSync", "Duration", "FailCount", "State")
ROWS = {
    "100-0": STATUS % ("100-0", "Yes", "local/pve2", "2026-03-10_12:00:00", "2030-01-01_00:05:00", "1.843127", 0,
                       "OK"),
    # error state: retried retry_interval (1800 s) after last_try; the error text is the State
    "101-0": STATUS % ("101-0", "Yes", "local/pve2", "2026-03-10_11:00:00", "2030-01-01_00:30:00", "0.071", 2,
                       "No common base snapshot on volume(s) local-zfs:subvol-101-disk-0"),
    # disabled jobs show their NextSync as pvesr computes it: never tried = pending
    "102-0": STATUS % ("102-0", "No", "local/pve3", "-", "pending", "-", 0, "OK"),
    "103-0": STATUS % ("103-0", "No", "local/pve2", "2026-03-10_12:00:00", "2030-01-02_00:00:00", "25", 0, "OK"),
    "104-1": STATUS % ("104-1", "Yes", "local/pve1", "2026-03-10_12:00:00", "2030-01-01_00:15:00", "3.5", 0, "OK"),
    "104-10": STATUS % ("104-10", "Yes", "local/pve3", "2026-03-10_12:00:00", "2030-01-01_00:15:00", "0.25", 0,
                        "OK"),
    "104-2": STATUS % ("104-2", "Yes", "local/pve4", "2026-03-10_12:00:00", "2030-01-01_22:00:00", "120.000001", 0,
                       "OK"),
    # running: SYNCING and nothing after it (the progress is in the JSON)
    "105-0": STATUS % ("105-0", "Yes", "local/pve3", "2026-03-10_12:00:00", "2026-03-10_12:30:00", "10.5", 0,
                       "SYNCING"),
    # being removed: due at once
    "106-0": STATUS % ("106-0", "Yes", "local/pve2", "-", "pending", "-", 0, "OK"),
}


def test_status_golden_cluster_wide(store: Store) -> None:
    # The 105-0 NextSync is in the past (12:30 of 2026-03-10): pending.
    rows = dict(ROWS, **{"105-0": ROWS["105-0"].replace("2026-03-10_12:30:00", "            pending")})
    out = ok("status")
    assert out == STATUS_HEADER + "".join(rows[j] for j in ("100-0", "101-0", "102-0", "103-0", "104-1", "104-10",
                                                            "104-2", "105-0", "106-0"))
    assert out.splitlines()[1] == (
        "100-0      Yes        local/pve2            2026-03-10_12:00:00  2030-01-01_00:05:00   1.843127          0 OK")


def test_status_scoped_to_a_node_only_when_named(store: Store) -> None:
    only_pve2 = STATUS_HEADER + ROWS["104-1"] + ROWS["104-10"] + ROWS["104-2"]
    assert ok("status", "--node", "pve2") == only_pve2
    assert ok("--node", "pve2", "status") == only_pve2
    env = {**os.environ, "REPLQ_NODE": "pve2"}
    r = subprocess.run([sys.executable, "-m", "replq", "status"], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.stdout == only_pve2, r.stderr
    assert ok("status", "--node", "pve4") == STATUS_HEADER  # no guest lives there
    assert [r["id"] for r in json.loads(ok("status", "--node", "pve2", "--output-format", "json"))] == [
        "104-1", "104-2", "104-10"]
    assert ok("status", "--guest", "104") == only_pve2


def test_read_golden(store: Store) -> None:
    digest = json.loads(ok("read", "100-0", "--output-format", "json"))["digest"]
    # to_json($res, {utf8 => 1, pretty => 1, canonical => 1}): only the properties that are set.
    assert ok("read", "100-0") == (
        "{\n"
        '   "comment" : "Büro: täglich",\n'
        f'   "digest" : "{digest}",\n'
        '   "guest" : 100,\n'
        '   "id" : "100-0",\n'
        '   "jobnum" : 0,\n'
        '   "rate" : 2.5,\n'
        '   "schedule" : "*/5",\n'
        '   "target" : "pve2",\n'
        '   "type" : "local"\n'
        "}\n")
    digest = json.loads(ok("read", "103-0", "--output-format", "json"))["digest"]
    assert ok("read", "103-0") == (
        "{\n"
        f'   "digest" : "{digest}",\n'
        '   "disable" : 1,\n'
        '   "guest" : 103,\n'
        '   "id" : "103-0",\n'
        '   "jobnum" : 0,\n'
        '   "schedule" : "daily",\n'
        '   "source" : "pve1",\n'
        '   "target" : "pve2",\n'
        '   "type" : "local"\n'
        "}\n")
    assert '"rate" : 1000,' in ok("read", "104-10") and '"remove_job" : "full",' in ok("read", "106-0")
