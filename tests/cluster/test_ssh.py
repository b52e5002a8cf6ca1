"""ssh.py: pinned host keys, remote commands with exact argv, long streams, timeouts."""

from __future__ import annotations

import base64
import os
import socket
import time
from pathlib import Path

import paramiko
import pytest

from replq import ssh
from replq.sandbox import Sandbox

# ------------------------------------------------------------------------- unit


def test_parse_pinned_key_and_fingerprint() -> None:
    blob = b"\x00\x00\x00\x0bssh-ed25519" + b"\x00\x00\x00\x20" + bytes(32)
    text = "ssh-ed25519 " + base64.b64encode(blob).decode() + " comment"
    assert ssh.parse_pinned_key(text) == ("ssh-ed25519", blob)
    assert ssh.fingerprint(blob).startswith("SHA256:") and "=" not in ssh.fingerprint(blob)
    for bad in ("", "ssh-ed25519", "ssh-ed25519 !!notbase64!!"):
        with pytest.raises(ssh.HostKeyMismatch):
            ssh.parse_pinned_key(bad)


def test_no_pinned_key_refused_before_connecting() -> None:
    conn = ssh.Connection("nodeX", "127.0.0.1", 1, "root", None, "/nonexistent")
    with pytest.raises(ssh.HostKeyMismatch, match="no pinned SSH host key"):
        conn.connect()


def test_unreachable_node(tmp_path: Path) -> None:
    keyfile = tmp_path / "id"
    paramiko.ECDSAKey.generate().write_private_key_file(str(keyfile))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pinned = "ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519" + bytes(36)).decode()
    conn = ssh.Connection("nodeX", "127.0.0.1", port, "root", pinned, keyfile, connect_timeout=3)
    with pytest.raises(ssh.NodeUnreachable, match="node 'nodeX' .* is unreachable"):
        conn.connect()


# ------------------------------------------------------------------------- against a sandbox node


def _conn(sb: Sandbox, name: str, host_key: str | None = None, **kw: object) -> ssh.Connection:
    info = sb.node_info(name)
    return ssh.Connection(name, info["host"], info["port"], "root", host_key or info["host_key"], sb.ssh_key,
                          **kw).connect()  # type: ignore[arg-type]  # fmt: skip


@pytest.mark.sandbox
def test_commands_argv_exact_and_status(sandbox: Sandbox) -> None:
    with _conn(sandbox, "node2") as c:
        assert c.cipher == "aes128-gcm@openssh.com"
        tricky = ["a b", "$(id)", "x'y", '"q"', "; rm -rf /", "*"]
        r = c.run(["printf", "%s\\n", *tricky])
        assert r.returncode == 0 and r.stdout.splitlines() == tricky
        r = c.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
        # The node's own ZFS: its pool, seen over SSH.
        r = c.run(["zfs", "list", "-H", "-o", "name", "rpool/data"])
        assert r.returncode == 0 and r.stdout.strip() == "rpool/data"


@pytest.mark.sandbox
def test_changed_host_key_refused(sandbox: Sandbox) -> None:
    other = sandbox.node_info("node3")["host_key"]
    with pytest.raises(ssh.HostKeyMismatch, match=r"host key of node 'node2' .* changed.*refusing"):
        _conn(sandbox, "node2", host_key=other)


@pytest.mark.sandbox
def test_stream_above_1gib_survives_rekey_limits(sandbox: Sandbox) -> None:
    """1.1 GiB through one channel: paramiko would re-key at 2^29 bytes; we never initiate it."""
    total = 1100 * 1024 * 1024
    chunk = os.urandom(1 << 20)
    with _conn(sandbox, "node2") as c:
        stream = c.open_stream(["wc", "-c"])
        t0 = time.monotonic()
        for _ in range(total // len(chunk)):
            stream.write(chunk)
        res = stream.finish()
        rate = total / (time.monotonic() - t0) / 1e6
        assert res.returncode == 0 and int(res.stdout) == total, res
        assert stream.sent == total
        assert c.transport is not None and c.transport.is_active()
    print(f"1.1 GiB through paramiko: {rate:.0f} MB/s")


@pytest.mark.sandbox
def test_remote_exit_while_streaming(sandbox: Sandbox) -> None:
    with _conn(sandbox, "node2") as c:
        stream = c.open_stream(["sh", "-c", "head -c 10 >/dev/null; echo bye >&2; exit 4"])
        with pytest.raises(ssh.RemoteExited):
            for _ in range(200):
                stream.write(bytes(1 << 20))
        res = stream.finish(timeout=10)
        assert res.returncode == 4 and "bye" in res.stderr


@pytest.mark.sandbox
def test_stalled_peer_times_out(sandbox: Sandbox) -> None:
    """A peer that stops reading fails the write after the I/O timeout instead of hanging."""
    with _conn(sandbox, "node2", io_timeout=2.0) as c:
        stream = c.open_stream(["sleep", "60"])
        t0 = time.monotonic()
        with pytest.raises(ssh.ConnectionLost, match="stalled"):
            for _ in range(1000):
                stream.write(bytes(1 << 20))
        assert time.monotonic() - t0 < 20
        stream.abort()
