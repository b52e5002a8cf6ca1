"""The sandbox's services: beat, one worker per node (inside its node), Flower, the web GUI and the
metrics exporter.

`Sandbox.start_services()` calls `start_sandbox_services(sandbox)` on `sandbox up` and again on
`sandbox start NODE`, so it starts only what is not running: a node that came back gets its
worker again, a running beat, Flower or web GUI is left alone. Every process is recorded (pid + start
time) in the sandbox state, which is how `stop_services()`/`sandbox down` stop them by PID:
workers under `nodes[<n>]["worker"]`, the rest under `services`.

The services are real `replq` commands (`python -m replq …`) so the sandbox runs exactly what
an operator runs under systemd.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import replq
from replq.errors import SandboxError
from replq.procs import alive as process_alive
from replq.procs import record as record_process

# The sandbox (cluster.py) calls these with itself; typed Any here so that this module does
# not import the cluster that imports it.
Sandbox = Any

ADMIN_USER = "admin"
READY_TIMEOUT = 45.0


def replq_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "replq", *args]


def free_port(host: str = "127.0.0.1", preferred: int | None = None) -> int:
    """`preferred` if it is free (a restarted service keeps its URL), else any free port."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise SandboxError("no free port for a sandbox service")


def _port_of(url: str | None) -> int | None:
    try:
        return urlsplit(url).port if url else None
    except ValueError:
        return None


def _log(sandbox: Sandbox, name: str) -> Any:
    logs = sandbox.dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return open(logs / f"{name}.log", "ab")


def _code_env() -> dict[str, str]:
    """Services run the same replq code as the process that starts them, whatever is installed."""
    root = str(Path(replq.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}


def _host_env(sandbox: Sandbox, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a service outside the nodes: the sandbox's Redis and key, no node identity."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REPLQ_", "FLOWER_"))}
    env.update(sandbox.env())
    env.update(_code_env())
    env.update(extra or {})
    return env


def _spawn_host(sandbox: Sandbox, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> dict:
    with _log(sandbox, name) as log:
        proc = subprocess.Popen(argv, env=_host_env(sandbox, extra_env), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, cwd=sandbox.dir, start_new_session=True)
    return record_process(proc)


def _spawn_worker(sandbox: Sandbox, node: str) -> dict:
    with _log(sandbox, f"worker-{node}") as log:
        # nsenter execs the worker, so the recorded pid is the worker's own (inside the node).
        proc = sandbox.popen(node, replq_argv("worker", "--node", node), env=_code_env(), stdin=subprocess.DEVNULL,
                             stdout=log, stderr=log, cwd=sandbox.dir, start_new_session=True)
    return record_process(proc)


def _http_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # a 401 says it is up
    except (OSError, ValueError):
        return False


def _start_with_login(sandbox: Sandbox, name: str) -> str:
    """Flower or the web GUI on a free port (the same as before if free) with generated credentials,
    handed over in REPLQ_<NAME>_USER/_PASSWORD so that they do not show in `ps`; returns its URL."""
    old = sandbox.state.get(name) or {}
    user = old.get("user") or ADMIN_USER
    password = old.get("password") or secrets.token_urlsafe(12)
    port = free_port(preferred=_port_of(old.get("url")))
    prefix = f"REPLQ_{name.upper()}_"
    sandbox.state["services"][name] = _spawn_host(
        sandbox, name, replq_argv(name, "--address", "127.0.0.1", "--port", str(port)),
        {prefix + "USER": user, prefix + "PASSWORD": password})
    url = f"http://127.0.0.1:{port}/"
    sandbox.state[name] = {"url": url, "user": user, "password": password}
    return url


def start_sandbox_services(sandbox: Sandbox) -> list[str]:
    """Start whatever of beat, workers, Flower, the web GUI and metrics is not running; returns what was
    started."""
    state = sandbox.state
    services: dict[str, Any] = state.setdefault("services", {})
    started: list[str] = []

    if not process_alive(services.get("beat")):
        services["beat"] = _spawn_host(sandbox, "beat", replq_argv("beat"))
        started.append("beat")

    for node in sandbox.node_names():
        info = sandbox.node_info(node)
        if sandbox.node_state(node) == "up" and not process_alive(info.get("worker")):
            info["worker"] = _spawn_worker(sandbox, node)
            started.append(f"worker-{node}")
    sandbox.save()

    waits: list[tuple[str, str]] = []
    for name, ready_path in (("flower", "api/workers"), ("web", "")):
        if not process_alive(services.get(name)):
            url = _start_with_login(sandbox, name)
            waits.append((name, url + ready_path))
            started.append(name)

    if not process_alive(services.get("metrics")):
        port = free_port(preferred=_port_of((state.get("metrics") or {}).get("url")))
        services["metrics"] = _spawn_host(sandbox, "metrics",
                                          replq_argv("metrics", "--address", "127.0.0.1", "--port", str(port)))
        state["metrics"] = {"url": f"http://127.0.0.1:{port}/metrics"}
        waits.append(("metrics", f"http://127.0.0.1:{port}/metrics"))
        started.append("metrics")
    sandbox.save()

    _wait_ready(sandbox, waits)
    return started


def _wait_ready(sandbox: Sandbox, waits: list[tuple[str, str]]) -> None:
    """Flower, the web GUI and metrics answer HTTP before `up` prints their URLs; a service that died says why."""
    pending = dict(waits)
    deadline = time.monotonic() + READY_TIMEOUT
    while pending:
        for name, url in list(pending.items()):
            if not process_alive(sandbox.state["services"].get(name)):
                raise SandboxError(f"{name} exited at start; see {_log_tail(sandbox, name)}")
            if _http_answers(url):
                del pending[name]
        if not pending:
            break
        if time.monotonic() > deadline:
            raise SandboxError(f"{', '.join(pending)} did not answer within {READY_TIMEOUT:.0f} s; "
                               f"see {sandbox.dir / 'logs'}")
        time.sleep(0.2)
    # A worker or beat that dies at once (bad config, import error) should fail `up` visibly too.
    for name in ("beat",):
        rec = sandbox.state["services"].get(name)
        if rec and not process_alive(rec):
            raise SandboxError(f"{name} exited at start; see {_log_tail(sandbox, name)}")
    for node in sandbox.node_names():
        rec = sandbox.node_info(node).get("worker")
        if rec and not process_alive(rec):
            raise SandboxError(f"worker of {node} exited at start; see {_log_tail(sandbox, f'worker-{node}')}")


def _log_tail(sandbox: Sandbox, name: str) -> str:
    path = Path(sandbox.dir) / "logs" / f"{name}.log"
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    return f"{path}" + (f": {lines[-1].strip()}" if lines else "")
