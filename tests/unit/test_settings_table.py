"""The settings table (replq/settings.py): validators, process tunables, worker liveness."""

from __future__ import annotations

import pytest

from replq import settings
from replq.errors import ValidationError


def test_every_setting_has_a_doc_and_a_validator_that_rejects_garbage() -> None:
    for key, s in settings.SETTINGS.items():
        assert s.key == key and s.doc
        with pytest.raises(ValidationError, match=key):
            settings.check_setting(key, "\x01garbage")


@pytest.mark.parametrize(("text", "value"), [("60", 60), (" 10 ", 10), ("3600", 3600)])
def test_liveness_window(text: str, value: int) -> None:
    assert settings.check_setting("liveness_window", text) == value


@pytest.mark.parametrize("text", ["9", "3601", "x", "", "1e3"])
def test_liveness_window_refused(text: str) -> None:
    with pytest.raises(ValidationError, match="liveness_window"):
        settings.check_setting("liveness_window", text)


@pytest.mark.parametrize(("key", "text", "value"), [("stall_timeout", "15", 15), ("stall_timeout", "5", 5),
                                                   ("stall_timeout", "86400", 86400), ("retry_interval", "60", 60)])
def test_seconds(key: str, text: str, value: int) -> None:
    assert settings.check_setting(key, text) == value


@pytest.mark.parametrize(("key", "text"), [("stall_timeout", "4"), ("stall_timeout", "86401"),
                                           ("stall_timeout", "ten"), ("retry_interval", "59")])
def test_seconds_refused(key: str, text: str) -> None:
    with pytest.raises(ValidationError, match=key):
        settings.check_setting(key, text)


def test_defaults_complete_what_is_stored() -> None:
    out = settings.with_defaults({"retry_interval": 90})
    assert out["retry_interval"] == 90 and out["liveness_window"] == 60 and out["timezone"]
    assert out["stall_timeout"] == 600
    assert "notify_command" not in out  # optional settings are absent until set


def test_tunables_are_read_when_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPLQ_JOB_LOCK_TTL", raising=False)
    assert settings.tunable("job_lock_ttl") == 60.0
    monkeypatch.setenv("REPLQ_JOB_LOCK_TTL", "7.5")
    assert settings.tunable("job_lock_ttl") == 7.5
    for bad in ("0", "-3", "soon"):  # an unusable value falls back to the default
        monkeypatch.setenv("REPLQ_JOB_LOCK_TTL", bad)
        assert settings.tunable("job_lock_ttl") == 60.0


@pytest.mark.parametrize(("heartbeat", "now", "alive"), [(None, 100.0, False), (40.0, 100.0, True),
                                                         (39.9, 100.0, False), (100.0, 100.0, True)])
def test_worker_alive_within_the_window(heartbeat: float | None, now: float, alive: bool) -> None:
    assert settings.worker_alive(heartbeat, now, 60) is alive
