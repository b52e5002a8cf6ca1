"""Where commands find Redis and the sandbox: a stale sandbox pointer is not trusted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from replq import context


def test_pointer_to_a_live_sandbox_gives_its_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLQ_STATE_DIR", str(tmp_path / "state"))
    sb = tmp_path / "sb"
    sb.mkdir()
    (sb / "sandbox.json").write_text("{}")
    context.sandbox_pointer().parent.mkdir(parents=True)
    context.sandbox_pointer().write_text(json.dumps({"dir": str(sb), "redis_url": "redis://127.0.0.1:7777/0"}))
    assert context.redis_url() == "redis://127.0.0.1:7777/0"
    assert context.redis_url("redis://explicit:1/0") == "redis://explicit:1/0"
    monkeypatch.setenv("REPLQ_REDIS_URL", "redis://env:2/0")
    assert context.redis_url() == "redis://env:2/0"


def test_stale_pointer_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLQ_STATE_DIR", str(tmp_path / "state"))
    context.sandbox_pointer().parent.mkdir(parents=True)
    context.sandbox_pointer().write_text(json.dumps({"dir": str(tmp_path / "gone"), "redis_url": "redis://x:1/0"}))
    assert context.sandbox_info() is None
    assert context.redis_url() == context.DEFAULT_REDIS_URL
    context.sandbox_pointer().write_text("not json")
    assert context.sandbox_info() is None
