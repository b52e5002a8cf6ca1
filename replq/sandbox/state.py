"""The sandbox's description on disk (<dir>/sandbox.json) and what is read from it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from replq import context, procs
from replq.errors import SandboxError

DEFAULT_DIR = Path("/var/tmp/replq-sandbox")
NODE_MOUNT = "/rpool/data"
STORAGE_ID = "local-zfs"
POOL = "rpool"
DATASET = "rpool/data"
# Paths that zfs-fuse keeps per-daemon state in; each node mounts its own over them.
ZFS_PRIVATE_TMPFS = ("/var/run/zfs", "/var/lock/zfs")
MAX_NODES = 16
SIZE_RE = re.compile(r"^[1-9][0-9]{0,5}[MG]$")


def default_dir() -> Path:
    """REPLQ_SANDBOX_DIR, then the directory of the sandbox this user started, then the default."""
    env = os.environ.get("REPLQ_SANDBOX_DIR")
    if env:
        return Path(env)
    info = context.sandbox_info()
    if info and info.get("dir"):
        return Path(info["dir"])
    return DEFAULT_DIR


class SandboxState:
    """A sandbox cluster living in one directory; all its state is in <dir>/sandbox.json."""

    def __init__(self, directory: Path | str | None = None) -> None:
        self.dir = Path(directory) if directory else default_dir()
        self.state_file = self.dir / "sandbox.json"
        self._state: dict[str, Any] = {}
        self._stamp: int | None = None

    # state ------------------------------------------------------------------------------------
    @property
    def state(self) -> dict[str, Any]:
        """The sandbox's description, re-read when another process (the CLI) changed it."""
        try:
            stamp = self.state_file.stat().st_mtime_ns
        except OSError:
            stamp = None
        if stamp != self._stamp:
            try:
                self._state = json.loads(self.state_file.read_text())
            except (OSError, ValueError):
                self._state = {}
            self._stamp = stamp
        return self._state

    @state.setter
    def state(self, value: dict[str, Any]) -> None:
        self._state = value

    def save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state, indent=2))
        tmp.replace(self.state_file)
        self._stamp = self.state_file.stat().st_mtime_ns

    @property
    def exists(self) -> bool:
        return bool(self.state)

    @property
    def redis_url(self) -> str:
        return self.state["redis"]["url"]

    @property
    def ssh_key(self) -> Path:
        return self.dir / "ssh" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "ssh" / "known_hosts"

    def node_names(self) -> list[str]:
        return list(self.state.get("nodes", {}))

    def node_info(self, name: str) -> dict[str, Any]:
        try:
            return self.state["nodes"][name]
        except KeyError:
            raise SandboxError(f"no node '{name}' in the sandbox ({', '.join(self.node_names()) or 'none'})") from None

    def _node_dir(self, name: str) -> Path:
        return self.dir / "nodes" / name

    def _all_records(self) -> list[dict[str, int]]:
        recs = [s for s in self.state.get("services", {}).values()]
        for n in self.state.get("nodes", {}).values():
            recs += [n.get("zfs"), n.get("sshd"), n.get("worker")]
        recs.append(self.state.get("redis", {}).get("proc"))
        return [r for r in recs if r]

    def running(self) -> bool:
        return any(procs.alive(r) for r in self._all_records())

    def env(self) -> dict[str, str]:
        """What a shell needs to use this sandbox: the Redis URL, the SSH key, the directory."""
        return {
            "REPLQ_REDIS_URL": self.redis_url,
            "REPLQ_SSH_KEY": str(self.ssh_key),
            "REPLQ_SANDBOX_DIR": str(self.dir),
        }
