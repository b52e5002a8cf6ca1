"""Benchmark: `replq status` and the due-jobs query on 10,000 jobs over 100 nodes.

Starts a private redis-server (and stops it), loads the cluster through the store, then times
- `replq status` end to end as a subprocess (JSON and text), goal ≤ 1.5 s;
- one due-jobs query on the schedule index, goal ≤ 5 ms;
and, as baselines measured in the same run, a naive due scan (read every job and its state,
compute next_sync for each) and a status read with one round trip per key.

    .venv/bin/python bench/status.py [--jobs 10000] [--nodes 100]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from replq import schedule  # noqa: E402
from replq.model import Disk, Guest, Job, Node, Storage  # noqa: E402
from replq.store import Store  # noqa: E402
from tests.support.redisproc import RedisProcess  # noqa: E402

STATUS_GOAL_S = 1.5
DUE_GOAL_MS = 5.0


def load(store: Store, jobs: int, nodes: int, now: float) -> None:
    """Two jobs per guest (to the two next nodes), guests spread over all nodes; mixed states."""
    store.set_setting("timezone", "UTC")
    names = [f"node{i}" for i in range(1, nodes + 1)]
    for i, n in enumerate(names):
        store.add_node(Node(n, f"10.0.{i // 250}.{i % 250 + 1}"))
    store.add_storage(Storage("local-zfs", "rpool/data"))
    rnd = random.Random(4)
    schedules = ["*/15", "*/5", "*/00", "mon..fri 8..17,22:0/15", "12:05", "*/30"]
    batch: list[Job] = []
    guests = (jobs + 1) // 2
    for g in range(guests):
        vmid = 100 + g
        home = g % nodes
        store.add_guest(Guest(vmid, names[home], "lxc", [Disk(f"local-zfs:subvol-{vmid}-disk-0")]))
        for k in range(min(2, jobs - 2 * g)):
            batch.append(Job(f"{vmid}-{k}", names[(home + 1 + k) % nodes], schedule=rnd.choice(schedules),
                             rate=rnd.choice([None, 10, 50.5]), disable=rnd.random() < 0.05))
        if len(batch) >= 1000:
            store.create_jobs(batch, now=now)
            batch = []
    if batch:
        store.create_jobs(batch, now=now)
    # Most jobs ran recently; some are failing; ~1% never ran (due now).
    states: dict[str, dict] = {}
    for job_id in store.job_ids():
        r = rnd.random()
        if r < 0.01:
            continue
        t = now - rnd.uniform(0, 240)
        st: dict = {"last_try": t, "last_sync": t, "duration": rnd.uniform(0.5, 60), "bytes": rnd.randrange(10**9),
                    "last_node": "node1", "storeid_list": ["local-zfs"]}
        if r > 0.97:
            st.update(fail_count=rnd.randint(1, 5), error="node 'node7' is unreachable: connection refused")
        states[job_id] = st
        if len(states) >= 1000:
            store.replace_states(states, now=now)
            states = {}
    if states:
        store.replace_states(states, now=now)


def timed(fn, repeat: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def cli_status(url: str, fmt: str) -> float:
    env = {**os.environ, "REPLQ_REDIS_URL": url}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "replq", "status", "--output-format", fmt], env=env,
                       capture_output=True, cwd=ROOT)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"replq status failed: {r.stderr.decode()}")
    return dt


def naive_due(store: Store, now: float) -> list[str]:
    """Baseline: what a scheduler without the index does — read everything, compute, filter."""
    settings = store.get_settings()
    due = []
    for job, state, _ in store.jobs_with_state():
        ns = schedule.next_sync(job, state, settings["retry_interval"], settings["timezone"], now)
        if ns is not None and ns <= now:
            due.append(job.id)
    return due


def naive_status_read(store: Store) -> int:
    """Baseline: status reads with one round trip per key (no pipelining)."""
    n = 0
    for job_id in store.job_ids():
        store.get_job(job_id)
        store.get_state(job_id)
        store.next_sync(job_id)
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--nodes", type=int, default=100)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="replq-bench-")
    server = RedisProcess(Path(tmp), aof=False)
    server.start()
    url = server.url
    try:
        store = Store.from_url(url)
        now = time.time()
        t0 = time.perf_counter()
        load(store, args.jobs, args.nodes, now)
        print(f"loaded {len(store.job_ids())} jobs, {len(store.list_guests())} guests, "
              f"{len(store.list_nodes())} nodes in {time.perf_counter() - t0:.1f} s")

        st_json = statistics.median(cli_status(url, "json") for _ in range(3))
        st_text = statistics.median(cli_status(url, "text") for _ in range(3))
        inproc = statistics.median(timed(lambda: store.jobs_with_state(), 3))
        naive_read = statistics.median(timed(lambda: naive_status_read(store), 1))

        due = store.due_jobs(now)
        q = timed(lambda: store.due_jobs(now), 200)
        q_med, q_p99 = statistics.median(q) * 1e3, sorted(q)[int(len(q) * 0.99) - 1] * 1e3
        naive = timed(lambda: naive_due(store, now), 2)
        naive_ms = statistics.median(naive) * 1e3
        assert sorted(naive_due(store, now)) == sorted(due), "index and naive scan disagree"

        print(f"replq status (subprocess, json):  {st_json:.3f} s   goal ≤ {STATUS_GOAL_S} s  "
              f"{'OK' if st_json <= STATUS_GOAL_S else 'MISSED'}")
        print(f"replq status (subprocess, text):  {st_text:.3f} s   goal ≤ {STATUS_GOAL_S} s  "
              f"{'OK' if st_text <= STATUS_GOAL_S else 'MISSED'}")
        print(f"  status read, server-side join (in-process): {inproc * 1e3:.0f} ms; "
              f"baseline one round trip per key: {naive_read * 1e3:.0f} ms; ratio {naive_read / inproc:.1f}x")
        print(f"due-jobs query ({len(due)} due of {args.jobs}): median {q_med:.3f} ms, p99 {q_p99:.3f} ms   "
              f"goal ≤ {DUE_GOAL_MS} ms  {'OK' if q_med <= DUE_GOAL_MS else 'MISSED'}")
        print(f"  baseline naive scan (read all, compute next_sync): {naive_ms:.0f} ms; "
              f"ratio {naive_ms / q_med:.0f}x")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
