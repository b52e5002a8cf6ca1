"""Benchmark: achieved replication rate / job rate limit at 5, 20 and 50 MB/s (goal: within ±3 %).

Brings up its own 2-node sandbox; for each limit a guest holds about 8 seconds' worth of
random data and is replicated in full by `replq run --id J --local` with `rate` set. The
achieved rate is bytes sent / stream time of the volume (from the replication log: first
byte read from zfs send to last byte written to the channel; the SSH connect before and the
target's final commit after are outside the limiter and printed separately). Run as root: `python bench/throttle.py`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from replq.model import Disk, Guest, Job  # noqa: E402
from replq.sandbox import Sandbox  # noqa: E402
from replq.store import Store  # noqa: E402

SENT_RE = re.compile(r": sent .* in (?P<total>[0-9.]+) s .*stream (?P<secs>[0-9.]+) s")


def sh(sb: Sandbox, node: str, script: str) -> str:
    r = sb.exec(node, ["sh", "-c", script], timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"{node}: {script}: {r.stderr.strip()}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="5,20,50", help="MB/s, comma separated")
    ap.add_argument("--seconds", type=float, default=8.0, help="planned duration of each transfer")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    os.environ["REPLQ_STATE_DIR"] = tempfile.mkdtemp(prefix="replq-bench-state-")
    with tempfile.TemporaryDirectory(prefix="replq-bench-") as tmp:
        sb = Sandbox(Path(tmp) / "sb")
        sb.up(nodes=2, services=False, pool_size="2G")
        try:
            store = Store.from_url(sb.redis_url)
            results = []
            for i, rate in enumerate(rates):
                vmid = 910 + i
                ds = f"rpool/data/subvol-{vmid}-disk-0"
                mb = max(1, round(rate * args.seconds))
                sh(sb, "node1", f"zfs create {ds} && head -c {mb}M /dev/urandom > /rpool/data/subvol-{vmid}-disk-0/d"
                                " && sync")  # fmt: skip
                store.add_guest(Guest(vmid=vmid, node="node1", disks=[Disk(f"local-zfs:subvol-{vmid}-disk-0")]))
                job_id = f"{vmid}-0"
                store.create_job(Job(id=job_id, target="node2", rate=rate))
                r = sb.exec("node1", [sys.executable, "-m", "replq", "run", "--id", job_id, "--local"],
                            env={"PYTHONPATH": str(REPO)}, cwd=str(REPO), timeout=600)  # fmt: skip
                log = store.read_log(job_id)
                if r.returncode != 0:
                    raise SystemExit(f"run {job_id} failed: {r.stderr}\n" + "\n".join(log))
                m = next(m for line in log if (m := SENT_RE.search(line)))
                secs, total = float(m.group("secs")), float(m.group("total"))
                nbytes = store.get_state(job_id).bytes
                achieved = nbytes / secs / 1e6
                ratio = achieved / rate
                results.append((rate, achieved, ratio))
                verdict = "OK" if abs(ratio - 1) <= 0.03 else "OUTSIDE ±3 %"
                print(f"limit {rate:5.1f} MB/s: {nbytes} bytes in {secs:.3f} s = {achieved:6.2f} MB/s, "
                      f"ratio {ratio:.3f} {verdict} (end to end incl. receive commit: {nbytes / total / 1e6:.2f} MB/s)",
                      flush=True)  # fmt: skip
            worst = max(abs(r[2] - 1) for r in results)
            print(f"worst deviation: {worst * 100:.2f} % (goal <= 3 %)")
        finally:
            sb.down()


if __name__ == "__main__":
    main()
