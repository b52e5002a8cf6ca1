"""Benchmark: full replication of a 1 GiB volume, replq vs `zfs send | ssh (OpenSSH) | zfs recv`.

Brings up its own 2-node sandbox, writes 1 GiB of random data into a dataset on node1 and
sends it to node2 both ways, alternating, twice each; prints the best rate of each, their
ratio (goal: replq >= 0.9 x OpenSSH) and the peak RSS of the sending replq process (goal:
<= 150 MB). Run as root: `python bench/transfer.py [--size-mb N]`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from replq.model import Disk, Guest, Job  # noqa: E402
from replq.sandbox import Sandbox  # noqa: E402
from replq.store import Store  # noqa: E402

DS = "rpool/data/subvol-900-disk-0"


def sh(sb: Sandbox, node: str, script: str, timeout: float = 600) -> str:
    r = sb.exec(node, ["sh", "-c", script], timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"{node}: {script}: {r.stderr.strip()}")
    return r.stdout


def destroy_target(sb: Sandbox, name: str) -> None:
    for _ in range(30):  # zfs-fuse: "dataset is busy" for a moment after use
        r = sb.exec("node2", ["zfs", "destroy", "-r", name], timeout=120)
        if r.returncode == 0 or "does not exist" in r.stderr:
            return
        time.sleep(0.5)
    raise SystemExit(f"cannot destroy {name} on node2: {r.stderr}")


def run_openssh(sb: Sandbox, snap: str) -> float:
    info = sb.node_info("node2")
    ssh = (f"ssh -i {sb.ssh_key} -p {info['port']} -o UserKnownHostsFile={sb.known_hosts} "
           f"-o StrictHostKeyChecking=yes -o BatchMode=yes root@{info['host']}")  # fmt: skip
    t0 = time.monotonic()
    sh(sb, "node1", f"zfs send -Rp {DS}@{snap} | {ssh} zfs recv -F rpool/data/openssh-copy")
    dt = time.monotonic() - t0
    destroy_target(sb, "rpool/data/openssh-copy")
    return dt


def run_replq(sb: Sandbox, store: Store) -> tuple[float, int, int]:
    """Wall time of `replq run --id 900-0 --local`, bytes sent, peak RSS (bytes) of that process."""
    env = {"PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    proc = sb.popen("node1", [sys.executable, "-m", "replq", "run", "--id", "900-0", "--local"], env=env,
                    cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    # wait4 gives this child's own rusage (nsenter execs the engine: it is that process).
    _pid, status, usage = os.wait4(proc.pid, 0)
    dt = time.monotonic() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"replq run failed: {err}\n" + "\n".join(store.read_log("900-0")))
    state = store.get_state("900-0")
    # Reset for the next round: full again.
    destroy_target(sb, DS)
    for name in sh(sb, "node1", f"zfs list -H -o name -t snapshot -r {DS}").split():
        if "__replicate_900-0_" in name:
            sh(sb, "node1", f"zfs destroy {name}")
    store.update_state("900-0", last_sync=0)
    return dt, int(state.bytes), usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.environ["REPLQ_STATE_DIR"] = tempfile.mkdtemp(prefix="replq-bench-state-")
    with tempfile.TemporaryDirectory(prefix="replq-bench-") as tmp:
        sb = Sandbox(Path(tmp) / "sb")
        pool_mb = max(4096, args.size_mb * 4)
        sb.up(nodes=2, services=False, pool_size=f"{pool_mb}M")
        try:
            store = Store.from_url(sb.redis_url)
            sh(sb, "node1", f"zfs create {DS}")
            print(f"writing {args.size_mb} MiB of random data ...", flush=True)
            sh(sb, "node1", f"head -c {args.size_mb}M /dev/urandom > /rpool/data/subvol-900-disk-0/data && sync")
            sh(sb, "node1", f"zfs snapshot {DS}@bench")
            store.add_guest(Guest(vmid=900, node="node1", disks=[Disk("local-zfs:subvol-900-disk-0")]))
            store.create_job(Job(id="900-0", target="node2"))
            ossh, rq, rss = [], [], []
            nbytes = 0
            for i in range(args.rounds):
                dt, nbytes, peak = run_replq(sb, store)
                rq.append(dt)
                rss.append(peak)
                print(f"round {i + 1}: replq {nbytes / dt / 1e6:.0f} MB/s ({dt:.2f} s), peak RSS {peak / 1e6:.0f} MB",
                      flush=True)  # fmt: skip
                dt = run_openssh(sb, "bench")
                ossh.append(dt)
                print(f"round {i + 1}: OpenSSH pipeline {nbytes / dt / 1e6:.0f} MB/s ({dt:.2f} s)", flush=True)
            best_rq, best_os = min(rq), min(ossh)
            ratio = best_os / best_rq
            print(f"stream size: {nbytes} bytes")
            print(f"replq:            {nbytes / best_rq / 1e6:7.1f} MB/s (best of {args.rounds}, whole run)")
            print(f"zfs|ssh|zfs:      {nbytes / best_os / 1e6:7.1f} MB/s (best of {args.rounds})")
            print(f"ratio replq/OpenSSH: {ratio:.2f} (goal >= 0.90) {'OK' if ratio >= 0.9 else 'BELOW GOAL'}")
            print(f"peak RSS of the sending replq process: {max(rss) / 1e6:.0f} MB (goal <= 150 MB) "
                  f"{'OK' if max(rss) <= 150e6 else 'ABOVE GOAL'}")  # fmt: skip
        finally:
            sb.down()


if __name__ == "__main__":
    main()
