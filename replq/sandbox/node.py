"""A sandbox node: a mount namespace with its own zfs-fuse daemon, pool and sshd (ARCHITECTURE.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from replq import procs
from replq.errors import SandboxError
from replq.sandbox.procs import check, namespace_members, port_open, q, run, wait
from replq.sandbox.state import DATASET, NODE_MOUNT, POOL, ZFS_PRIVATE_TMPFS, SandboxState


class NodeOps(SandboxState):
    """Making, starting, stopping and entering the nodes of a sandbox."""

    # files -------------------------------------------------------------------------------------
    def _make_client_key(self) -> None:
        if not self.ssh_key.exists():
            check(run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "replq-sandbox",
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
            check(run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}-host",
                         "-f", str(hostkey)]), "ssh-keygen")
        info = self.state["nodes"][name]
        info["host_key"] = " ".join(hostkey.with_suffix(".pub").read_text().split()[:2])
        info["pool_file"] = str(nd / "pool.img")
        check(run(["truncate", "-s", pool_size, str(nd / "pool.img")]), "truncate")
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

    # nodes -------------------------------------------------------------------------------------
    def _ns(self, name: str) -> int:
        info = self.node_info(name)
        if not procs.alive(info.get("zfs")):
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
        up = [procs.alive(info.get("zfs")), procs.alive(info.get("sshd"))]
        return "up" if all(up) else "down" if not any(up) else "degraded"

    def start_node(self, name: str, create_pool: bool = False) -> None:
        """Bring a node up: its ZFS daemon (pool imported from its own cache), mounts, sshd."""
        info = self.node_info(name)
        if self.node_state(name) == "up":
            return
        if procs.alive(info.get("zfs")) or procs.alive(info.get("sshd")):
            self.stop_node(name)
        nd = self._node_dir(name)
        Path("/rpool").mkdir(exist_ok=True)  # mount point for the node-private tmpfs
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        for p in (*ZFS_PRIVATE_TMPFS, "/var/lib/zfs", "/etc/zfs"):
            Path(p).mkdir(parents=True, exist_ok=True)
        setup = " && ".join([
            *(f"mount -t tmpfs tmpfs {p}" for p in ZFS_PRIVATE_TMPFS),
            f"mount --bind {q(nd / 'lib')} /var/lib/zfs",
            f"mount --bind {q(nd / 'etc')} /etc/zfs",
            "mount -t tmpfs tmpfs /rpool",
            f"exec zfs-fuse --no-daemon --no-kstat-mount -p {q(nd / 'zfs-fuse.pid')}",
        ])
        log = open(nd / "zfs-fuse.log", "ab")
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "--", "sh", "-c", setup],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        time.sleep(0.05)
        info["zfs"] = procs.record(proc)
        self.save()
        wait(lambda: self._zfs_answers(name, nd), 30, f"zfs-fuse of {name} did not answer")
        pools = self.exec(name, ["zpool", "list", "-H", "-o", "name"], timeout=30).stdout.split()
        if POOL not in pools:
            if not create_pool:
                raise SandboxError(f"pool {POOL} of {name} was not imported; its data is in {info['pool_file']}")
            check(self.exec(name, ["zpool", "create", "-m", "none", POOL, info["pool_file"]], timeout=60),
                   f"zpool create on {name}")
            check(self.exec(name, ["zfs", "create", "-o", f"mountpoint={NODE_MOUNT}", DATASET], timeout=60),
                   f"zfs create {DATASET} on {name}")
        # A restarted daemon imports its pool but mounts nothing.
        check(self.exec(name, ["zfs", "mount", "-a"], timeout=60), f"zfs mount -a on {name}")
        slog = open(nd / "sshd.log", "ab")
        sshd = self.popen(name, ["/usr/sbin/sshd", "-D", "-e", "-f", str(nd / "ssh" / "sshd_config")],
                          stdin=subprocess.DEVNULL, stdout=slog, stderr=slog, start_new_session=True)
        slog.close()
        # The recorded pid is sshd's own: nsenter execs it (no fork for a mount namespace).
        info["sshd"] = procs.record(sshd)
        self.save()
        wait(lambda: port_open(info["host"], info["port"]), 15, f"sshd of {name} did not listen")

    def _zfs_answers(self, name: str, nd: Path) -> bool:
        if not procs.alive(self.node_info(name)["zfs"]):
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
            if procs.alive(zfs):
                inside += [procs.record(p) for p in namespace_members(zfs["pid"])]
            inside += [info.get("worker"), info.get("sshd")]
        procs.stop(inside, timeout=10)
        procs.stop([info.get("zfs") for info in infos], timeout=30)
        for info in infos:
            info.pop("worker", None)
        if self.state_file.exists():
            self.save()

