"""Benchmark: one beat tick over 10,000 jobs on 100 nodes, 1 % due per tick (queues only, no ZFS).

Starts its own redis-server (private port and directory), fills the store with 100 nodes,
10,000 guests and one job each, and makes exactly 100 jobs due per tick (error state with
last_try set so that next_sync = T0 + k). Each tick runs on simulated time `now = T0 + k`; after
a tick, a stand-in for the workers records the runs (next_sync moves a week ahead) outside the
measured time.

Measured, in the same run and on the same data:
- replq: BeatCore.tick — the schedule index (ZRANGEBYSCORE), one pipelined read of routes and
  locks, one pipelined claim, one Celery message per due job;
- baseline: what a scheduler without an index does (pvesr scans every job each minute): read
  every job and state, compute next_sync for each, then route and publish the due ones the same way.

Printed: tick cost p50/p99 for both, their ratio, and the enqueue latency (from the moment a job
falls due to its message being in Redis, ticks 1 s apart) p50/p99. Goal: replq tick ≤ 50 ms.
"""

from __future__ import annotations

import base64
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as `python bench/beat.py`: import replq from this checkout, not from another install.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import redis  # noqa: E402

from beat.scheduler import BeatCore, Sweeper, no_result_waits  # noqa: E402
from replq import dispatch, schedule  # noqa: E402
from replq.app import make_app, queue_name  # noqa: E402
from replq.model import Disk, Guest, Job, Node, Storage  # noqa: E402
from replq.store import Store  # noqa: E402
from tests.support.redisproc import RedisProcess  # noqa: E402

NODES = 100
JOBS = 10_000
DUE_PER_TICK = JOBS // 100
TICKS = 60
RETRY = 1800


def host_key(i: int) -> str:
    blob = b"\x00\x00\x00\x0bssh-ed25519" + b"\x00\x00\x00\x20" + i.to_bytes(32, "big")
    return "ssh-ed25519 " + base64.b64encode(blob).decode()


def populate(store: Store) -> list[str]:
    names = [f"node{i}" for i in range(NODES)]
    for i, n in enumerate(names):
        store.add_node(Node(name=n, address=f"10.0.{i // 250}.{i % 250 + 1}", host_key=host_key(i + 1)))
    store.add_storage(Storage(id="local-zfs", pool="rpool/data"))
    jobs = []
    for g in range(JOBS):
        vmid = 1000 + g
        store.add_guest(Guest(vmid=vmid, node=names[g % NODES], disks=[Disk(f"local-zfs:subvol-{vmid}-disk-0")]))
        jobs.append(Job(id=f"{vmid}-0", target=names[(g + 1) % NODES], schedule="weekly"))
    for i in range(0, JOBS, 1000):
        store.create_jobs(jobs[i : i + 1000])
    return [j.id for j in jobs]


def due_time(i: int, t0: float) -> float:
    """Job i falls due during the second before tick i // DUE_PER_TICK, spread evenly."""
    return t0 + i // DUE_PER_TICK - (i % DUE_PER_TICK + 1) / (DUE_PER_TICK + 1)


def arm(store: Store, ids: list[str], t0: float) -> None:
    """Make job i due at due_time(i) (error state: next_sync = last_try + retry_interval)."""
    states = {j: {"fail_count": 1, "error": "bench", "last_try": due_time(i, t0) - RETRY, "last_sync": 0}
              for i, j in enumerate(ids)}
    for i in range(0, len(ids), 1000):
        chunk = dict(list(states.items())[i : i + 1000])
        store.replace_states(chunk, now=t0)


def finish_runs(store: Store, enqueued: list[dispatch.Enqueued], now: float) -> None:
    """What the workers would do (not measured): record the run, drop the queued marker."""
    if not enqueued:
        return
    store.replace_states({e.job_id: {"fail_count": 0, "error": None, "last_try": now, "last_sync": now}
                          for e in enqueued}, now=now, merge=True)
    for e in enqueued:
        dispatch.clear_queued(store, e.job_id, e.task_id)


def baseline_tick(store: Store, app: Any, now: float) -> list[dispatch.Enqueued]:
    """No index: read every job and state, compute next_sync for each, publish the due ones."""
    settings = store.get_settings()
    due = [job.id for job, state, _ns in store.jobs_with_state()
           if (ns := schedule.next_sync(job, state, settings["retry_interval"], settings["timezone"], now)) is not None
           and ns <= now]
    return dispatch.enqueue_routes(store, app, dispatch.job_routes(store, due))


def run(name: str, store: Store, app: Any, client: redis.Redis, ids: list[str],
        tick: Any) -> tuple[list[float], list[float], int]:
    """Ticks on simulated time (tick k at t0 + k, one second apart). A job's enqueue latency is the
    time from its due moment to its message being in Redis: the wait for the next tick plus that
    tick's cost (all messages of a tick reach Redis in one pipeline at its end)."""
    t0 = float(int(time.time()) + 10)
    arm(store, ids, t0)
    index = {j: i for i, j in enumerate(ids)}
    costs: list[float] = []
    latencies: list[float] = []
    total = 0
    try:
        for k in range(TICKS):
            now = t0 + k
            start = time.perf_counter()
            enq = tick(store, app, now)
            cost = time.perf_counter() - start
            costs.append(cost)
            latencies += [now - due_time(index[e.job_id], t0) + cost for e in enq]
            if len(enq) != DUE_PER_TICK:
                raise SystemExit(f"{name}: tick {k} queued {len(enq)} jobs, expected {DUE_PER_TICK}")
            total += len(enq)
            finish_runs(store, enq, now)
    finally:
        for n in range(NODES):
            client.delete(queue_name(f"node{n}"))
    return costs, latencies, total


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="replq-bench-beat-"))
    server = RedisProcess(Path(tmp), aof=False)
    server.start()
    url = server.url
    try:
        store = Store.from_url(url)
        client = redis.Redis.from_url(url)
        t = time.perf_counter()
        ids = populate(store)
        print(f"store: {NODES} nodes, {len(ids)} jobs ({time.perf_counter() - t:.1f} s to create); "
              f"{DUE_PER_TICK} due per tick, {TICKS} ticks each")
        app = make_app(url)
        no_result_waits()  # as in `replq beat`
        core = BeatCore(store, app)
        core.tick(0)  # connect the producer before measuring
        results = {
            "replq (schedule index)": run("replq", store, app, client, ids, lambda s, a, now: core.tick(now).enqueued),
            "baseline (scan all jobs)": run("baseline", store, app, client, ids, baseline_tick),
        }
        for name, (costs, lats, total) in results.items():
            print(f"{name:26} tick p50 {pct(costs, 50) * 1e3:7.1f} ms  p99 {pct(costs, 99) * 1e3:7.1f} ms  "
                  f"due->queued p50 {pct(lats, 50) * 1e3:6.0f} ms  p99 {pct(lats, 99) * 1e3:6.0f} ms  "
                  f"({total} jobs queued)")
        ours = statistics.median(results["replq (schedule index)"][0])
        base = statistics.median(results["baseline (scan all jobs)"][0])
        print(f"ratio baseline/replq tick (median): {base / ours:.1f}x")
        goal = pct(results["replq (schedule index)"][0], 50) <= 0.050
        print(f"goal tick <= 50 ms: {'met' if goal else 'NOT met'} (p50 {ours * 1e3:.1f} ms); due->queued includes "
              f"the wait for the next tick (ticks 1 s apart)")
        t = time.perf_counter()
        Sweeper(store).sweep()
        print(f"sweep for interrupted runs over all {len(ids)} jobs (active beat, every 30 s, own thread): "
              f"{(time.perf_counter() - t) * 1e3:.0f} ms")
        app.close()
        return 0
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
