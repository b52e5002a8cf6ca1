"""Small helpers of the sandbox: processes inside a node's namespace, ports, commands, waiting."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from replq.errors import SandboxError


def mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def namespace_members(ns_pid: int) -> list[int]:
    """Every process inside the mount namespace of ns_pid (sshd sessions, zfs recv, workers)."""
    ns = mnt_ns(ns_pid)
    if ns is None or ns == mnt_ns(os.getpid()):
        return []
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != ns_pid and mnt_ns(int(entry)) == ns:
            members.append(int(entry))
    return members


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    return subprocess.run(argv, **kw)


def check(r: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if r.returncode != 0:
        detail = (r.stderr or r.stdout or "").strip().splitlines()
        raise SandboxError(f"{what} failed: {detail[-1] if detail else f'exit {r.returncode}'}")
    return r


def require_tools() -> None:
    missing = [t for t in ("zfs-fuse", "zpool", "zfs", "sshd", "ssh-keygen", "unshare", "nsenter", "redis-server")
               if shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        raise SandboxError(f"missing programs: {', '.join(missing)} (run scripts/setup.sh)")
    if os.geteuid() != 0:
        raise SandboxError("the sandbox needs root (mount namespaces, FUSE, sshd)")


# --- the sandbox ----------------------------------------------------------------------------

def q(p: Path | str) -> str:
    return shlex.quote(str(p))


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def ping_redis(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def wait(cond: Any, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise SandboxError(message)
