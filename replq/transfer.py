"""The one send pipeline: `zfs send` here → token bucket → a stream to `zfs recv` on the target.

Used by every transfer (replication runs and migration copies). It owns the local `zfs send`
process (its own process group, stopped as a group), reads its stream in chunks, paces them
through the job's token bucket, writes them to the transport (an SSH channel) and reports
progress. On any failure the sender is stopped and the remote receive aborted before the
exception goes up; `on_bytes` may raise to cancel between two chunks. A transfer that makes no
progress for the cluster's `stall_timeout` (a hung zfs on either side) is aborted as stalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from replq import ssh, zfs
from replq.errors import RemoteExited, SendFailed, ServiceError, Stalled
from replq.settings import DEFAULT_STALL_TIMEOUT
from replq.throttle import TokenBucket

CHUNK = 1 << 20
PIPE_SIZE = 1 << 20
PROGRESS_INTERVAL = 1.0
TICK = 1.0  # seconds between two looks at the clock while nothing moves


@dataclass
class Progress:
    """Bytes sent, recent rate and the estimated total, published at most once a second."""

    publish: Callable[[dict | None], Any]
    total: int | None = None
    done: int = 0  # bytes of finished volumes
    current: int = 0  # bytes of the volume being sent
    volume: str | None = None
    started: float = field(default_factory=time.monotonic)
    _last: float = 0.0
    _window: list[tuple[float, int]] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return self.done + self.current

    def update(self, current: int, force: bool = False) -> None:
        self.current = current
        now = time.monotonic()
        if not force and now - self._last < PROGRESS_INTERVAL:
            return
        self._last = now
        self._window.append((now, self.sent))
        self._window = [w for w in self._window if now - w[0] <= 10.0][-20:]
        t0, b0 = self._window[0]
        rate = (self.sent - b0) / (now - t0) if now > t0 else None
        eta = None
        if rate and self.total is not None and self.total > self.sent:
            eta = round((self.total - self.sent) / rate, 1)
        record = {
            "bytes": self.sent,
            "total": self.total,
            "rate": round(rate) if rate is not None else None,
            "eta": eta,
            "volume": self.volume,
            "elapsed": round(now - self.started, 1),
        }
        # Progress is advisory: a Redis restart mid-transfer must not fail the replication.
        with contextlib.suppress(redis.exceptions.RedisError, ServiceError):
            self.publish(record)


class Watchdog:
    """The one last-progress clock of a transfer (SPEC §5: no progress for `stall_timeout`
    seconds aborts it). Every byte read from `zfs send` or taken by the channel moves it; `tick()`
    runs the caller's check (cancel) and raises Stalled once the clock stands still too long,
    naming what it was waiting for."""

    def __init__(self, stall_timeout: float, dataset: str, on_tick: Callable[[], None] | None = None) -> None:
        self.stall_timeout = stall_timeout
        self.dataset = dataset
        self.on_tick = on_tick
        self.waiting_for = "zfs send"
        self.last = time.monotonic()

    def moved(self, n: int = 1) -> None:
        if n:
            self.last = time.monotonic()

    def tick(self, n: int = 0) -> None:
        self.moved(n)
        if self.on_tick is not None:
            self.on_tick()
        idle = time.monotonic() - self.last
        if idle > self.stall_timeout:
            raise Stalled(f"transfer of {self.dataset} stalled: no progress for {idle:.0f} s "
                          f"(stall_timeout {self.stall_timeout:g} s) waiting for {self.waiting_for}")


def send_stream(conn: ssh.Connection, send_argv: list[str], recv_argv: list[str], *, source: str, dataset: str,
                bucket: TokenBucket | None = None, on_bytes: Callable[[int], None] | None = None,
                target_error: Callable[[str], Exception] | None = None,
                stall_timeout: float = DEFAULT_STALL_TIMEOUT) -> tuple[int, float]:
    """`zfs send` here → token bucket → SSH channel → `zfs recv` on the connected node.

    The one send pipeline of replq (runs and migrations). Returns (bytes sent, seconds until the
    stream ended; zfs recv may commit after that). On any failure the sender is stopped as a
    process group and the channel aborted before the exception goes up. `on_bytes(sent)` is
    called after every chunk and at least every second, and may raise to cancel. Nothing moving
    for `stall_timeout` seconds (a hung `zfs send`, a `zfs recv` that stopped reading or never
    exits) raises Stalled."""
    bucket = bucket or TokenBucket.from_mbps(None)
    target_error = target_error or (lambda stderr: zfs.map_error(stderr, f"receiving {dataset}", conn.node, "target"))
    t0 = time.monotonic()
    errfile = tempfile.TemporaryFile()
    sender = subprocess.Popen(send_argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errfile,
                              start_new_session=True, bufsize=0)  # killed as a group on failure
    stream: ssh.Stream | None = None
    sent = 0
    watch = Watchdog(stall_timeout, dataset, on_tick=lambda: on_bytes(sent) if on_bytes is not None else None)
    try:
        assert sender.stdout is not None
        with contextlib.suppress(OSError):
            fcntl.fcntl(sender.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        stream = conn.open_stream(recv_argv)
        buf = bytearray(bucket.chunk_size(CHUNK))
        view = memoryview(buf)
        fd = sender.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        while True:
            watch.waiting_for = f"zfs send on node '{source}'"
            if not poller.poll(TICK * 1000):
                watch.tick()
                continue
            n = os.readv(fd, [buf])
            if not n:
                break
            watch.moved(n)
            bucket.consume(n)
            watch.waiting_for = f"zfs recv on node '{conn.node}' to take the stream"
            try:
                stream.write(view[:n], tick=watch.tick)
            except RemoteExited:
                # zfs recv gave up: its exit status and stderr say why.
                _stop_sender(sender)
                res = stream.finish(timeout=60)
                raise target_error(res.stderr or "zfs recv ended before the stream") from None
            sent += n
            if on_bytes is not None:
                on_bytes(sent)
        t_stream = time.monotonic() - t0
        watch.waiting_for = f"zfs send on node '{source}' to exit after its stream"
        rc = _wait_exit(sender, watch)
        if rc != 0 and not stream.chan.exit_status_ready():
            errfile.seek(0)
            err = errfile.read().decode(errors="replace")
            stream.finish(timeout=60)  # let zfs recv see the end and discard the partial stream
            if rc < 0:
                raise SendFailed(f"zfs send of {dataset} was killed (signal {-rc})")
            raise zfs.map_error(err, f"sending {dataset}", source, "source")
        watch.waiting_for = f"zfs recv on node '{conn.node}' to commit the stream"
        res = stream.finish(timeout=float("inf"), tick=watch.tick)
        if res.returncode != 0:
            raise target_error(res.stderr)
        return sent, t_stream
    except BaseException:
        _stop_sender(sender)
        if stream is not None:
            stream.abort()
        raise
    finally:
        if sender.stdout is not None:
            sender.stdout.close()
        with contextlib.suppress(Exception):
            sender.wait(timeout=10)
        errfile.close()


def _wait_exit(proc: subprocess.Popen, watch: Watchdog) -> int:
    while True:
        try:
            return proc.wait(timeout=TICK)
        except subprocess.TimeoutExpired:
            watch.tick()


def _stop_sender(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop `zfs send`: close its pipe first (it exits on SIGPIPE and releases the snapshot
    cleanly; a SIGKILLed zfs-fuse client leaves the snapshot busy in the daemon), then kill
    its process group if it is still there."""
    if proc.stdout is not None:
        with contextlib.suppress(OSError):
            proc.stdout.close()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
