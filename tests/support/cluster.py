"""The sandbox fixture family: one 3-node sandbox per test session, and helpers to use it.

`Nodes` sets up guests with random data, runs replq inside a node (where an operator or a
worker runs it), and inspects ZFS inside each node. `Runtime` adds a real beat and a real
`replq worker` inside each node. Every test module names its guests from its own range of
VMIDs, so modules sharing the session's sandbox never meet; `cleanup()` leaves the sandbox
as found (no jobs for a later beat, no datasets).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from replq.app import make_app, ping_worker
from replq.model import Disk, Guest, Job, JobState, parse_snapshot_name, snapshot_name, volname_vmid
from replq.sandbox import Sandbox
from replq.store import Store
from tests.support.helpers import REPO, stop_procs, wait_for

POOL, MOUNT = "rpool/data", "/rpool/data"
MiB = 1 << 20


def sandbox_available() -> bool:
    return os.geteuid() == 0 and Path("/dev/fuse").exists() and Path("/usr/sbin/zfs-fuse").exists()


def snap(job_id: str, epoch: float) -> str:
    """The name of job `job_id`'s replication snapshot of `epoch`."""
    return snapshot_name(job_id, int(epoch))


class Nodes:
    """The session sandbox plus helpers for one test module (its guests are in `vmids`)."""

    def __init__(self, sb: Sandbox, vmids: range) -> None:
        self.sb = sb
        self.store = Store.from_url(sb.redis_url)
        self.vmids = vmids  # this module's range: every dataset of these guests is ours

    # --- replq ---------------------------------------------------------------------------
    def replq(self, node: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """`replq ARGS` inside `node` (its pool, REPLQ_NODE set), from this checkout."""
        return self.sb.exec(node, [sys.executable, "-m", "replq", *args], env={"PYTHONPATH": REPO}, cwd=REPO,
                            timeout=timeout)  # fmt: skip

    def host(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`replq ARGS` on the admin host (outside every node), pointed at the sandbox."""
        env = {**os.environ, **self.sb.env(), "PYTHONPATH": REPO}
        return subprocess.run([sys.executable, "-m", "replq", *args], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip

    def popen(self, node: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return self.sb.popen(node, [sys.executable, "-m", "replq", *args], env={"PYTHONPATH": REPO, **(env or {})},
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def ok(self, node: str, *args: str) -> subprocess.CompletedProcess:
        r = self.replq(node, *args)
        assert r.returncode == 0, f"replq {' '.join(args)} on {node}: {r.stdout}{r.stderr}"
        return r

    def refused(self, node: str, *args: str) -> str:
        r = self.replq(node, *args)
        assert r.returncode == 1, f"expected a refusal: {r.stdout}{r.stderr}"
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        return r.stderr

    def run(self, job_id: str, node: str = "node1", ok: bool = True) -> subprocess.CompletedProcess:
        """`replq run --id J --local` inside `node`, as the node's worker runs it."""
        r = self.replq(node, "run", "--id", job_id, "--local")
        log = "\n".join(self.store.read_log(job_id))
        if ok:
            assert r.returncode == 0, f"{r.stderr}\n{log}"
        else:
            assert r.returncode == 1, f"expected failure:\n{r.stdout}{r.stderr}\n{log}"
        return r

    def start_worker(self, node: str, env: dict[str, str] | None = None, concurrency: int = 1,
                     log: Path | None = None) -> subprocess.Popen:
        """A real `replq worker` inside `node`, once it answers a ping."""
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
        try:
            proc = self.sb.popen(node, [sys.executable, "-m", "replq", "worker", "--node", node, "--concurrency",
                                        str(concurrency)], env={"PYTHONPATH": REPO, **(env or {})}, cwd=REPO,
                                 stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        app = make_app(self.sb.redis_url)
        try:
            wait_for(lambda: proc.poll() is not None or ping_worker(node, 1.0, app=app), 60,
                     f"the worker of {node} to answer", ignore=(Exception,))
        finally:
            app.close()
        assert proc.poll() is None, f"the worker of {node} exited with {proc.returncode}"
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen | None) -> None:
        stop_procs([proc])  # nsenter execs the worker: this PID is the worker itself

    # --- zfs -----------------------------------------------------------------------------
    def sh(self, node: str, script: str, check: bool = True) -> str:
        r = self.sb.exec(node, ["sh", "-c", script], timeout=120)
        if check:
            assert r.returncode == 0, f"{node}: {script}: {r.stderr}"
        return r.stdout

    def zfs(self, node: str, *args: str) -> str:
        # zfs-fuse keeps a dataset "busy" for a moment after its files were read: retry.
        for _ in range(30):
            r = self.sb.exec(node, ["zfs", *args], timeout=120)
            if r.returncode == 0 or "busy" not in r.stderr:
                break
            time.sleep(0.5)
        assert r.returncode == 0, f"{node}: zfs {' '.join(args)}: {r.stderr}"
        return r.stdout

    def exists(self, node: str, dataset: str) -> bool:
        return self.sb.exec(node, ["zfs", "list", "-H", "-o", "name", dataset], timeout=60).returncode == 0

    def volumes(self, node: str, vmid: int | None = None) -> list[str]:
        """This module's datasets on the node (all its guests', or one guest's), sorted."""
        out = self.sh(node, f"zfs list -H -o name -r {POOL}", check=False).split()
        mine = [ds for ds in out if re.fullmatch(rf"{POOL}/subvol-[0-9]+-disk-[0-9]+", ds)
                and volname_vmid(ds.rsplit("/", 1)[1]) in self.vmids]
        return sorted(ds for ds in mine if vmid is None or volname_vmid(ds.rsplit("/", 1)[1]) == vmid)

    def snapshots(self, node: str, dataset: str) -> list[str]:
        r = self.sb.exec(node, ["zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-r", dataset], timeout=60)
        if r.returncode != 0:
            return []
        return sorted(s.split("@", 1)[1] for s in r.stdout.split() if s.startswith(dataset + "@"))

    def job_snapshots(self, node: str, dataset: str, job_id: str) -> list[str]:
        return [s for s in self.snapshots(node, dataset) if (parse_snapshot_name(s) or ("",))[0] == job_id]

    def guids(self, node: str, dataset: str) -> dict[str, str]:
        out = self.sh(node, f"zfs get -Hp -r -o name,value guid {dataset}")
        return {n.split("@", 1)[1]: g for n, g in (line.split("\t") for line in out.splitlines()) if "@" in n}

    def checksum(self, node: str, dataset: str, mount: str = MOUNT) -> str:
        """sha256 of every file of the dataset, by path: equal on two nodes = the same data."""
        out = self.sh(node, f"cd {mount}/{dataset.rsplit('/', 1)[1]} && find . -type f | LC_ALL=C sort | "
                            "xargs -r sha256sum")  # fmt: skip
        assert out.strip(), f"no files in {dataset} on {node}"
        return out

    def write(self, node: str, dataset: str, name: str, mb: int, mount: str = MOUNT) -> None:
        self.sh(node, f"head -c {mb}M /dev/urandom > {mount}/{dataset.rsplit('/', 1)[1]}/{name} && sync")

    # --- the store -----------------------------------------------------------------------
    def guest(self, vmid: int, node: str = "node1", *, disks: list[str] | None = None, ndisks: int = 1, mb: int = 4,
              norep: int | None = None, pool: str = POOL, mount: str = MOUNT) -> list[str]:
        """Guest `vmid` on `node` whose datasets hold `mb` MiB of random data each; returns the datasets.

        `disks` as on the command line (`local-zfs:subvol-V-disk-N[,replicate=0]`), else `ndisks`
        disks of local-zfs, disk number `norep` with replicate=0."""
        assert vmid in self.vmids, f"guest {vmid} is outside this module's range {self.vmids}"
        specs = disks or [f"local-zfs:subvol-{vmid}-disk-{n}" + (",replicate=0" if n == norep else "")
                          for n in range(ndisks)]
        parsed = [Disk.parse(s) for s in specs]
        datasets = []
        for disk in parsed:
            ds = f"{pool}/{disk.volname}"
            if not self.exists(node, ds):
                self.zfs(node, "create", ds)
                self.write(node, ds, "data", mb, mount)
            datasets.append(ds)
        self.store.add_guest(Guest(vmid=vmid, node=node, type="lxc", disks=parsed))
        return datasets

    def job(self, job_id: str, target: str, rate: float | None = None, schedule: str = "*/15") -> None:
        self.store.create_job(Job(id=job_id, target=target, schedule=schedule, rate=rate))

    def state(self, job_id: str) -> JobState:
        return self.store.get_state(job_id)

    def forget(self, vmid: int) -> None:
        """Drop a guest and its jobs from the store (its datasets stay)."""
        for job_id in self.store.job_ids(vmid):
            with contextlib.suppress(Exception):
                self.store.delete_job(job_id)
        with contextlib.suppress(Exception):
            self.store.remove_guest(vmid)

    def cleanup(self) -> None:
        """Leave the shared sandbox as found: no guests or jobs of this module, none of its datasets."""
        for guest in self.store.list_guests():
            if guest.vmid in self.vmids:
                self.forget(guest.vmid)
        for node in self.sb.node_names():
            if self.sb.node_state(node) != "up":
                continue
            for ds in self.volumes(node):
                self.sb.exec(node, ["zfs", "destroy", "-r", ds], timeout=120)


class Runtime(Nodes):
    """The sandbox with a real beat and one real worker per node, started by the test module."""

    def __init__(self, sb: Sandbox, vmids: range, logdir: Path, knobs: dict[str, str]) -> None:
        super().__init__(sb, vmids)
        self.logdir = logdir
        self.knobs = knobs  # tunables (lock TTLs, sweep interval) for beat and workers
        self.beat: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}

    def start_beat(self) -> None:
        env = {**os.environ, **self.sb.env(), "PYTHONPATH": REPO, **self.knobs}
        with open(self.logdir / "beat.log", "ab") as fh:
            self.beat = subprocess.Popen([sys.executable, "-m", "replq", "beat"], env=env, cwd=REPO, stdout=fh,
                                         stderr=fh, stdin=subprocess.DEVNULL, start_new_session=True)

    def start_worker(self, node: str, env: dict[str, str] | None = None, concurrency: int = 2,
                     log: Path | None = None) -> subprocess.Popen:
        p = super().start_worker(node, {**self.knobs, **(env or {})}, concurrency,
                                 log or self.logdir / f"worker-{node}.log")
        self.workers[node] = p
        return p

    def stop_all(self) -> None:
        stop_procs([self.beat, *self.workers.values()])

    def log(self, name: str) -> str:
        return (self.logdir / name).read_text(errors="replace")

    def synced_after(self, job_id: str, t: float) -> bool:
        st = self.state(job_id)
        return st.last_sync > t and st.fail_count == 0 and not st.worker
