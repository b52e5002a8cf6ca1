"""Processes by PID, from /proc: the one parser of /proc/PID/stat, and stopping by PID.

A process is recorded as (pid, kernel start time), so a recycled PID is never mistaken for
the one started (sandbox services, the worker's `zfs send` process groups).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stat:
    pid: int
    state: str
    ppid: int
    pgid: int
    starttime: int


def stat(pid: int) -> Stat | None:
    """The fields of /proc/PID/stat replq uses, or None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return Stat(pid=pid, state=fields[0], ppid=int(fields[1]), pgid=int(fields[2]), starttime=int(fields[19]))


def pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def children(parent: int) -> list[int]:
    """Direct children of `parent`."""
    out = []
    for pid in pids():
        st = stat(pid)
        if st is not None and st.ppid == parent:
            out.append(pid)
    return out


def child_group_leaders(parent: int) -> list[int]:
    """Process groups led by direct children of `parent` (the engine starts `zfs send` in its own session)."""
    out = []
    for pid in pids():
        st = stat(pid)
        if st is not None and st.ppid == parent and st.pgid == pid:
            out.append(pid)
    return out


def starttime(pid: int) -> int | None:
    """The kernel's start time of a live process; None if it is gone or a zombie."""
    st = stat(pid)
    if st is None or st.state == "Z":  # a zombie has finished; only its parent's wait is missing
        return None
    return st.starttime


def record(proc: subprocess.Popen | int) -> dict[str, int]:
    pid = proc if isinstance(proc, int) else proc.pid
    return {"pid": pid, "start": starttime(pid) or 0}


def alive(rec: dict[str, int] | None) -> bool:
    return bool(rec) and starttime(rec["pid"]) == rec["start"]


def _signal(rec: dict[str, int] | None, sig: int) -> None:
    if rec is not None and alive(rec):
        try:
            os.kill(rec["pid"], sig)
        except ProcessLookupError:
            pass


def _reap(recs: Iterable[dict[str, int]]) -> None:
    """Collect our own exited children so they do not linger as zombies; only these PIDs, never
    waitpid(-1), which would steal other children's exit codes from the caller."""
    for r in recs:
        try:
            os.waitpid(r["pid"], os.WNOHANG)
        except ChildProcessError:
            pass


def stop(recs: Iterable[dict[str, int] | None], timeout: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL whatever is still there."""
    live = [r for r in recs if r is not None and alive(r)]
    for r in live:
        _signal(r, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(r) for r in live):
        _reap(live)
        time.sleep(0.1)
    for r in live:
        _signal(r, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(r) for r in live):
        _reap(live)
        time.sleep(0.05)
