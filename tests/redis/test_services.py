"""start_sandbox_services without nodes: the host services (beat, Flower, the web GUI, metrics), idempotence,
stop by PID."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from replq.sandbox import Sandbox, process_alive, services


@pytest.fixture
def bare(tmp_path: Path, redis_url: str) -> Sandbox:
    """A sandbox description with a Redis and no nodes: enough for the host-side services."""
    sb = Sandbox(tmp_path / "sb")
    sb.dir.mkdir()
    sb.state = {"dir": str(sb.dir), "nodes": {}, "services": {}, "redis": {"url": redis_url}}
    sb.save()
    return sb


def test_host_services_start_once_and_stop_by_pid(bare: Sandbox) -> None:
    try:
        assert set(services.start_sandbox_services(bare)) == {"beat", "flower", "web", "metrics"}
        assert set(bare.state["services"]) == {"beat", "flower", "web", "metrics"}
        with urllib.request.urlopen(bare.state["metrics"]["url"], timeout=10) as r:
            assert b"replq_up 1.0" in r.read()
        recs = {k: dict(v) for k, v in bare.state["services"].items()}
        assert services.start_sandbox_services(bare) == []  # already running: nothing new
        assert bare.state["services"] == recs
        # Recorded where Sandbox.stop_services() finds them: stopped by PID.
        Sandbox(bare.dir).stop_services()
        assert not any(process_alive(r) for r in recs.values())
    finally:
        Sandbox(bare.dir).stop_services()


def test_flower_and_web_keep_credentials_and_port_across_restarts(bare: Sandbox) -> None:
    try:
        assert {"flower", "web"} <= set(services.start_sandbox_services(bare))
        first = {name: dict(bare.state[name]) for name in ("flower", "web")}
        assert set(first["flower"]) == set(first["web"]) == {"url", "user", "password"}
        assert first["flower"]["password"] != first["web"]["password"]
        Sandbox(bare.dir).stop_services()
        bare = Sandbox(bare.dir)
        assert {"flower", "web"} <= set(services.start_sandbox_services(bare))
        for name in ("flower", "web"):
            assert bare.state[name] == first[name]  # same URL and password after a restart
    finally:
        Sandbox(bare.dir).stop_services()
