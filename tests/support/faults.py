"""Fault injection on the sandbox cluster for the failure-safety tests (issue 11).

`Faults` is the `Nodes` fixture family plus what it takes to stage a failure: making a replica
writable as a guest started on it would, reading a dataset's properties, finding a node's `zfs
send`/`zfs recv` processes to freeze them, and waiting for a running job's progress. `RedisLink`
is a TCP relay between one engine and Redis that the test can cut (a network partition for
that engine alone). `stopped` freezes processes (SIGSTOP) and always thaws them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from replq.model import parse_snapshot_name
from tests.support.cluster import POOL, Nodes
from tests.support.helpers import wait_for


class Faults(Nodes):
    """The session sandbox for one failure-safety module, with fault injection inside nodes."""

    def replicated(self, vmid: int, mb: int = 1, targets: tuple[str, ...] = ("node2",), ndisks: int = 1) -> str:
        """Guest `vmid` on node1 with `mb` MiB of data, replicated once by jobs VMID-0, VMID-1, …
        to the targets in turn. Returns the (first) dataset."""
        ds = self.guest(vmid, "node1", ndisks=ndisks, mb=mb)[0]
        for n, target in enumerate(targets):
            self.job(f"{vmid}-{n}", target)
        for n in range(len(targets)):
            self.run(f"{vmid}-{n}")
        return ds

    def log(self, job_id: str) -> str:
        return "\n".join(self.store.read_log(job_id))

    def live(self, node: str, dataset: str) -> None:
        """A guest started on `node` uses the volume: it must be writable (replicas are read-only)."""
        self.zfs(node, "set", "readonly=off", dataset)

    def props(self, node: str, dataset: str) -> dict[str, str]:
        out = self.sh(node, f"zfs get -H -o property,value all {dataset}")
        return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)

    def replication_snapshots(self, node: str, dataset: str) -> list[str]:
        return [s for s in self.snapshots(node, dataset) if parse_snapshot_name(s)]

    def pids(self, node: str, verb: str, dataset: str) -> list[int]:
        """`zfs VERB … dataset…` processes inside `node` (its mount namespace), by walking /proc."""
        ns = os.readlink(f"/proc/{self.sb.node_info(node)['zfs']['pid']}/ns/mnt")
        name = dataset.encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") != ns:
                    continue
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # zfs-fuse rewrites its argv in place: "ds@snap" shows as "ds\0snap".
            if (len(argv) > 1 and argv[0].rsplit(b"/", 1)[-1] == b"zfs" and argv[1] == verb.encode()
                    and any(a == name or a.startswith(name + b"@") for a in argv)):  # fmt: skip
                found.append(int(entry))
        return found

    def wait_progress(self, job_id: str, min_bytes: int, timeout: float = 60) -> None:
        wait_for(lambda: (self.state(job_id).progress or {}).get("bytes", 0) >= min_bytes, timeout,
                 f"{min_bytes} bytes sent by {job_id}; log:\n{self.log(job_id)}")  # fmt: skip

    def lock_held(self, vmid: int) -> bool:
        return bool(self.store.redis.exists(self.store.k("lock", "guest", vmid)))

    def kept_state(self, node: str, dataset: str, log: str) -> str | None:
        """Checksum of the diverged state replq kept when told to discard it: a snapshot of the
        dataset or a renamed dataset, either named in the job's log; None if there is none."""
        vol = dataset.rsplit("/", 1)[1]
        for snap in self.snapshots(node, dataset):
            if parse_snapshot_name(snap) is None and snap in log:
                clone = f"{POOL}/{vol}-kept-check"
                self.zfs(node, "clone", f"{dataset}@{snap}", clone)
                try:
                    return self.checksum(node, clone)
                finally:
                    self.zfs(node, "destroy", clone)
        for ds in self.sh(node, f"zfs list -H -o name -r {POOL}").split():
            if ds != dataset and ds.startswith(f"{POOL}/") and vol in ds and ds in log:
                return self.checksum(node, ds)
        return None

    def cleanup(self) -> None:
        super().cleanup()
        # Diverged states kept by --discard-target-changes carry the volume's name: ours go too.
        for node in self.sb.node_names():
            if self.sb.node_state(node) != "up":
                continue
            for ds in self.sh(node, f"zfs list -H -o name -r {POOL}", check=False).split():
                if "diverged" in ds and any(f"-{v}-disk-" in ds for v in self.vmids):
                    self.sb.exec(node, ["zfs", "destroy", "-r", ds], timeout=120)


@contextlib.contextmanager
def stopped(pids: list[int]) -> Iterator[list[int]]:
    """SIGSTOP the processes (a hung zfs, a frozen worker) and always SIGCONT them afterwards."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def finished(proc: subprocess.Popen, timeout: float) -> tuple[bool, str]:
    """(whether proc ended within timeout, its output); a process still running is left running."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, ""
    return True, out + err


_SYSCALLS = {"0": "read", "7": "poll", "19": "readv", "23": "select", "61": "wait4", "202": "futex",
             "232": "epoll_wait", "270": "pselect6", "271": "ppoll"}  # fmt: skip


def blocked_in(pid: int) -> str:
    """The system call the process's main thread waits in (x86_64), to say where a run hangs."""
    try:
        nr = Path(f"/proc/{pid}/syscall").read_text().split()[0]
    except (OSError, IndexError):
        return "?"
    return _SYSCALLS.get(nr, f"syscall {nr}")


class RedisLink:
    """A TCP relay between one engine and Redis that the test can cut: a network partition."""

    def __init__(self, redis_url: str) -> None:
        u = urlparse(redis_url)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 6379)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.server.getsockname()[1]}{u.path or '/0'}"
        self.socks: list[socket.socket] = []
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                return
            up = socket.create_connection(self.upstream)
            self.socks += [client, up]
            for a, b in ((client, up), (up, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and break the open ones."""
        self.open = False
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept() that close() alone would not
        self.server.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
