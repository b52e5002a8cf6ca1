"""Failure notification: a real hook program and a real local HTTP server, job state in a private Redis.
The program comes from the node's environment only, must be root's alone and gets a clean environment."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from replq import hooks, notify
from replq.errors import UntrustedProgram
from replq.model import Disk, Guest, Job, Node, Storage
from replq.store import Store
from tests.support.helpers import run

HOOK = """\
import json, os, sys
keys = ["REPLQ_EVENT", "REPLQ_JOB_ID", "REPLQ_JOB_GUEST", "REPLQ_JOB_TARGET", "REPLQ_JOB_SOURCE",
        "REPLQ_FAIL_COUNT", "REPLQ_ERROR", "REPLQ_LAST_TRY"]
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({k: os.environ.get(k) for k in keys} | {"argv": sys.argv[2:]}) + "\\n")
"""


def set_settings(store: Store, **values: Any) -> None:
    # Written as any Redis client could (notify_command included, which `settings set` refuses).
    for key, value in values.items():
        store.redis.hset(store.k("settings"), key, json.dumps(value))


@pytest.fixture(autouse=True)
def _no_hook_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("REPLQ_NOTIFY_COMMAND", "REPLQ_NOTIFY_URL", "REPLQ_NOTIFY_EVERY"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def store(redis_url: str) -> Store:
    s = Store.from_url(redis_url)
    for n in ("pve1", "pve2"):
        s.add_node(Node(n, f"10.0.0.{n[-1]}"))
    s.add_storage(Storage("local-zfs", "rpool/data"))
    s.add_guest(Guest(100, "pve1", "lxc", [Disk("local-zfs:subvol-100-disk-0")]))
    s.create_job(Job("100-0", "pve2"))
    return s


def fail_once(store: Store, job_id: str, error: str) -> list[str]:
    """What the worker task does on a failed run: fail_count + 1, error recorded, then notify."""
    count = store.get_state(job_id).fail_count + 1
    store.update_state(job_id, fail_count=count, error=error, last_try=1_700_000_000 + count)
    return notify.job_failed(store, job_id)


def test_should_notify_schedule() -> None:
    fired = [n for n in range(0, 61) if notify.should_notify(n)]
    assert fired == [1, 2, 3, 10, 20, 30, 40, 50, 60]
    assert [n for n in range(1, 13) if notify.should_notify(n, every=4)] == [1, 2, 3, 4, 8, 12]


def test_command_hook_fires_at_1_2_3_then_every_10th(store: Store, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "calls.jsonl"
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    # A string is split into words (never given to a shell): the quotes keep "a b" one argument.
    monkeypatch.setenv("REPLQ_NOTIFY_COMMAND", f"{sys.executable} {script} {out} 'a b' '$HOME;x'")
    error = "storage 'local-zfs' is not available on node 'pve2'"
    results = [fail_once(store, "100-0", error) for _ in range(21)]
    assert [i + 1 for i, r in enumerate(results) if r] == [1, 2, 3, 10, 20]
    assert all(r in ([], ["command"]) for r in results)
    calls = [json.loads(line) for line in out.read_text().splitlines()]
    assert [c["REPLQ_FAIL_COUNT"] for c in calls] == ["1", "2", "3", "10", "20"]
    first = calls[0]
    assert first == {"REPLQ_EVENT": "job_failed", "REPLQ_JOB_ID": "100-0", "REPLQ_JOB_GUEST": "100",
                     "REPLQ_JOB_TARGET": "pve2", "REPLQ_JOB_SOURCE": "pve1", "REPLQ_FAIL_COUNT": "1",
                     "REPLQ_ERROR": error, "REPLQ_LAST_TRY": "1700000001", "argv": ["a b", "$HOME;x"]}

    # Success clears fail_count: the next failure is a "first" one again.
    store.update_state("100-0", fail_count=0, error=None)
    assert fail_once(store, "100-0", "boom") == ["command"]


def test_notify_every_and_broken_hooks_never_raise(store: Store, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "calls.jsonl"
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    monkeypatch.setenv("REPLQ_NOTIFY_COMMAND", f"{sys.executable} {script} {out}")
    set_settings(store, notify_every=2)
    assert [bool(fail_once(store, "100-0", "x")) for _ in range(6)] == [True, True, True, True, False, True]

    monkeypatch.setenv("REPLQ_NOTIFY_COMMAND", str(tmp_path / "missing-program"))
    assert fail_once(store, "100-0", "x") == []  # fail_count 7 would not fire anyway
    store.update_state("100-0", fail_count=0)
    assert fail_once(store, "100-0", "x") == []  # program missing: logged, not raised
    monkeypatch.setenv("REPLQ_NOTIFY_COMMAND", f"{sys.executable} -c 'import sys; sys.exit(3)'")
    assert fail_once(store, "100-0", "x") == []
    store.update_state("100-0", fail_count=0)
    r = notify.run_command([sys.executable, "-c", "import time; time.sleep(60)"],
                           notify.failure_facts(store, "100-0"), timeout=0.5)
    assert r is False
    assert notify.job_failed(store, "999-0") == []  # unknown job: nothing, no exception


class Receiver(BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, str], Any]] = []
    status = 204

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append((self.path, dict(self.headers), json.loads(body)))
        self.send_response(Receiver.status)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    Receiver.received = []
    Receiver.status = 204
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hooks/replq?token=s3cret"
    finally:
        server.shutdown()
        server.server_close()


def test_webhook_posts_json(store: Store, receiver: str) -> None:
    set_settings(store, notify_url=receiver)
    results = [fail_once(store, "100-0", "node 'pve2' is unreachable") for _ in range(10)]
    assert [i + 1 for i, r in enumerate(results) if r == ["webhook"]] == [1, 2, 3, 10]
    assert len(Receiver.received) == 4
    path, headers, body = Receiver.received[0]
    assert path == "/hooks/replq?token=s3cret"
    assert headers["Content-Type"] == "application/json"
    assert {k: body[k] for k in ("event", "job", "guest", "target", "source", "fail_count", "error")} == {
        "event": "job_failed", "job": "100-0", "guest": 100, "target": "pve2", "source": "pve1",
        "fail_count": 1, "error": "node 'pve2' is unreachable"}
    assert [b["fail_count"] for _, _, b in Receiver.received] == [1, 2, 3, 10]

    Receiver.status = 500  # a failing receiver is logged, never raised
    store.update_state("100-0", fail_count=0)
    assert fail_once(store, "100-0", "x") == []
    set_settings(store, notify_url="file:///etc/passwd")  # only http(s)
    store.update_state("100-0", fail_count=0)
    assert fail_once(store, "100-0", "x") == []


def test_webhook_unreachable_is_quick(store: Store) -> None:
    from tests.support.redisproc import free_port

    set_settings(store, notify_url=f"http://127.0.0.1:{free_port()}/x")
    assert fail_once(store, "100-0", "x") == []


def test_no_hook_configured(store: Store) -> None:
    assert fail_once(store, "100-0", "x") == []


def test_environment_fallback(store: Store, receiver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The webhook and notify_every come from the worker's environment unless the cluster sets them."""
    monkeypatch.setenv("REPLQ_NOTIFY_URL", receiver)
    monkeypatch.setenv("REPLQ_NOTIFY_EVERY", "5")
    assert [bool(fail_once(store, "100-0", "x")) for _ in range(5)] == [True, True, True, False, True]
    set_settings(store, notify_url=receiver.replace("/hooks/", "/cluster/"))  # the cluster setting wins
    store.update_state("100-0", fail_count=0)
    assert fail_once(store, "100-0", "x") == ["webhook"]
    assert [p.split("?")[0] for p, _, _ in Receiver.received] == ["/hooks/replq"] * 4 + ["/cluster/replq"]


def test_a_command_set_in_redis_is_never_executed(store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever can write to Redis cannot make a worker run a program: notify_command in the
    store is ignored with a warning, and `settings set` refuses it."""
    out = tmp_path / "calls.jsonl"
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    set_settings(store, notify_command=f"{sys.executable} {script} {out}")
    set_settings(store, notify_command=[sys.executable, str(script), str(out)])
    with caplog.at_level("WARNING", logger="replq.notify"):
        assert fail_once(store, "100-0", "x") == []
    assert not out.exists()
    assert "notify_command in the cluster settings is ignored" in caplog.text
    # The node's own command still runs, and only it.
    monkeypatch.setenv("REPLQ_NOTIFY_COMMAND", f"{sys.executable} {script} {out} node")
    assert fail_once(store, "100-0", "x") == ["command"]
    assert [json.loads(line)["argv"] for line in out.read_text().splitlines()] == [["node"]]

    r = run("settings", "set", "notify_command", f"{sys.executable} {script} {out}")
    assert r.returncode == 1 and "not a cluster setting" in r.stderr and "REPLQ_NOTIFY_COMMAND" in r.stderr
    shown = run("settings", "show", "--output-format", "json")
    assert "notify_command" not in json.loads(shown.stdout)
    assert "warning: ignored stored setting notify_command" in shown.stderr
    assert run("settings", "set", "notify_command", "").returncode == 0  # the operator cleans it up
    assert store.retired_settings() == []


def write_program(path: Path, body: str = "") -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("unsafe", ["world-writable", "group-writable", "not root's", "in a writable directory"])
def test_an_unsafe_program_is_refused(store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch, unsafe: str) -> None:
    marker = tmp_path / "ran"
    directory = tmp_path / "bin"
    directory.mkdir()
    program = write_program(directory / "alert", f"touch {marker}")
    assert hooks.trusted_program(str(program)) == program  # root's alone: would run
    if unsafe == "world-writable":
        program.chmod(0o757)
    elif unsafe == "group-writable":
        program.chmod(0o775)
    elif unsafe == "not root's":
        os.chown(program, 65534, 65534)
    else:
        directory.chmod(0o777)
    with pytest.raises(UntrustedProgram, match="refusing to run"):
        hooks.trusted_program(str(program))
    monkeypatch.setenv("REPLQ_NOTIFY_COMMAND", str(program))
    with caplog.at_level("WARNING", logger="replq.notify"):
        assert fail_once(store, "100-0", "x") == []
    assert not marker.exists()
    assert f"refusing to run {program}" in caplog.text


def test_relative_and_bare_program_names(tmp_path: Path) -> None:
    with pytest.raises(UntrustedProgram, match="absolute path"):
        hooks.trusted_program("bin/alert")
    assert str(hooks.trusted_program("true")).endswith("/true")  # found in the safe PATH only
    with pytest.raises(UntrustedProgram, match="not found"):
        hooks.trusted_program("replq-no-such-program")


def test_the_program_environment_holds_no_secrets(store: Store, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "env.txt"
    program = write_program(tmp_path / "dump-env", f"env > {out}")
    secrets = {"REPLQ_REDIS_URL": "redis://:redis-pw-1@10.0.0.1:6379/0", "REPLQ_FLOWER_PASSWORD": "flower-pw-2",
               "REPLQ_METRICS_PASSWORD": "metrics-pw-3", "REPLQ_SSH_KEY": "/root/.ssh/id_ed25519",
               "AWS_SECRET_ACCESS_KEY": "aws-pw-4", "PATH": f"{tmp_path}:/usr/bin", "LD_PRELOAD": "/tmp/evil.so"}
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("REPLQ_NOTIFY_COMMAND", str(program))
    monkeypatch.setenv("LANG", "C.UTF-8")
    assert fail_once(store, "100-0", "x") == ["command"]
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert not set(env) & set(secrets) - {"PATH"}
    assert env["PATH"] == hooks.SAFE_PATH and env["LANG"] == "C.UTF-8" and env["REPLQ_JOB_ID"] == "100-0"
    assert not any(v in out.read_text() for k, v in secrets.items() if k != "PATH")
    allowed = set(hooks.PASSED_ENV) | {"PATH", "PWD", "SHLVL", "_"}  # the last three: set by sh itself
    assert {k for k in env if not k.startswith("REPLQ_")} <= allowed, sorted(env)
    assert {k for k in env if k.startswith("REPLQ_")} == {
        "REPLQ_EVENT", "REPLQ_JOB_ID", "REPLQ_JOB_GUEST", "REPLQ_JOB_TARGET", "REPLQ_JOB_SOURCE",
        "REPLQ_FAIL_COUNT", "REPLQ_ERROR", "REPLQ_LAST_TRY"}


@pytest.fixture
def hooked_worker(redis_url: str, tmp_path: Path) -> Iterator[tuple[Store, Path]]:
    """A real `replq worker` for node nt1 with a hook program in its environment; job 300-0 of
    a guest on nt1 replicates to nt2, where nothing listens (every run fails). Yields the store
    and the file each hook call appends to."""
    import os
    import signal
    import subprocess

    from tests.support.redisproc import free_port

    store = Store.from_url(redis_url)
    store.add_node(Node("nt1", "127.0.0.1"))
    store.add_node(Node("nt2", f"127.0.0.1:{free_port()}"))  # nothing listens there
    store.add_storage(Storage("local-zfs", "rpool/data"))
    store.add_guest(Guest(300, "nt1", "lxc", [Disk("local-zfs:subvol-300-disk-0")]))
    store.create_job(Job("300-0", "nt2"))  # no beat runs here: only the test's enqueues run it
    out = tmp_path / "calls.jsonl"
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    env = {**os.environ, "REPLQ_NOTIFY_COMMAND": f"{sys.executable} {script} {out}"}
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "replq", "worker", "--node", "nt1", "--concurrency", "1"],
                                  env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        yield store, out
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)


def test_real_worker_calls_the_hook_on_failure(hooked_worker: tuple[Store, Path], redis_url: str,
                                               tmp_path: Path) -> None:
    """End to end: a real `replq worker` runs a job whose target is unreachable; the hook in the
    worker's environment gets the failure."""
    import time

    from replq import app as appmod

    store, out = hooked_worker
    app = appmod.make_app(redis_url)
    appmod.enqueue(app, appmod.TASK_REPLICATE, "300-0", "nt1", appmod.new_task_id("300-0"), force=True)
    deadline = time.monotonic() + 60
    while not (out.exists() and out.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert out.exists(), (tmp_path / "worker.log").read_text()[-2000:]
    call = json.loads(out.read_text().splitlines()[0])
    state = store.get_state("300-0")
    assert state.fail_count == 1 and state.error
    assert call["REPLQ_JOB_ID"] == "300-0" and call["REPLQ_JOB_TARGET"] == "nt2"
    assert call["REPLQ_FAIL_COUNT"] == "1" and call["REPLQ_ERROR"] == state.error


def test_run_notifies_only_with_mail(hooked_worker: tuple[Store, Path], redis_url: str, tmp_path: Path) -> None:
    """pvesr run --mail: a manual run of the due jobs notifies a failure only with --mail (the
    scheduler's runs always do, as pvesr.service runs `pvesr run --mail 1`)."""
    import io

    from replq import dispatch
    from replq.app import ping_worker
    from tests.support.helpers import wait_for

    store, out = hooked_worker
    wait_for(lambda: ping_worker("nt1", 1.0, redis_url), 60, "the worker of nt1")
    assert dispatch.run_remote(store, None, wait=True, out=io.StringIO(), redis_url=redis_url) == 1
    assert store.get_state("300-0").fail_count == 1
    assert not out.exists(), "a run without --mail called the hook"
    store.update_state("300-0", last_try=0)  # schedule-now: due again (fail_count stays)
    assert dispatch.run_remote(store, None, wait=True, out=io.StringIO(), redis_url=redis_url, mail=True) == 1
    calls = [json.loads(line) for line in out.read_text().splitlines()]
    assert [c["REPLQ_FAIL_COUNT"] for c in calls] == ["2"], (tmp_path / "worker.log").read_text()[-2000:]
