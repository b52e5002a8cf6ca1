"""The sandbox cluster: isolated nodes, SSH between them, stop/start with data, clean down."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from replq.sandbox import Sandbox

REPO = Path(__file__).resolve().parents[2]


def replq(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replq", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def zfs_names(sb: Sandbox, node: str) -> list[str]:
    r = sb.exec(node, ["zfs", "list", "-H", "-o", "name"], timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def pool_guid(sb: Sandbox, node: str) -> str:
    r = sb.exec(node, ["zpool", "list", "-H", "-o", "name,guid"], timeout=60)
    assert r.returncode == 0, r.stderr
    pools = dict(line.split("\t") for line in r.stdout.splitlines())
    assert list(pools) == ["rpool"], pools  # only its own pool is imported here
    return pools["rpool"]


def connect_refused(address: str) -> bool:
    host, _, port = address.partition(":")
    try:
        socket.create_connection((host, int(port or 22)), timeout=3).close()
    except ConnectionRefusedError:
        return True
    return False


def test_each_node_sees_only_its_own_pool(sandbox: Sandbox) -> None:
    guids = {n: pool_guid(sandbox, n) for n in sandbox.node_names()}
    assert len(set(guids.values())) == 3, guids  # three different pools, all named rpool
    for node in sandbox.node_names():
        assert zfs_names(sandbox, node)[:2] == ["rpool", "rpool/data"]
        r = sandbox.exec(node, ["zfs", "get", "-H", "-o", "value", "mountpoint,mounted", "rpool/data"], timeout=30)
        assert r.stdout.split() == ["/rpool/data", "yes"]

    assert sandbox.exec("node1", ["zfs", "create", "rpool/data/subvol-9101-disk-0"], timeout=60).returncode == 0
    try:
        assert "rpool/data/subvol-9101-disk-0" in zfs_names(sandbox, "node1")
        assert "rpool/data/subvol-9101-disk-0" not in zfs_names(sandbox, "node2")
        assert "rpool/data/subvol-9101-disk-0" not in zfs_names(sandbox, "node3")
        # The mount is private to node1: not visible on the host or on node2.
        assert not Path("/rpool/data/subvol-9101-disk-0").exists()
        r = sandbox.exec("node2", ["test", "-d", "/rpool/data/subvol-9101-disk-0"], timeout=30)
        assert r.returncode != 0
    finally:
        sandbox.exec("node1", ["zfs", "destroy", "rpool/data/subvol-9101-disk-0"], timeout=60)


def test_ssh_from_node1_reaches_node2_pool_with_strict_host_keys(sandbox: Sandbox) -> None:
    assert sandbox.exec("node2", ["zfs", "create", "rpool/data/subvol-9102-disk-0"], timeout=60).returncode == 0
    try:
        n2 = sandbox.node_info("node2")
        ssh = ["ssh", "-i", str(sandbox.ssh_key), "-o", f"UserKnownHostsFile={sandbox.known_hosts}",
               "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-p", str(n2["port"]),
               f"root@{n2['host']}"]
        r = sandbox.exec("node1", [*ssh, "zfs list -H -o name; echo node=$REPLQ_NODE"], timeout=60)
        assert r.returncode == 0, r.stderr
        assert "rpool/data/subvol-9102-disk-0" in r.stdout.split()
        assert "node=node2" in r.stdout

        # With a known_hosts that holds another node's key for this address, ssh refuses.
        wrong = sandbox.dir / "wrong_known_hosts"
        wrong.write_text(f"{n2['host']} {sandbox.node_info('node3')['host_key']}\n")
        ssh_wrong = [a if not a.startswith("UserKnownHostsFile=") else f"UserKnownHostsFile={wrong}" for a in ssh]
        r = sandbox.exec("node1", [*ssh_wrong, "true"], timeout=60)
        assert r.returncode != 0
        assert "HOST IDENTIFICATION HAS CHANGED" in r.stderr or "verification failed" in r.stderr
    finally:
        sandbox.exec("node2", ["zfs", "destroy", "rpool/data/subvol-9102-disk-0"], timeout=60)


def test_nodes_and_storage_are_registered_with_pinned_host_keys(sandbox: Sandbox) -> None:
    r = replq("--redis", sandbox.redis_url, "node", "list", "--output-format", "json")
    assert r.returncode == 0, r.stderr
    nodes = {n["name"]: n for n in json.loads(r.stdout)}
    assert sorted(nodes) == ["node1", "node2", "node3"]
    for name, node in nodes.items():
        info = sandbox.node_info(name)
        scan = subprocess.run(["ssh-keyscan", "-t", "ed25519", "-p", str(info["port"]), info["host"]],
                              capture_output=True, text=True, timeout=30)
        served = " ".join(scan.stdout.split()[1:3])
        assert served.startswith("ssh-ed25519 ")
        assert node["host_key"] == served  # the key sshd really serves is the pinned one
        assert node["address"] == info["address"]
    r = replq("--redis", sandbox.redis_url, "storage", "list", "--output-format", "json")
    storages = json.loads(r.stdout)
    assert [(s["id"], s["pool"]) for s in storages] == [("local-zfs", "rpool/data")]


def test_exec_sets_node_and_env_prints_exports(sandbox: Sandbox) -> None:
    r = replq("sandbox", "exec", "--dir", str(sandbox.dir), "node3", "--", "sh", "-c", "echo $REPLQ_NODE; exit 7")
    assert r.returncode == 7
    assert r.stdout.strip() == "node3"
    r = replq("sandbox", "env", "--dir", str(sandbox.dir))
    assert r.returncode == 0
    assert f"export REPLQ_REDIS_URL={sandbox.redis_url}" in r.stdout.splitlines()
    # The caller's working directory and this installation's `replq` (README: exec … -- replq migrate).
    r = subprocess.run([sys.executable, "-m", "replq", "sandbox", "exec", "--dir", str(sandbox.dir), "node1", "--",
                        "sh", "-c", "pwd; command -v replq"], capture_output=True, text=True, timeout=60,
                       cwd=sandbox.dir / "ssh", env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(sandbox.dir / "ssh"), str(Path(sys.executable).parent / "replq")]
    r = replq("sandbox", "exec", "--dir", str(sandbox.dir), "node9", "--", "true")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "no node 'node9'" in r.stderr


def test_stop_takes_node_down_and_start_brings_its_data_back(sandbox: Sandbox) -> None:
    ds = "rpool/data/subvol-9103-disk-0"
    r = sandbox.exec("node2", ["sh", "-c", f"zfs create {ds} && head -c 3000000 /dev/urandom > /{ds}/blob "
                                           f"&& zfs snapshot {ds}@s1 && sha256sum /{ds}/blob"], timeout=120)
    assert r.returncode == 0, r.stderr
    checksum = r.stdout.split()[0]
    guid = pool_guid(sandbox, "node2")
    address = sandbox.node_info("node2")["address"]

    r = replq("sandbox", "stop", "--dir", str(sandbox.dir), "node2")
    assert r.returncode == 0, r.stderr
    try:
        assert sandbox.node_state("node2") == "down"
        assert connect_refused(address)
        # No live ZFS daemon has node2's pool imported.
        for node in ("node1", "node3"):
            assert pool_guid(sandbox, node) != guid
        zfs_pids = [p["pids"].get("zfs") for p in sandbox.status()["nodes"] if p["name"] == "node2"]
        assert zfs_pids == [None]
        with pytest.raises(Exception, match="node 'node2' is down"):
            sandbox.exec("node2", ["true"])
    finally:
        r = replq("sandbox", "start", "--dir", str(sandbox.dir), "node2")
    assert r.returncode == 0, r.stderr
    assert sandbox.node_state("node2") == "up"
    assert pool_guid(sandbox, "node2") == guid
    r = sandbox.exec("node2", ["sha256sum", f"/{ds}/blob"], timeout=60)
    assert r.stdout.split()[0] == checksum
    assert f"{ds}@s1" in sandbox.exec("node2", ["zfs", "list", "-H", "-o", "name", "-t", "snapshot"]).stdout
    assert not connect_refused(address)
    sandbox.exec("node2", ["zfs", "destroy", "-r", ds], timeout=60)


def _sandbox_pids(status: dict) -> list[int]:
    pids = [pid for n in status["nodes"] for pid in n["pids"].values()]
    pids += [s["pid"] for s in status["services"].values() if s["pid"]]
    return pids


def _exists(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_cli_up_status_down_leaves_nothing_behind(tmp_path: Path) -> None:
    d = tmp_path / "sb"
    r = replq("sandbox", "up", "--nodes", "2", "--no-services", "--dir", str(d))
    assert r.returncode == 0, r.stderr
    try:
        r = replq("sandbox", "status", "--dir", str(d), "--output-format", "json")
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        assert [n["name"] for n in status["nodes"]] == ["node1", "node2"]
        assert all(n["state"] == "up" and re.match(r"^127\.\d+\.\d+\.\d+", n["address"]) for n in status["nodes"])
        assert status["redis_url"].startswith("redis://127.0.0.1:")
        assert "flower" in status
        pids = _sandbox_pids(status)
        assert len(pids) == 5 and all(_exists(p) for p in pids)  # 2 × (zfs-fuse, sshd) + redis

        # A second up on a running sandbox refuses and changes nothing.
        r = replq("sandbox", "up", "--nodes", "2", "--no-services", "--dir", str(d))
        assert r.returncode == 1 and "already running" in r.stderr
        assert all(_exists(p) for p in pids)
    finally:
        r = replq("sandbox", "down", "--dir", str(d))
    assert r.returncode == 0, r.stderr
    assert not any(_exists(p) for p in pids)
    assert not d.exists()
    mounts = Path("/proc/mounts").read_text()
    assert str(d) not in mounts
    r = replq("sandbox", "down", "--dir", str(d))  # safe to repeat
    assert r.returncode == 0, r.stderr


def test_up_after_unclean_stop_cleans_the_stale_sandbox(tmp_path: Path) -> None:
    d = tmp_path / "stale"
    sb = Sandbox(d)
    sb.up(nodes=1, services=False)
    try:
        old = _sandbox_pids(sb.status())
        for pid in old:  # as after a crash: everything gone at once, files left behind
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_exists(p) for p in old) and time.monotonic() < deadline:
            time.sleep(0.05)
        stale = Sandbox(d)
        assert stale.exists and not stale.running()
        stale.up(nodes=1, services=False)
        assert stale.node_state("node1") == "up"
        assert zfs_names(stale, "node1")[:2] == ["rpool", "rpool/data"]
    finally:
        Sandbox(d).down()
    assert not d.exists()


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", readme, re.S)
    commands = {line.strip() for b in blocks for line in b.splitlines() if line.strip()}
    assert "make test" in commands
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.strip().startswith("#")]
    assert "make test" in ci
