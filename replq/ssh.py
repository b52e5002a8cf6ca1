"""The one door to SSH (paramiko): pinned host keys, remote commands, long streams.

- The target's host key must equal the key pinned in the store; an unknown or changed key is
  refused, never added (the equivalent of paramiko's RejectPolicy, checked by hand because
  we negotiate the transport ourselves).
- AES-GCM is preferred (paramiko lists it last; it is about twice as fast as aes-ctr here).
- Paramiko's own re-key after 2^29 bytes can time out mid-stream (paramiko issue 822): the
  client never initiates a re-key (limits raised far beyond any stream); the server may.
- A dead peer fails the run within about a minute: TCP keepalive and TCP_USER_TIMEOUT on
  the socket, SSH keepalives, and an I/O timeout on every channel read/write.
"""

from __future__ import annotations

import base64
import hashlib
import shlex
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import paramiko

from replq.errors import ConnectionLost, HostKeyMismatch, NodeUnreachable, RemoteExited

CONNECT_TIMEOUT = 15.0
IO_TIMEOUT = 60.0  # no progress on a stream for this long: the peer is dead or stuck
TICK = 1.0  # a stream's writer and waiter look at the clock (stalled? cancelled?) this often
# A remote command may legitimately work in silence for long (destroying a big volume); a
# dead peer is still caught sooner by TCP_USER_TIMEOUT and keepalives (the transport dies).
COMMAND_TIMEOUT = 900.0
KEEPALIVE = 10
WINDOW_SIZE = 16 * 1024 * 1024
MAX_PACKET = 32 * 1024
NO_REKEY = 2**62  # effectively never: see the module docstring
GCM_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


def remote_command(argv: Sequence[str]) -> str:
    """The command string for an SSH exec: each word quoted, so the remote shell sees exactly argv."""
    return shlex.join(argv)


def fingerprint(key_blob: bytes) -> str:
    """OpenSSH-style SHA256 fingerprint of a public key blob."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key_blob).digest()).decode().rstrip("=")


def parse_pinned_key(host_key: str) -> tuple[str, bytes]:
    """'ssh-ed25519 AAAA… [comment]' → (type, blob)."""
    parts = (host_key or "").split()
    if len(parts) < 2:
        raise HostKeyMismatch(f"invalid pinned host key {host_key!r}")
    try:
        return parts[0], base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise HostKeyMismatch(f"invalid pinned host key {host_key!r}") from None


def _key_types(ktype: str) -> tuple[str, ...]:
    # RSA keys are negotiated under their signature algorithm names.
    if ktype == "ssh-rsa":
        return ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")
    return (ktype,)


class Connection:
    """One SSH connection to one node, used for all commands and streams of a run.

    Implements zfs.Runner (`node`, `run(argv)`), so a remote `Zfs` is `Zfs(connection)`.
    """

    def __init__(
        self,
        node: str,
        host: str,
        port: int,
        user: str,
        host_key: str | None,
        key_path: str | Path,
        connect_timeout: float = CONNECT_TIMEOUT,
        io_timeout: float = IO_TIMEOUT,
    ) -> None:
        self.node = node
        self.host = host
        self.port = port
        self.user = user
        self.host_key = host_key
        self.key_path = Path(key_path)
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.transport: paramiko.Transport | None = None

    @property
    def where(self) -> str:
        return f"node '{self.node}' ({self.host}:{self.port})"

    # ------------------------------------------------------------------ connect

    def connect(self) -> Connection:
        if not self.host_key:
            raise HostKeyMismatch(f"no pinned SSH host key for {self.where}: refusing to connect")
        try:
            pkey = paramiko.PKey.from_path(self.key_path)
        except (OSError, paramiko.SSHException, ValueError) as exc:
            raise NodeUnreachable(f"cannot load the SSH key {self.key_path} to reach {self.where}: {exc}") from None
        t = self._handshake()
        try:
            t.auth_publickey(self.user, pkey)
            t.set_keepalive(KEEPALIVE)
        except paramiko.AuthenticationException as exc:
            t.close()
            raise NodeUnreachable(f"SSH login as '{self.user}' to {self.where} refused: {exc}") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            t.close()
            raise NodeUnreachable(f"{self.where} is unreachable: SSH: {exc}") from None
        self.transport = t
        return self

    def _handshake(self) -> paramiko.Transport:
        """TCP connection and SSH key exchange, the server's host key checked against the pinned one."""
        ktype, blob = parse_pinned_key(self.host_key or "")
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            raise NodeUnreachable(f"{self.where} is unreachable: {exc.strerror or exc}") from None
        self._tune_socket(sock)
        t = paramiko.Transport(sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET)
        try:
            for attr in ("REKEY_BYTES", "REKEY_PACKETS", "REKEY_BYTES_OVERFLOW_MAX", "REKEY_PACKETS_OVERFLOW_MAX"):
                setattr(t.packetizer, attr, NO_REKEY)
            opts = t.get_security_options()
            opts.ciphers = tuple(c for c in GCM_CIPHERS if c in opts.ciphers) + tuple(
                c for c in opts.ciphers if c not in GCM_CIPHERS
            )
            opts.key_types = tuple(k for k in _key_types(ktype) if k in opts.key_types) or opts.key_types
            opts.compression = ("none",)
            t.start_client(timeout=self.connect_timeout)
            remote = t.get_remote_server_key()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            t.close()
            raise NodeUnreachable(f"{self.where} is unreachable: SSH: {exc}") from None
        if remote.get_name() != ktype or remote.asbytes() != blob:
            t.close()
            raise HostKeyMismatch(
                f"host key of {self.where} changed: got {remote.get_name()} {fingerprint(remote.asbytes())}, "
                f"pinned {ktype} {fingerprint(blob)}; refusing to connect (update the node's pinned key if "
                "this change is expected)"
            )
        return t

    def probe(self) -> tuple[str, str]:
        """What answers SSH at the node's address, for the liveness check of a guest move (SPEC §6):
        ("login", …) the pinned host key and our login accepted; ("refused", …) the pinned host key,
        but our login refused or our key unusable (the node runs all the same); ("other-key", …)
        another host key; ("silent", …) no connection or no SSH handshake. The second item says it
        in words."""
        try:
            t = self._handshake()
        except HostKeyMismatch as exc:
            return "other-key", str(exc)
        except NodeUnreachable as exc:
            return "silent", str(exc)
        try:
            pkey = paramiko.PKey.from_path(self.key_path)
            t.auth_publickey(self.user, pkey)
            return "login", f"its SSH server ({self.host}:{self.port}) answers with the pinned host key"
        except (OSError, paramiko.SSHException, ValueError, EOFError) as exc:
            return "refused", (f"its SSH server ({self.host}:{self.port}) answers with the pinned host key (our login "
                               f"failed: {exc.__class__.__name__}: {exc})")
        finally:
            t.close()

    def _tune_socket(self, sock: socket.socket) -> None:
        # The kernel gives up on a peer that stops acknowledging for ~30 s (TCP_USER_TIMEOUT),
        # and probes an idle one; SSH keepalives keep data flowing so both apply.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 4)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 30_000)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def __enter__(self) -> Connection:
        return self.connect() if self.transport is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def cipher(self) -> str | None:
        t = self.transport
        return getattr(t, "local_cipher", None) if t is not None else None

    def _channel(self) -> paramiko.Channel:
        if self.transport is None:
            self.connect()
        assert self.transport is not None
        if not self.transport.is_active():
            raise ConnectionLost(f"connection to {self.where} lost")
        try:
            chan = self.transport.open_session(timeout=self.io_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectionLost(f"connection to {self.where} lost: {exc}") from None
        chan.settimeout(self.io_timeout)
        return chan

    # ------------------------------------------------------------------ commands

    def run(self, argv: Sequence[str], timeout: float | None = None, stdin: bytes | None = None) -> CommandResult:
        """Run argv on the node (words quoted for the remote shell); collect output and status."""
        chan = self._channel()
        timeout = timeout or COMMAND_TIMEOUT
        try:
            chan.settimeout(timeout)
            chan.exec_command(remote_command(argv))
            if stdin:
                _sendall(chan, memoryview(stdin))
            chan.shutdown_write()
            out = _drain(chan.recv, chan)
            err = _drain(chan.recv_stderr, chan)
            rc = self._wait_status(chan, timeout)
            return CommandResult(rc, out.decode(errors="replace"), err.decode(errors="replace"))
        except TimeoutError:
            raise ConnectionLost(f"'{argv[0]} {argv[1] if len(argv) > 1 else ''}' on {self.where} timed out") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectionLost(f"connection to {self.where} lost: {exc}") from None
        finally:
            chan.close()

    def _wait_status(self, chan: paramiko.Channel, timeout: float, tick: Callable[[], None] | None = None) -> int:
        deadline = time.monotonic() + timeout
        while not chan.status_event.wait(TICK):
            if self.transport is None or not self.transport.is_active():
                raise ConnectionLost(f"connection to {self.where} lost")
            if tick is not None:
                tick()
            if time.monotonic() > deadline:
                raise ConnectionLost(f"no answer from {self.where} within {timeout:.0f} s")
        if chan.exit_status == -1 and (self.transport is None or not self.transport.is_active()):
            raise ConnectionLost(f"connection to {self.where} lost")
        return chan.exit_status

    def open_stream(self, argv: Sequence[str]) -> Stream:
        """Start argv on the node with its stdin fed by `Stream.write`."""
        chan = self._channel()
        try:
            chan.exec_command(remote_command(argv))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            chan.close()
            raise ConnectionLost(f"connection to {self.where} lost: {exc}") from None
        return Stream(self, chan)


class Stream:
    """A remote command reading a byte stream from us (e.g. `zfs recv`)."""

    def __init__(self, conn: Connection, chan: paramiko.Channel) -> None:
        self.conn = conn
        self.chan = chan
        self.sent = 0
        self._stderr = bytearray()
        # Drain remote stderr as it comes, so a chatty command can never fill the window.
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        while True:
            try:
                data = self.chan.recv_stderr(65536)
            except TimeoutError:
                if self.chan.closed:
                    return
                continue  # a quiet command: keep listening
            except (OSError, paramiko.SSHException, EOFError):
                return  # write/finish report the failure with context
            if not data:
                return
            if len(self._stderr) < 1 << 20:
                self._stderr += data

    @property
    def stderr(self) -> str:
        return bytes(self._stderr).decode(errors="replace")

    def write(self, data: bytes | bytearray | memoryview, tick: Callable[[int], None] | None = None) -> None:
        """Send data to the remote command. With `tick`, a full window is waited out a second at a
        time, calling tick(bytes moved) between (it may raise: stalled or cancelled); without, the
        connection's I/O timeout applies."""
        try:
            if tick is None:
                _sendall(self.chan, memoryview(data))
            else:
                _sendall_ticking(self.chan, memoryview(data), tick)
        except TimeoutError:
            raise ConnectionLost(
                f"connection to {self.conn.where} stalled: no progress for {self.conn.io_timeout:.0f} s"
            ) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            t = self.conn.transport
            # A dying transport also marks the channel's status "ready" (with -1): not an exit.
            if t is not None and t.is_active() and self.chan.exit_status_ready() and self.chan.exit_status != -1:
                raise RemoteExited(f"remote command on {self.conn.where} exited early") from None
            reason = t.get_exception() if t is not None else None
            raise ConnectionLost(f"connection to {self.conn.where} lost mid-stream: {reason or exc}") from None
        self.sent += len(data)

    def finish(self, timeout: float = 600.0, tick: Callable[[], None] | None = None) -> CommandResult:
        """Signal end of input and wait for the remote command's exit status (`tick` is called
        every second meanwhile and may raise)."""
        try:
            if not self.chan.closed:
                self.chan.shutdown_write()
            rc = self.conn._wait_status(self.chan, timeout, tick)
            self._reader.join(timeout=5)
            out = b""
            while self.chan.recv_ready():
                out += self.chan.recv(65536)
            return CommandResult(rc, out.decode(errors="replace"), self.stderr)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectionLost(f"connection to {self.conn.where} lost: {exc}") from None
        finally:
            self.chan.close()

    def abort(self) -> None:
        """Stop the remote command: closing the channel ends its stdin and sshd kills the session."""
        try:
            self.chan.close()
        except Exception:  # noqa: BLE001 - best effort on an already broken connection
            pass


def _sendall(chan: paramiko.Channel, data: memoryview) -> None:
    # paramiko's sendall re-slices bytes (quadratic copying) and spins when the channel
    # closes mid-send; slice a memoryview and treat a zero-length send as closed.
    while data:
        n = chan.send(data)
        if n == 0:
            raise OSError("channel closed")
        data = data[n:]


def _sendall_ticking(chan: paramiko.Channel, data: memoryview, tick: Callable[[int], None]) -> None:
    """_sendall that waits for window space at most TICK at a time, calling tick(bytes sent)."""
    old = chan.gettimeout()
    chan.settimeout(TICK)
    try:
        while data:
            try:
                n = chan.send(data)
            except TimeoutError:
                tick(0)
                continue
            if n == 0:
                raise OSError("channel closed")
            data = data[n:]
            tick(n)
    finally:
        chan.settimeout(old)


def _drain(recv: object, chan: paramiko.Channel) -> bytes:
    buf = bytearray()
    while True:
        data = recv(65536)  # type: ignore[operator]
        if not data:
            return bytes(buf)
        buf += data


def connect_node(node: object, key_path: str | Path, **kw: object) -> Connection:
    """A connected Connection to a store Node (name, host, port, user, host_key)."""
    return node_connection(node, key_path, **kw).connect()


def node_connection(node: object, key_path: str | Path, **kw: object) -> Connection:
    """An unconnected Connection to a store Node (connect() or probe() it)."""
    return Connection(
        node=node.name,  # type: ignore[attr-defined]
        host=node.host,  # type: ignore[attr-defined]
        port=node.port,  # type: ignore[attr-defined]
        user=node.user or "root",  # type: ignore[attr-defined]
        host_key=node.host_key,  # type: ignore[attr-defined]
        key_path=key_path,
        **kw,  # type: ignore[arg-type]
    )


# Host key types `node add` pins, best first (RSA is negotiated under its signature names).
FETCH_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
                   "rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")


def fetch_host_key(host: str, port: int, timeout: float = 10.0) -> str:
    """The SSH server's host key as `TYPE BASE64`, preferring ed25519 (what `node add` pins).

    Only the key exchange is done: no authentication, nothing trusted yet; the operator
    compares the fingerprint shown.
    """
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise NodeUnreachable(f"cannot fetch the host key of {host}:{port}: {exc.strerror or exc}") from None
    transport = paramiko.Transport(sock)
    try:
        opts = transport.get_security_options()
        opts.key_types = [k for k in FETCH_KEY_TYPES if k in opts.key_types]
        transport.start_client(timeout=timeout)
        key = transport.get_remote_server_key()
        ktype = "ssh-rsa" if key.get_name().startswith("rsa-sha2") else key.get_name()
        return f"{ktype} {key.get_base64()}"
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise NodeUnreachable(f"cannot fetch the host key of {host}:{port}: {exc}") from None
    finally:
        transport.close()
