"""`replq flower`: a real Flower process on a private Redis, with a real worker when the runtime has one."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import wait_for
from tests.support.redisproc import free_port

# Flower not listening yet, or closing a connection while it starts: not yet.
URL_ERRORS = (urllib.error.URLError, ConnectionError)

USER, PASSWORD = "admin", "s3cret:with-colon"


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "replq", *argv], env={**os.environ, **(env or {})},
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """By PID (its process group: a prefork worker's children go with it)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def request(url: str, auth: tuple[str, str] | None) -> tuple[int, Any]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def has_command(name: str) -> bool:
    from replq.cli import cli

    return name in cli.commands


@pytest.fixture
def flower(redis_url: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = start(["flower", "--port", str(port)], tmp_path / "flower.log",
                 {"REPLQ_FLOWER_USER": USER, "REPLQ_FLOWER_PASSWORD": PASSWORD})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: request(base + "/api/workers", None)[0] == 401, 30, "Flower to listen",
                 ignore=URL_ERRORS)
        yield base
    finally:
        stop(proc)
    assert PASSWORD not in Path(f"{tmp_path}/flower.log").read_text()  # never logged


def test_flower_lists_replq_tasks_with_job_ids(redis_url: str, flower: str, tmp_path: Path) -> None:
    from replq import app as appmod
    from replq.model import Node
    from replq.store import Store

    Store.from_url(redis_url).add_node(Node("fl1", "127.0.0.1"))  # a worker serves a known node
    worker = None
    if has_command("worker"):
        worker = start(["worker", "--node", "fl1", "--concurrency", "1"], tmp_path / "worker.log")
    try:
        app = appmod.make_app(redis_url)
        sent = []
        for job_id in ("100-0", "4242-17"):
            task_id = appmod.new_task_id(job_id)
            appmod.enqueue(app, appmod.TASK_REPLICATE, job_id, "fl1", task_id)
            sent.append((job_id, task_id))

        def listed() -> dict[str, Any] | None:
            code, tasks = request(flower + "/api/tasks", (USER, PASSWORD))
            assert code == 200
            return tasks if all(t in tasks for _, t in sent) else None

        tasks = wait_for(listed, 60, "Flower to list both tasks", ignore=URL_ERRORS)
        for job_id, task_id in sent:
            task = tasks[task_id]
            assert task["name"].startswith(appmod.TASK_REPLICATE), task
            assert job_id in task["args"] and task_id.startswith(job_id), task  # args and uuid columns
            if worker is not None:
                # Once a worker received it, the name column names the job too.
                def received(tid: str = task_id, jid: str = job_id) -> dict[str, Any] | None:
                    t = request(f"{flower}/api/task/info/{tid}", (USER, PASSWORD))[1]
                    return t if t and jid in (t.get("name") or "") else None

                task = wait_for(received, 60, f"the worker to receive {job_id}", ignore=URL_ERRORS)
                assert job_id in task["args"] and task["worker"] == "replq@fl1", task
        # The task list page shows the args column (the job id) next to the name.
        page = urllib.request.Request(flower + "/tasks")
        page.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
        with urllib.request.urlopen(page, timeout=10) as r:
            html = r.read().decode()
        assert '<th data-column="name">' in html and '<th data-column="args">' in html
        assert request(flower + "/api/tasks", None)[0] == 401
        assert request(flower + "/api/tasks", (USER, "wrong"))[0] == 401
        assert request(flower + "/api/workers", (USER, PASSWORD))[0] == 200
    finally:
        if worker is not None:
            stop(worker)


def replq(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replq", *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "", "8.8.8.8"])
def test_non_loopback_without_auth_refused(address: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REPLQ_FLOWER_", "FLOWER_"))}
    r = subprocess.run([sys.executable, "-m", "replq", "--redis", f"redis://127.0.0.1:{free_port()}/0", "flower",
                        "--address", address, "--port", str(free_port())],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "without basic auth" in r.stderr, r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("auth", ["nopassword", ":pw", "user:", "a,b:c"])
def test_bad_basic_auth_refused(auth: str) -> None:
    r = replq("flower", "--basic-auth", auth)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--basic-auth" in r.stderr, r.stderr


def test_flower_auth_from_settings(redis_url: str, tmp_path: Path) -> None:
    """No credentials in the environment: Flower takes them from the cluster settings and may
    then listen beyond loopback."""
    from replq.store import Store

    store = Store.from_url(redis_url)
    store.redis.hset(store.k("settings"), mapping={"flower_user": json.dumps("ops"),
                                                   "flower_password": json.dumps("pw")})
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REPLQ_FLOWER_", "FLOWER_"))}
    with open(tmp_path / "flower.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "replq", "flower", "--address", "0.0.0.0", "--port", str(port)],
                                env=env, stdout=out, stderr=out, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: request(base + "/api/workers", None)[0] == 401, 30, "Flower to listen",
                 ignore=URL_ERRORS)
        assert request(base + "/api/workers", ("ops", "pw"))[0] == 200
    finally:
        stop(proc)
