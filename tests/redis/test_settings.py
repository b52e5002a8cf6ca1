"""Cluster settings read by the services: validated on the way in, empty unsets."""

from __future__ import annotations

import pytest

from replq.errors import ValidationError
from replq.notify import hook_settings
from replq.store import Store


def test_hook_settings_round_trip_and_unset(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store.from_url(redis_url)
    monkeypatch.setenv("REPLQ_NOTIFY_COMMAND", "/usr/bin/logger -t replq")  # the node's, not the cluster's
    store.set_setting("notify_url", "https://hooks.example.test/replq")
    store.set_setting("notify_every", "5")
    command, url, every = hook_settings(store.get_settings())
    assert command == ["/usr/bin/logger", "-t", "replq"]
    assert url == "https://hooks.example.test/replq"
    assert every == 5
    store.set_setting("notify_url", "")
    assert "notify_url" not in store.get_settings()
    assert store.get_settings()["retry_interval"] == 1800


@pytest.mark.parametrize(("key", "value", "message"), [
    ("notify_url", "ftp://host/x", r"not an http\(s\) URL"),
    ("notify_url", "http://", r"not an http\(s\) URL"),
    ("notify_command", "/usr/bin/logger", "not a cluster setting"),
    ("notify_url", "https://h/x\nrm -rf /", "control characters"),
    ("notify_every", "0", "from 1 to 1000000"),
    ("flower_user", "a b", "flower_user"),
    ("flower_password", "short", "at least 8"),
    ("no_such_key", "1", "unknown setting"),
])
def test_bad_settings_are_refused_and_nothing_is_written(redis_url: str, key: str, value: str, message: str) -> None:
    store = Store.from_url(redis_url)
    before = store.get_settings()
    with pytest.raises(ValidationError, match=message):
        store.set_setting(key, value)
    assert store.get_settings() == before


def test_negative_value_is_a_value_not_an_option(redis_url: str) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "replq", "settings", "set", "retry_interval", "-5"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == "replq: retry_interval: value must be between 60 and 604800 seconds"
