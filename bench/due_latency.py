"""Due time → run start on a real sandbox: beat + worker vs. starting the run by hand.

Issue 6's goal: from the moment a job is due to the start of its run (the engine records
last_try as its first step, right before it snapshots), median ≤ 2 s. The job is made due with
`schedule-now` (last_try = 0) and the first change of last_try to a new start is watched in
Redis. Baseline, measured in the same run: `replq run --id J --local` started directly on the
guest's node — the cost of a process start, with no scheduler or queue in between. The ratio
is the scheduling overhead.

Run: .venv/bin/python bench/due_latency.py [--samples N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Import replq from this checkout.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from replq.model import Disk, Guest, Job  # noqa: E402
from replq.sandbox import Sandbox  # noqa: E402
from replq.store import Store  # noqa: E402

JOB, VMID, DS = "900-0", 900, "rpool/data/subvol-900-disk-0"


def wait_start(store: Store, old: set[int], timeout: float = 60) -> float:
    """Poll Redis until the job's last_try is a new start; returns when it was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if store.get_state(JOB).last_try not in old:
            return time.time()
        time.sleep(0.005)
    raise SystemExit("the run did not start")


def wait_idle(store: Store, after: float, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = store.get_state(JOB)
        if st.last_sync >= int(after) and not st.worker and not st.progress:
            return
        time.sleep(0.05)
    raise SystemExit(f"the run did not end: {store.get_state(JOB).error}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="replq-bench-") as tmp:
        sb = Sandbox(Path(tmp) / "sb")
        sb.up(nodes=2, services=True)
        try:
            store = Store.from_url(sb.redis_url)
            r = sb.exec("node1", ["sh", "-c", f"zfs create {DS} && head -c 1000000 /dev/urandom > /{DS}/f"])
            assert r.returncode == 0, r.stderr
            store.add_guest(Guest(VMID, "node1", "lxc", [Disk(f"local-zfs:subvol-{VMID}-disk-0")]))
            store.create_job(Job(id=JOB, target="node2", schedule="*/15"))  # never run: due at once
            wait_idle(store, 1)

            scheduled, direct = [], []
            for _ in range(args.samples):
                time.sleep(1.1)  # one snapshot per second and job
                prev = store.get_state(JOB).last_try
                t0 = time.time()
                store.update_state(JOB, last_try=0)  # = replq schedule-now
                scheduled.append(wait_start(store, {prev, 0}) - t0)
                wait_idle(store, t0)

                time.sleep(1.1)
                prev = store.get_state(JOB).last_try
                t0 = time.time()
                proc = sb.popen("node1", [sys.executable, "-m", "replq", "run", "--id", JOB, "--local"])
                direct.append(wait_start(store, {prev}) - t0)
                proc.wait(120)
                wait_idle(store, t0)
        finally:
            sb.down()

    def fmt(xs: list[float]) -> str:
        return f"median {statistics.median(xs):.2f} s  max {max(xs):.2f} s  (n={len(xs)})"

    print("due → run start, 2-node sandbox, one 1 MB volume")
    print(f"  replq beat + worker:            {fmt(scheduled)}   goal: median ≤ 2 s")
    print(f"  baseline run --local by hand:   {fmt(direct)}")
    print(f"  ratio (scheduled / by hand, medians): {statistics.median(scheduled) / statistics.median(direct):.2f}")


if __name__ == "__main__":
    main()
