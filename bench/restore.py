"""Benchmark: `replq config restore` of a 100,000-job cluster backup (with state).

Starts a private redis-server (and stops it), writes a backup document of N jobs (two per guest,
guests spread over 100 nodes, mixed schedules and states), then times
- `replq config restore FILE` end to end as a subprocess into an empty store (read, validate,
  one transaction), and checks the result (`config backup --state` gives the document back,
  every enabled job indexed);
- `replq config backup --state` of that cluster;
and, as the baseline measured in the same run, the same cluster created one object at a time
through the store API (add_node, add_storage, add_guest, create_job, replace_states: what a
restore script without `config restore` would do). Each of those calls costs the same however
large the cluster, so the baseline runs on --baseline-jobs jobs (default 10,000; 0 = all) and
is scaled linearly to N.

    .venv/bin/python bench/restore.py [--jobs 100000] [--nodes 100] [--baseline-jobs N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from replq import backup  # noqa: E402
from replq.store import Store  # noqa: E402
from tests.support.redisproc import RedisProcess  # noqa: E402

GOAL_S = 30.0
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def document(jobs: int, nodes: int, now: float) -> dict[str, Any]:
    """A cluster backup: two jobs per guest (to the two next nodes); ~1 % never ran, ~3 % failing."""
    rnd = random.Random(7)
    names = sorted(f"node{i}" for i in range(1, nodes + 1))  # as `node list` sorts them
    node_rows = [{"name": n, "address": f"10.0.{i // 250}.{i % 250 + 1}", "user": "root", "host_key": KEY,
                  "fingerprint": "ssh-ed25519 SHA256:+DiY3wvvV6TuJJhbpZisF/zLDA0zPMSvHdkr4UvCOqU"}
                 for i, n in enumerate(names)]
    schedules = ["*/15", "*/5", "*/00", "mon..fri 8..17,22:0/15", "12:05", "*/30"]
    guests, job_rows, states = [], [], {}
    for g in range((jobs + 1) // 2):
        vmid, home = 100 + g, g % nodes
        guests.append({"vmid": vmid, "node": names[home], "type": "lxc", "purge": False,
                       "disks": [{"volid": f"local-zfs:subvol-{vmid}-disk-0", "replicate": True}]})
        for k in range(min(2, jobs - 2 * g)):
            job_id = f"{vmid}-{k}"
            job_rows.append({"id": job_id, "type": "local", "guest": vmid, "jobnum": k,
                             "target": names[(home + 1 + k) % nodes], "schedule": rnd.choice(schedules),
                             "rate": rnd.choice([None, 10.0, 50.5]), "enabled": rnd.random() >= 0.05,
                             "comment": None, "source": None, "remove_job": None})
            r = rnd.random()
            if r < 0.01:
                continue
            t = round(now - rnd.uniform(0, 240), 3)
            st = {"last_sync": t, "last_try": t, "fail_count": 0, "error": None,
                  "duration": round(rnd.uniform(0.5, 60), 3), "last_node": names[home],
                  "storeid_list": ["local-zfs"], "bytes": rnd.randrange(10**9)}
            if r > 0.97:
                st.update(fail_count=rnd.randint(1, 5), error="node 'node7' is unreachable: connection refused")
            states[job_id] = st
    return {"version": 1, "created": int(now), "nodes": node_rows,
            "storages": [{"id": "local-zfs", "type": "zfspool", "pool": "rpool/data", "nodes": None,
                          "enabled": True}],
            "guests": guests, "jobs": job_rows, "settings": {"timezone": "UTC"}, "state": states}


def one_by_one(store: Store, doc: dict[str, Any], jobs: int) -> tuple[float, float, int]:
    """Baseline: the first `jobs` jobs (and what they need) created one store call at a time.
    Returns the seconds for settings, nodes and storages, for guests, jobs and states, and the jobs done."""
    cluster = backup.parse({**doc, "jobs": doc["jobs"][:jobs],
                            "state": {k: v for k, v in doc["state"].items() if k in
                                      {j["id"] for j in doc["jobs"][:jobs]}}})
    wanted = {j.guest for j in cluster.jobs}
    t0 = time.perf_counter()
    for key, value in cluster.settings.items():
        store.set_setting(key, value)
    for node in cluster.nodes:
        store.add_node(node)
    for st in cluster.storages:
        store.add_storage(st)
    t1 = time.perf_counter()
    for guest in cluster.guests:
        if guest.vmid in wanted:
            store.add_guest(guest)
    for job in cluster.jobs:
        store.create_job(job)
        if cluster.states and job.id in cluster.states:
            store.replace_states({job.id: {k: v for k, v in cluster.states[job.id].to_dict().items()
                                           if k != "progress"}})
    return t1 - t0, time.perf_counter() - t1, len(cluster.jobs)


def replq(url: str, *args: str, out: Any = subprocess.DEVNULL) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "replq", *args], env={**os.environ, "REPLQ_REDIS_URL": url},
                       stdout=out, stderr=subprocess.PIPE, cwd=ROOT)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"replq {' '.join(args)} failed: {r.stderr.decode()}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--baseline-jobs", type=int, default=10_000, help="Jobs for the one-by-one baseline (0: all).")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="replq-bench-"))
    server = RedisProcess(tmp / "redis", aof=False)
    server.start()
    try:
        store = Store.from_url(server.url)
        doc = document(args.jobs, args.nodes, time.time())
        path = tmp / "backup.json"
        path.write_text(json.dumps(doc))
        print(f"backup: {len(doc['jobs'])} jobs, {len(doc['guests'])} guests, {len(doc['nodes'])} nodes, "
              f"{len(doc['state'])} states; {path.stat().st_size / 1e6:.1f} MB")

        restore_s = replq(server.url, "config", "restore", str(path))
        indexed = store.redis.zcard(store.k("sched"))
        enabled = sum(1 for j in doc["jobs"] if j["enabled"])
        assert indexed == enabled, (indexed, enabled)
        with open(tmp / "again.json", "w") as out:
            backup_s = replq(server.url, "config", "backup", "--state", out=out)
        again = json.loads((tmp / "again.json").read_text())
        assert {**again, "created": 0} == {**doc, "created": 0}, "the backup of the restored cluster differs"

        store.redis.flushdb()
        n = min(args.baseline_jobs or args.jobs, args.jobs)
        fixed, per_job, done = one_by_one(store, doc, n)
        base_s = fixed + per_job * args.jobs / done

        print(f"replq config restore (subprocess, {args.jobs} jobs with state): {restore_s:.2f} s   "
              f"goal ≤ {GOAL_S:.0f} s  {'OK' if restore_s <= GOAL_S else 'MISSED'}")
        print(f"replq config backup --state (subprocess): {backup_s:.2f} s")
        scaled = "" if done == args.jobs else f" (measured on {done} jobs, scaled)"
        print(f"  baseline one store call per object: {base_s:.1f} s{scaled}; ratio {base_s / restore_s:.0f}x")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
