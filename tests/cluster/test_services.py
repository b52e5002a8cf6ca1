"""Sandbox services on a real 2-node sandbox: beat, a worker inside each node, Flower and the web GUI
with generated credentials and the metrics exporter; restarted selectively; all gone after `down`."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from replq.sandbox import Sandbox, process_alive, services
from tests.support.cluster import sandbox_available
from tests.support.helpers import REPO, wait_for

pytestmark = pytest.mark.sandbox


def http(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def sandbox_processes(directory: Path) -> set[int]:
    """Every process started for this sandbox (it carries REPLQ_SANDBOX_DIR), prefork children included."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"REPLQ_SANDBOX_DIR={directory}".encode() in env:
            found.add(int(entry))
    return found


def mnt_ns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


@pytest.fixture(scope="module")
def sb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    if not sandbox_available():
        pytest.fail("the sandbox needs root, /dev/fuse and zfs-fuse (run scripts/setup.sh)")
    box = Sandbox(tmp_path_factory.mktemp("svc-sandbox"))
    try:
        box.up(nodes=2, services=True)
        yield box
    finally:
        box.down()


def test_services_running_workers_inside_their_nodes(sb: Sandbox) -> None:
    st = sb.status()
    assert {k for k, v in st["services"].items() if v["state"] == "up"} >= {"beat", "flower", "web", "metrics",
                                                                            "redis"}
    for name in sb.node_names():
        info = sb.node_info(name)
        worker = info["worker"]
        assert process_alive(worker)
        # The worker runs inside its node: the node's mount namespace and identity.
        assert mnt_ns(worker["pid"]) == mnt_ns(info["zfs"]["pid"]) != mnt_ns(os.getpid())
        env = Path(f"/proc/{worker['pid']}/environ").read_bytes().split(b"\0")
        assert f"REPLQ_NODE={name}".encode() in env
        assert next(n for n in st["nodes"] if n["name"] == name)["pids"]["worker"] == worker["pid"]
    for name in ("beat", "flower", "web", "metrics"):
        assert mnt_ns(sb.state["services"][name]["pid"]) == mnt_ns(os.getpid())


def test_flower_credentials_and_workers(sb: Sandbox) -> None:
    flower = sb.status()["flower"]
    assert set(flower) == {"url", "user", "password"} and len(flower["password"]) >= 12
    # Not on the command line, where `ps` would show it.
    cmdline = Path(f"/proc/{sb.state['services']['flower']['pid']}/cmdline").read_bytes()
    assert flower["password"].encode() not in cmdline
    api = flower["url"].rstrip("/") + "/api/workers?refresh=1"
    assert http(api)[0] == 401
    auth = (flower["user"], flower["password"])

    def both_workers() -> bool:
        code, body = http(api, auth)
        return code == 200 and {"replq@node1", "replq@node2"} <= set(json.loads(body or b"{}"))

    wait_for(both_workers, 60, "Flower to see both node workers")


def test_web_gui_with_generated_credentials(sb: Sandbox) -> None:
    r = subprocess.run([sys.executable, "-m", "replq", "sandbox", "status", "--dir", str(sb.dir), "--output-format",
                        "json"], capture_output=True, text=True, timeout=60, cwd=REPO)
    web = json.loads(r.stdout)["web"]
    assert set(web) == {"url", "user", "password"} and web["url"].startswith("http://127.0.0.1:")
    assert len(web["password"]) >= 12
    cmdline = Path(f"/proc/{sb.state['services']['web']['pid']}/cmdline").read_bytes()
    assert web["password"].encode() not in cmdline
    api = web["url"] + "api/nodes"
    assert http(web["url"])[0] == 200  # the login page
    assert http(api)[0] == 401
    code, body = http(api, (web["user"], web["password"]))
    assert code == 200 and [n["name"] for n in json.loads(body)] == ["node1", "node2"]


def test_metrics_service(sb: Sandbox) -> None:
    code, body = http(sb.state["metrics"]["url"])
    assert code == 200 and b"replq_up 1.0" in body


def test_start_again_is_idempotent_and_restarts_a_node_worker(sb: Sandbox) -> None:
    before = {k: dict(v) for k, v in sb.state["services"].items()}
    flower = dict(sb.state["flower"])
    assert services.start_sandbox_services(sb) == []
    assert sb.state["services"] == before

    old_worker = sb.node_info("node2")["worker"]
    web = dict(sb.state["web"])
    sb.stop_node("node2")
    assert not process_alive(old_worker) and "worker" not in sb.node_info("node2")
    sb.start_node("node2")
    assert services.start_sandbox_services(sb) == ["worker-node2"]
    new_worker = sb.node_info("node2")["worker"]
    assert process_alive(new_worker) and new_worker != old_worker
    assert mnt_ns(new_worker["pid"]) == mnt_ns(sb.node_info("node2")["zfs"]["pid"])
    assert sb.state["services"] == before and sb.state["flower"] == flower and sb.state["web"] == web


def test_down_leaves_no_service_process(sb: Sandbox) -> None:
    recs = [*sb.state["services"].values(), *(sb.node_info(n)["worker"] for n in sb.node_names())]
    pids = sandbox_processes(sb.dir)
    assert {r["pid"] for r in recs} <= pids
    assert len(pids) > len(recs)  # prefork children and node daemons are among them
    sb.down()
    assert not any(process_alive(r) for r in recs)
    assert sandbox_processes(sb.dir) == set()
    sb.down()  # repeatable
