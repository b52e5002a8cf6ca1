"""The sandbox: a real multi-node ZFS cluster on one machine (SPEC §8, ARCHITECTURE.md).

A node is a private mount namespace holding its own zfs-fuse daemon (pool `rpool` on a sparse
file, `rpool/data` mounted at /rpool/data) and its own sshd on its own loopback address (node.py).
The cluster adds its own redis-server, registers the nodes (pinned host keys) and the storage
`local-zfs` in the store, and starts the services (services.py).

Every process the sandbox starts is recorded in <dir>/sandbox.json as (pid, start time), so it
is stopped by PID, a recycled PID is never mistaken for ours, and `up` after an unclean stop can
tell a stale sandbox from a running one.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from replq import context, procs
from replq.errors import SandboxError
from replq.model import Node, Storage
from replq.sandbox import services
from replq.sandbox.node import NodeOps
from replq.sandbox.procs import free_port, ping_redis, port_free, require_tools, run, wait
from replq.sandbox.state import DATASET, MAX_NODES, SIZE_RE, STORAGE_ID
from replq.store import Store


class Sandbox(NodeOps):
    """A sandbox cluster: nodes, its Redis, the services; up, down and status."""

    # up / down -------------------------------------------------------------------------------
    def up(self, nodes: int = 3, services: bool = True, pool_size: str = "1G") -> None:
        if not 1 <= nodes <= MAX_NODES:
            raise SandboxError(f"--nodes must be between 1 and {MAX_NODES}")
        if not SIZE_RE.match(pool_size):
            raise SandboxError(f"invalid pool size '{pool_size}' (e.g. 512M or 2G)")
        require_tools()
        if self.exists and self.running():
            raise SandboxError(f"a sandbox is already running in {self.dir} (run 'replq sandbox down' first)")
        if self.exists or self.dir.exists():
            self._cleanup_stale()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "ssh").mkdir(exist_ok=True)
        self.state = {"dir": str(self.dir), "nodes": {}, "services": {}, "pool_size": pool_size,
                      "created": time.time()}
        self.save()
        try:
            self._make_client_key()
            self._start_redis()
            prefix = self._pick_address_prefix(nodes)
            for i in range(1, nodes + 1):
                name = f"node{i}"
                host = f"{prefix}.{i}"
                port = 22 if port_free(host, 22) else free_port(host)
                self.state["nodes"][name] = {"name": name, "host": host, "port": port,
                                             "address": host if port == 22 else f"{host}:{port}"}
                self.save()
                self._make_node_files(name, pool_size)
                self.start_node(name, create_pool=True)
            self._write_known_hosts()
            self._register()
            if services:
                self.start_services()
        except BaseException:
            self.down()
            raise
        self._write_pointer()

    def down(self) -> None:
        """Stop everything this sandbox started, by PID, and remove its files. Repeatable."""
        self.stop_services()
        self._stop_nodes(self.node_names())
        procs.stop([self.state.get("redis", {}).get("proc")])
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        info = context.sandbox_info()
        if info and Path(info.get("dir", "")) == self.dir:
            context.sandbox_pointer().unlink(missing_ok=True)
        self.state = {}

    def _cleanup_stale(self) -> None:
        """A sandbox whose processes are all gone (machine restart, kill -9): clear it away."""
        if self.dir.exists() and not self.state_file.exists() and any(self.dir.iterdir()):
            raise SandboxError(f"{self.dir} exists and is not a sandbox; choose another --dir")
        self.down()

    def _pick_address_prefix(self, nodes: int) -> str:
        """A 127.X.Y block no other sandbox on this machine uses (tests run several at once)."""
        rng = secrets.SystemRandom()
        for _ in range(200):
            prefix = f"127.{rng.randint(100, 250)}.{rng.randint(0, 250)}"
            if not self._prefix_in_use(prefix):
                return prefix
        raise SandboxError("no free loopback address block for the sandbox nodes")

    @staticmethod
    def _prefix_in_use(prefix: str) -> bool:
        try:
            listening = run(["ss", "-Hltn"], timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return f" {prefix}." in listening

    def _write_pointer(self) -> None:
        pointer = context.sandbox_pointer()
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.write_text(json.dumps({"dir": str(self.dir), "redis_url": self.redis_url,
                                       "ssh_key": str(self.ssh_key)}))

    # redis -------------------------------------------------------------------------------------
    def _start_redis(self) -> None:
        rdir = self.dir / "redis"
        rdir.mkdir(exist_ok=True)
        port = self.state.get("redis", {}).get("port") or free_port("127.0.0.1")
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(rdir),
             "--appendonly", "yes", "--save", "", "--daemonize", "no", "--logfile", str(rdir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.state["redis"] = {"port": port, "url": f"redis://127.0.0.1:{port}/0", "proc": procs.record(proc)}
        self.save()
        wait(lambda: ping_redis(port), 15, "redis-server did not start")

    # services ----------------------------------------------------------------------------------
    def start_services(self) -> None:
        """Beat, a worker per node, Flower, the web GUI and the metrics exporter: whatever is not running."""
        services.start_sandbox_services(self)

    def stop_services(self) -> None:
        procs.stop(list(self.state.get("services", {}).values()))
        for n in self.state.get("nodes", {}).values():
            procs.stop([n.get("worker")])
        if self.state:
            self.state["services"] = {}
            if self.state_file.exists():
                self.save()

    # registration ------------------------------------------------------------------------------
    def _register(self) -> None:
        """Nodes (with pinned host keys) and the storage local-zfs, in the sandbox's store."""
        store = Store.from_url(self.redis_url)
        for info in self.state["nodes"].values():
            store.add_node(Node(name=info["name"], address=info["address"], user="root", host_key=info["host_key"]))
        store.add_storage(Storage(id=STORAGE_ID, pool=DATASET))

    # status ------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        nodes = []
        for name, info in self.state.get("nodes", {}).items():
            pids = {k: info[k]["pid"] for k in ("zfs", "sshd", "worker") if procs.alive(info.get(k))}
            nodes.append({"name": name, "address": info["address"], "state": self.node_state(name), "pids": pids})
        services = {k: {"pid": r["pid"], "state": "up" if procs.alive(r) else "down"}
                    for k, r in self.state.get("services", {}).items()}
        redis_rec = self.state.get("redis", {}).get("proc")
        services["redis"] = {"pid": redis_rec["pid"] if redis_rec else None,
                             "state": "up" if procs.alive(redis_rec) else "down"}
        return {"dir": str(self.dir), "nodes": nodes, "services": services,
                "redis_url": self.state.get("redis", {}).get("url"), "flower": self.state.get("flower"),
                "web": self.state.get("web"), "metrics": self.state.get("metrics")}

