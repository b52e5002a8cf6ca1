"""Shared fixtures: a private redis-server per test session (never the machine's :6379)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from tests.redisproc import RedisProcess


@pytest.fixture(autouse=True)
def _isolated_replq_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never pick up a developer's sandbox or Redis settings by accident."""
    monkeypatch.setenv("REPLQ_STATE_DIR", str(tmp_path_factory.getbasetemp() / "replq-state"))
    monkeypatch.delenv("REPLQ_REDIS_URL", raising=False)
    monkeypatch.delenv("REPLQ_NODE", raising=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis"), aof=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty database on the session's redis-server, also exported as REPLQ_REDIS_URL."""
    if redis_server.proc is None:  # a test killed it: bring it back
        redis_server.start()
    redis.Redis.from_url(redis_server.url).flushall()
    monkeypatch.setenv("REPLQ_REDIS_URL", redis_server.url)
    return redis_server.url


def pytest_report_header(config: pytest.Config) -> str:
    return f"replq tests as uid {os.getuid()}"
