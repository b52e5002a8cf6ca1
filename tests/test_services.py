"""start_sandbox_services without nodes: what it starts when runtime commands are missing, and idempotence."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from replq import services
from replq.sandbox import Sandbox, process_alive


@pytest.fixture
def bare(tmp_path: Path, redis_url: str) -> Sandbox:
    """A sandbox description with a Redis and no nodes: enough for the host-side services."""
    sb = Sandbox(tmp_path / "sb")
    sb.dir.mkdir()
    sb.state = {"dir": str(sb.dir), "nodes": {}, "services": {}, "redis": {"url": redis_url}}
    sb.save()
    return sb


def test_missing_runtime_commands_are_skipped_with_a_message(bare: Sandbox, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(services, "available_commands", lambda: {"metrics"})
    try:
        assert services.start_sandbox_services(bare) == ["metrics"]
        err = capsys.readouterr().err
        assert "not starting worker, beat, flower" in err and err.count("\n") == 1
        assert set(bare.state["services"]) == {"metrics"} and "flower" not in bare.state
        with urllib.request.urlopen(bare.state["metrics"]["url"], timeout=10) as r:
            assert b"replq_up 1.0" in r.read()
        rec = dict(bare.state["services"]["metrics"])
        assert services.start_sandbox_services(bare, quiet=True) == []  # already running
        assert bare.state["services"]["metrics"] == rec
        # Recorded where Sandbox.stop_services() finds it: stopped by PID.
        Sandbox(bare.dir).stop_services()
        assert not process_alive(rec)
    finally:
        Sandbox(bare.dir).stop_services()


def test_flower_keeps_credentials_and_port_across_restarts(bare: Sandbox) -> None:
    if "flower" not in services.available_commands():
        pytest.fail("replq flower needs replq.app")
    try:
        assert "flower" in services.start_sandbox_services(bare, quiet=True)
        first = dict(bare.state["flower"])
        assert set(first) == {"url", "user", "password"}
        Sandbox(bare.dir).stop_services()
        bare = Sandbox(bare.dir)
        assert "flower" in services.start_sandbox_services(bare, quiet=True)
        assert bare.state["flower"] == first  # same URL and password after a restart
    finally:
        Sandbox(bare.dir).stop_services()
