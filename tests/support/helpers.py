"""Small helpers shared by the tests: the CLI as a user runs it, and stopping processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# The checkout under test: subprocesses run `python -m replq` from here, whatever is installed.
REPO = str(Path(__file__).resolve().parents[2])


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`replq ARGS` in a subprocess, as an operator would type it."""
    return subprocess.run([sys.executable, "-m", "replq", *args], capture_output=True, text=True, timeout=60,
                          input=stdin, cwd=REPO)


def ok(*args: str) -> str:
    r = run(*args)
    assert r.returncode == 0, (args, r.stderr)
    return r.stdout


def refused(*args: str, code: int = 1) -> str:
    """The command is refused: the exit code, and exactly one line on stderr, no traceback."""
    r = run(*args)
    assert r.returncode == code, (args, r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


def refused_inproc(*args: str) -> str:
    """A refused command run in this process through the real entry point (faster than a subprocess):
    exit code 1 and one line on stderr, which is returned."""
    import contextlib
    import io

    import pytest

    from replq.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main(list(args))
    assert exc.value.code == 1 and err.getvalue().count("\n") == 1, (args, exc.value.code, err.getvalue())
    return err.getvalue()


def stop_procs(procs: Iterable[subprocess.Popen | None], timeout: float = 30) -> None:
    """SIGTERM each process we started (by its Popen), wait, SIGKILL what is left."""
    live = [p for p in procs if p is not None]
    for p in live:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in live:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def wait_for(cond: Callable[[], object], timeout: float, what: str, every: float = 0.2,
             ignore: tuple[type[BaseException], ...] = ()) -> object:
    """Poll `cond` until it is truthy (its value is returned); errors in `ignore` count as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = cond()
        except ignore:
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def job_cluster(redis_url: str, nodes: Iterable[str], guests: dict[int, str]) -> Any:
    """A store with these nodes, the storage local-zfs (rpool/data) and guests {vmid: node} of one
    disk each, time zone UTC: the setting of the CLI tests that need no ZFS."""
    from replq.model import Disk, Guest, Node, Storage
    from replq.store import Store

    store = Store.from_url(redis_url)
    store.set_setting("timezone", "UTC")
    for n in nodes:
        store.add_node(Node(n, f"10.0.0.{n[-1]}"))
    store.add_storage(Storage("local-zfs", "rpool/data"))
    for vmid, node in guests.items():
        store.add_guest(Guest(vmid, node, "lxc", [Disk(f"local-zfs:subvol-{vmid}-disk-0")]))
    return store
