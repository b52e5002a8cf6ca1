"""The sandbox: a real multi-node ZFS cluster on one machine (SPEC §8, ARCHITECTURE.md).

A node is a private mount namespace holding its own zfs-fuse daemon (pool `rpool` on a sparse
file, `rpool/data` mounted at /rpool/data) and its own sshd on its own loopback address. The
four paths zfs-fuse keeps state in are private per node: two daemons sharing /var/lib/zfs would
import each other's pools from zpool.cache and corrupt them.

Every process the sandbox starts is recorded in <dir>/sandbox.json as (pid, start time), so it
is stopped by PID, a recycled PID is never mistaken for ours, and `up` after an unclean stop can
tell a stale sandbox from a running one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from replq import context
from replq.errors import ReplqError

DEFAULT_DIR = Path("/var/tmp/replq-sandbox")
NODE_MOUNT = "/rpool/data"
STORAGE_ID = "local-zfs"
POOL = "rpool"
DATASET = "rpool/data"
# Paths that zfs-fuse keeps per-daemon state in; each node mounts its own over them.
ZFS_PRIVATE_TMPFS = ("/var/run/zfs", "/var/lock/zfs")
MAX_NODES = 16
_SIZE_RE = re.compile(r"^[1-9][0-9]{0,5}[MG]$")


class SandboxError(ReplqError):
    """The sandbox cannot do what was asked; the message says why."""


def default_dir() -> Path:
    """REPLQ_SANDBOX_DIR, then the directory of the sandbox this user started, then the default."""
    env = os.environ.get("REPLQ_SANDBOX_DIR")
    if env:
        return Path(env)
    info = context.sandbox_info()
    if info and info.get("dir"):
        return Path(info["dir"])
    return DEFAULT_DIR


# --- processes ------------------------------------------------------------------------------

def _starttime(pid: int) -> int | None:
    """The kernel's start time of a process (field 22 of /proc/PID/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie has finished; only its parent's wait is missing
        return None
    return int(fields[19])


def record_process(proc: subprocess.Popen | int) -> dict[str, int]:
    pid = proc if isinstance(proc, int) else proc.pid
    return {"pid": pid, "start": _starttime(pid) or 0}


def process_alive(rec: dict[str, int] | None) -> bool:
    return bool(rec) and _starttime(rec["pid"]) == rec["start"]


def _signal(rec: dict[str, int] | None, sig: int) -> None:
    if process_alive(rec):
        try:
            os.kill(rec["pid"], sig)
        except ProcessLookupError:
            pass


def _reap(recs: Iterable[dict[str, int]]) -> None:
    """Collect our own exited children so they do not linger as zombies; only the sandbox's
    PIDs, never waitpid(-1), which would steal other children's exit codes from the caller."""
    for r in recs:
        try:
            os.waitpid(r["pid"], os.WNOHANG)
        except ChildProcessError:
            pass


def stop_processes(recs: Iterable[dict[str, int] | None], timeout: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL whatever is still there."""
    recs = [r for r in recs if process_alive(r)]
    for r in recs:
        _signal(r, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(process_alive(r) for r in recs):
        _reap(recs)
        time.sleep(0.1)
    for r in recs:
        _signal(r, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(process_alive(r) for r in recs):
        _reap(recs)
        time.sleep(0.05)


def _mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _namespace_members(ns_pid: int) -> list[int]:
    """Every process inside the mount namespace of ns_pid (sshd sessions, zfs recv, workers)."""
    ns = _mnt_ns(ns_pid)
    if ns is None or ns == _mnt_ns(os.getpid()):
        return []
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != ns_pid and _mnt_ns(int(entry)) == ns:
            members.append(int(entry))
    return members


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    return subprocess.run(argv, **kw)


def _check(r: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if r.returncode != 0:
        detail = (r.stderr or r.stdout or "").strip().splitlines()
        raise SandboxError(f"{what} failed: {detail[-1] if detail else f'exit {r.returncode}'}")
    return r


def _require_tools() -> None:
    missing = [t for t in ("zfs-fuse", "zpool", "zfs", "sshd", "ssh-keygen", "unshare", "nsenter", "redis-server")
               if shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        raise SandboxError(f"missing programs: {', '.join(missing)} (run scripts/setup.sh)")
    if os.geteuid() != 0:
        raise SandboxError("the sandbox needs root (mount namespaces, FUSE, sshd)")


# --- the sandbox ----------------------------------------------------------------------------

class Sandbox:
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
        return any(process_alive(r) for r in self._all_records())

    def env(self) -> dict[str, str]:
        """What a shell needs to use this sandbox: the Redis URL, the SSH key, the directory."""
        return {
            "REPLQ_REDIS_URL": self.redis_url,
            "REPLQ_SSH_KEY": str(self.ssh_key),
            "REPLQ_SANDBOX_DIR": str(self.dir),
        }

    # up / down -------------------------------------------------------------------------------
    def up(self, nodes: int = 3, services: bool = True, pool_size: str = "1G") -> None:
        if not 1 <= nodes <= MAX_NODES:
            raise SandboxError(f"--nodes must be between 1 and {MAX_NODES}")
        if not _SIZE_RE.match(pool_size):
            raise SandboxError(f"invalid pool size '{pool_size}' (e.g. 512M or 2G)")
        _require_tools()
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
                port = 22 if _port_free(host, 22) else _free_port(host)
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
        stop_processes([self.state.get("redis", {}).get("proc")])
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
            listening = _run(["ss", "-Hltn"], timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return f" {prefix}." in listening

    # files -------------------------------------------------------------------------------------
    def _make_client_key(self) -> None:
        if not self.ssh_key.exists():
            _check(_run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "replq-sandbox",
                         "-f", str(self.ssh_key)]), "ssh-keygen")
        (self.dir / "ssh" / "authorized_keys").write_text(self.ssh_key.with_suffix(".pub").read_text())

    def _make_node_files(self, name: str, pool_size: str) -> None:
        nd = self._node_dir(name)
        for sub in ("lib", "etc", "ssh"):
            (nd / sub).mkdir(parents=True, exist_ok=True)
        zfsrc = Path("/etc/zfs/zfsrc")
        (nd / "etc" / "zfsrc").write_text(zfsrc.read_text() if zfsrc.exists() else "")
        hostkey = nd / "ssh" / "ssh_host_ed25519_key"
        if not hostkey.exists():
            _check(_run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}-host",
                         "-f", str(hostkey)]), "ssh-keygen")
        info = self.state["nodes"][name]
        info["host_key"] = " ".join(hostkey.with_suffix(".pub").read_text().split()[:2])
        info["pool_file"] = str(nd / "pool.img")
        _check(_run(["truncate", "-s", pool_size, str(nd / "pool.img")]), "truncate")
        (nd / "ssh" / "sshd_config").write_text(
            f"ListenAddress {info['host']}:{info['port']}\n"
            f"HostKey {hostkey}\n"
            f"PidFile {nd / 'ssh' / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.dir / 'ssh' / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\nUseDNS no\nMaxStartups 64\nMaxSessions 64\n"
            "ClientAliveInterval 15\nClientAliveCountMax 4\n"
            f"SetEnv REPLQ_NODE={name}\n"
        )
        self.save()

    def _write_known_hosts(self) -> None:
        lines = []
        for info in self.state["nodes"].values():
            host = info["host"] if info["port"] == 22 else f"[{info['host']}]:{info['port']}"
            lines.append(f"{host} {info['host_key']}\n")
        self.known_hosts.write_text("".join(lines))

    def _write_pointer(self) -> None:
        pointer = context.sandbox_pointer()
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.write_text(json.dumps({"dir": str(self.dir), "redis_url": self.redis_url,
                                       "ssh_key": str(self.ssh_key)}))

    # redis -------------------------------------------------------------------------------------
    def _start_redis(self) -> None:
        rdir = self.dir / "redis"
        rdir.mkdir(exist_ok=True)
        port = self.state.get("redis", {}).get("port") or _free_port("127.0.0.1")
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(rdir),
             "--appendonly", "yes", "--save", "", "--daemonize", "no", "--logfile", str(rdir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.state["redis"] = {"port": port, "url": f"redis://127.0.0.1:{port}/0", "proc": record_process(proc)}
        self.save()
        self._wait(lambda: _ping_redis(port), 15, "redis-server did not start")

    # nodes -------------------------------------------------------------------------------------
    def _ns(self, name: str) -> int:
        info = self.node_info(name)
        if not process_alive(info.get("zfs")):
            raise SandboxError(f"node '{name}' is down (replq sandbox start {name})")
        return info["zfs"]["pid"]

    def _node_env(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env())
        env["REPLQ_NODE"] = name
        # `replq` inside a node is this installation's, whatever the caller's PATH says.
        bindir = os.path.dirname(sys.executable)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        if extra:
            env.update(extra)
        return env

    def _ns_argv(self, name: str, argv: list[str]) -> list[str]:
        # Keep the caller's working directory (nsenter would start in /), as `ssh node cmd` does not
        # but an operator typing `sandbox exec node1 -- .venv/bin/replq …` expects.
        return ["nsenter", f"--mount=/proc/{self._ns(name)}/ns/mnt", f"--wd={os.getcwd()}", "--", *argv]

    def exec(self, name: str, argv: list[str], env: dict[str, str] | None = None,
             **kw: Any) -> subprocess.CompletedProcess:
        """Run argv inside node `name` (its pool, its mounts) with REPLQ_NODE set."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self._ns_argv(name, argv), env=self._node_env(name, env), **kw)

    def popen(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(self._ns_argv(name, argv), env=self._node_env(name, env), **kw)

    def node_state(self, name: str) -> str:
        info = self.node_info(name)
        up = [process_alive(info.get("zfs")), process_alive(info.get("sshd"))]
        return "up" if all(up) else "down" if not any(up) else "degraded"

    def start_node(self, name: str, create_pool: bool = False) -> None:
        """Bring a node up: its ZFS daemon (pool imported from its own cache), mounts, sshd."""
        info = self.node_info(name)
        if self.node_state(name) == "up":
            return
        if process_alive(info.get("zfs")) or process_alive(info.get("sshd")):
            self.stop_node(name)
        nd = self._node_dir(name)
        Path("/rpool").mkdir(exist_ok=True)  # mount point for the node-private tmpfs
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        for p in (*ZFS_PRIVATE_TMPFS, "/var/lib/zfs", "/etc/zfs"):
            Path(p).mkdir(parents=True, exist_ok=True)
        setup = " && ".join([
            *(f"mount -t tmpfs tmpfs {p}" for p in ZFS_PRIVATE_TMPFS),
            f"mount --bind {_q(nd / 'lib')} /var/lib/zfs",
            f"mount --bind {_q(nd / 'etc')} /etc/zfs",
            "mount -t tmpfs tmpfs /rpool",
            f"exec zfs-fuse --no-daemon --no-kstat-mount -p {_q(nd / 'zfs-fuse.pid')}",
        ])
        log = open(nd / "zfs-fuse.log", "ab")
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "--", "sh", "-c", setup],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        time.sleep(0.05)
        info["zfs"] = record_process(proc)
        self.save()
        self._wait(lambda: self._zfs_answers(name, nd), 30, f"zfs-fuse of {name} did not answer")
        pools = self.exec(name, ["zpool", "list", "-H", "-o", "name"], timeout=30).stdout.split()
        if POOL not in pools:
            if not create_pool:
                raise SandboxError(f"pool {POOL} of {name} was not imported; its data is in {info['pool_file']}")
            _check(self.exec(name, ["zpool", "create", "-m", "none", POOL, info["pool_file"]], timeout=60),
                   f"zpool create on {name}")
            _check(self.exec(name, ["zfs", "create", "-o", f"mountpoint={NODE_MOUNT}", DATASET], timeout=60),
                   f"zfs create {DATASET} on {name}")
        # A restarted daemon imports its pool but mounts nothing.
        _check(self.exec(name, ["zfs", "mount", "-a"], timeout=60), f"zfs mount -a on {name}")
        slog = open(nd / "sshd.log", "ab")
        sshd = self.popen(name, ["/usr/sbin/sshd", "-D", "-e", "-f", str(nd / "ssh" / "sshd_config")],
                          stdin=subprocess.DEVNULL, stdout=slog, stderr=slog, start_new_session=True)
        slog.close()
        # The recorded pid is sshd's own: nsenter execs it (no fork for a mount namespace).
        info["sshd"] = record_process(sshd)
        self.save()
        self._wait(lambda: _port_open(info["host"], info["port"]), 15, f"sshd of {name} did not listen")

    def _zfs_answers(self, name: str, nd: Path) -> bool:
        if not process_alive(self.node_info(name)["zfs"]):
            raise SandboxError(f"zfs-fuse of {name} exited; see {nd}/zfs-fuse.log")
        return self.exec(name, ["zpool", "list", "-H"], timeout=10).returncode == 0

    def stop_node(self, name: str) -> None:
        """Take a node fully down as a crash would look from outside: every process inside it
        (worker, sshd and its sessions, zfs recv), then its ZFS daemon. The pool file stays."""
        self.node_info(name)
        self._stop_nodes([name])

    def _stop_nodes(self, names: list[str]) -> None:
        # All nodes at once: a zfs-fuse daemon takes seconds to exit after SIGTERM.
        infos = [self.node_info(n) for n in names]
        inside: list[dict[str, int] | None] = []
        for info in infos:
            zfs = info.get("zfs")
            if process_alive(zfs):
                inside += [record_process(p) for p in _namespace_members(zfs["pid"])]
            inside += [info.get("worker"), info.get("sshd")]
        stop_processes(inside, timeout=10)
        stop_processes([info.get("zfs") for info in infos], timeout=30)
        for info in infos:
            info.pop("worker", None)
        if self.state_file.exists():
            self.save()

    # services (beat, workers, Flower) come with the runtime ----------------------------------
    def start_services(self) -> None:
        """Beat, a worker per node and Flower: started here once the runtime exists."""
        starter = _services_starter()
        if starter is not None:
            starter(self)

    def stop_services(self) -> None:
        stop_processes(list(self.state.get("services", {}).values()))
        for n in self.state.get("nodes", {}).values():
            stop_processes([n.get("worker")])
        if self.state:
            self.state["services"] = {}
            if self.state_file.exists():
                self.save()

    # registration ------------------------------------------------------------------------------
    def _register(self) -> None:
        """Nodes (with pinned host keys) and the storage local-zfs, in the sandbox's store."""
        from replq.model import Node, Storage
        from replq.store import Store

        store = Store.from_url(self.redis_url)
        for info in self.state["nodes"].values():
            store.add_node(Node(name=info["name"], address=info["address"], user="root", host_key=info["host_key"]))
        store.add_storage(Storage(id=STORAGE_ID, pool=DATASET))

    # status ------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        nodes = []
        for name, info in self.state.get("nodes", {}).items():
            pids = {k: info[k]["pid"] for k in ("zfs", "sshd", "worker") if process_alive(info.get(k))}
            nodes.append({"name": name, "address": info["address"], "state": self.node_state(name), "pids": pids})
        services = {k: {"pid": r["pid"], "state": "up" if process_alive(r) else "down"}
                    for k, r in self.state.get("services", {}).items()}
        redis_rec = self.state.get("redis", {}).get("proc")
        services["redis"] = {"pid": redis_rec["pid"] if redis_rec else None,
                             "state": "up" if process_alive(redis_rec) else "down"}
        return {"dir": str(self.dir), "nodes": nodes, "services": services,
                "redis_url": self.state.get("redis", {}).get("url"), "flower": self.state.get("flower"),
                "metrics": self.state.get("metrics")}

    # helpers -----------------------------------------------------------------------------------
    @staticmethod
    def _wait(cond: Any, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.1)
        raise SandboxError(message)


def _services_starter() -> Any:
    try:
        from replq import services  # the runtime issue provides start(sandbox)
    except ImportError:
        return None
    return getattr(services, "start_sandbox_services", None)


def _q(p: Path | str) -> str:
    import shlex

    return shlex.quote(str(p))


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _ping_redis(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False
