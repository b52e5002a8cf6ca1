"""Shared fixtures and the test tiers.

    tests/unit/     pure modules and the CLI without services          (marker: unit)
    tests/redis/    against a real redis-server (and local sshd, Celery workers)  (marker: redis)
    tests/cluster/  on the sandbox cluster: real zfs-fuse, sshd, Redis, workers   (marker: sandbox)

Markers are applied per folder, so `pytest -m unit` runs the fast tier alone. Every test
that needs Redis gets a private redis-server (never the machine's :6379).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from replq.sandbox import Sandbox
from tests.support.cluster import sandbox_available
from tests.support.redisproc import RedisProcess

# Set before any fixture runs (session fixtures come first): a sandbox started by the tests
# must never replace the pointer to a developer's own sandbox.
os.environ["REPLQ_STATE_DIR"] = tempfile.mkdtemp(prefix="replq-test-state-")
os.environ.pop("REPLQ_SANDBOX_DIR", None)

TIERS = {"unit": "unit", "redis": "redis", "cluster": "sandbox"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        tier = Path(item.fspath).relative_to(here).parts[0]
        if tier in TIERS:
            item.add_marker(TIERS[tier])


@pytest.fixture(autouse=True)
def _isolated_replq_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never pick up a developer's sandbox or Redis settings by accident."""
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


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A 3-node sandbox cluster shared by the session (no Celery services), taken down at the end.

    Tests that stop a node start it again; each module names its guests from its own VMID range
    (tests/support/cluster.py).
    """
    if not sandbox_available():
        pytest.fail("the sandbox needs root, /dev/fuse and zfs-fuse (run scripts/setup.sh)")
    sb = Sandbox(tmp_path_factory.mktemp("sandbox"))
    sb.up(nodes=3, services=False)
    try:
        yield sb
    finally:
        sb.down()


def pytest_report_header(config: pytest.Config) -> str:
    return f"replq tests as uid {os.getuid()}"
