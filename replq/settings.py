"""Every knob of replq in one place (in the spirit of Celery's app/defaults.py).

Cluster settings live in the store (`replq settings set KEY VALUE`) and apply to every node;
each has a default, a validator that turns the operator's text into its typed value, whether
changing it moves next_sync (the store then recomputes the schedule index), and optionally an
environment variable of a node's service that fills it when the cluster leaves it unset.

Process tunables are per process, from the environment, read when used (never at import, so a
test or a unit file can set them for the processes it starts): lock TTLs, the beat's tick and
sweep interval, the expiry of enqueued messages.
"""

from __future__ import annotations

import os
import re
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from replq.calendar import system_timezone
from replq.errors import ValidationError
from replq.model import show
from replq.passwords import hash_password, is_hash
from replq.redact import HIDDEN, mask_url

DEFAULT_RETRY_INTERVAL = 1800
DEFAULT_STALL_TIMEOUT = 600


# ---------------------------------------------------------------------------------- validators


def _seconds(key: str, lo: int, hi: int) -> Callable[[str], int]:
    """A whole number of seconds from lo to hi."""

    def check(text: str) -> int:
        try:
            v = int(text.strip())
        except ValueError:
            raise ValidationError(f"{key}: invalid integer '{show(text)}' (seconds)") from None
        if not lo <= v <= hi:
            raise ValidationError(f"{key}: value must be between {lo} and {hi} seconds")
        return v

    return check


def _timezone(text: str) -> str:
    try:
        if not text or text.startswith("/") or ".." in text:
            raise ValueError(text)
        zoneinfo.ZoneInfo(text)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError, OSError):
        raise ValidationError(f"timezone: unknown time zone '{show(text)}'") from None
    return text


def _notify_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or " " in text:
        raise ValidationError(f"notify_url: not an http(s) URL '{show(text)}'")
    return text


def _positive_int(key: str) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            v = int(text.strip())
        except ValueError:
            v = 0
        if not 1 <= v <= 1_000_000:
            raise ValidationError(f"{key}: must be an integer from 1 to 1000000")
        return v

    return check


def _login_user(key: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", text):
            raise ValidationError(f"{key}: 1-64 characters of letters, digits, _ . @ -")
        return text

    return check


def _flower_password(text: str) -> str:
    if len(text) < 8 or ":" in text or " " in text:
        raise ValidationError("flower_password: at least 8 characters, no ':' or spaces")
    return text


def _web_password(text: str) -> str:
    """Stored as a salted scrypt hash; a value that already is one (a restored backup) stays as is."""
    if is_hash(text):
        return text
    if len(text) < 8:
        raise ValidationError("web_password: at least 8 characters")
    return hash_password(text)


# ---------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any  # None: unset unless the operator sets it
    check: Callable[[str], Any]
    doc: str
    scheduling: bool = False  # changing it moves next_sync: the store reindexes every job
    env: str | None = None  # a service's environment variable that fills it when unset
    optional: bool = False  # an empty value unsets it
    shown: Callable[[Any], Any] | None = None  # how `settings show` shows a secret (masked)


SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting("retry_interval", DEFAULT_RETRY_INTERVAL, _seconds("retry_interval", 60, 7 * 86400),
                "seconds between retries of a job in error state (60..604800)", scheduling=True),
        Setting("timezone", None, _timezone,
                "time zone of calendar events and of every time shown (default: the system's)", scheduling=True),
        Setting("liveness_window", 60, _seconds("liveness_window", 10, 3600),
                "a node whose worker sent a heartbeat within this many seconds is alive (10..3600)"),
        Setting("stall_timeout", DEFAULT_STALL_TIMEOUT, _seconds("stall_timeout", 5, 86400),
                "a transfer that makes no progress for this many seconds is aborted as stalled (5..86400)"),
        Setting("notify_url", None, _notify_url, "http(s) URL that receives a JSON POST when a job fails",
                env="REPLQ_NOTIFY_URL", optional=True, shown=lambda v: mask_url(str(v))),
        Setting("notify_every", None, _positive_int("notify_every"),
                "after the third consecutive failure, notify every N-th (default 10)", env="REPLQ_NOTIFY_EVERY",
                optional=True),
        Setting("flower_user", None, _login_user("flower_user"), "Flower's basic-auth user", optional=True),
        Setting("flower_password", None, _flower_password, "Flower's basic-auth password", optional=True,
                shown=lambda v: HIDDEN),
        Setting("web_user", None, _login_user("web_user"), "the web GUI's user", optional=True),
        Setting("web_password", None, _web_password, "the web GUI's password (stored as a salted scrypt hash)",
                optional=True, shown=lambda v: HIDDEN),
    )
}


# Keys that were cluster settings once; a stored value is ignored (and may be unset with '').
RETIRED = {
    "notify_command": "notify_command is not a cluster setting: a program that runs as root is set on each node "
                      "(REPLQ_NOTIFY_COMMAND in /etc/replq/replq.env)",
}


def check_setting(key: str, value: Any) -> Any:
    """Validate one cluster setting; returns the typed value, or None when an optional setting
    is given an empty value (it is then unset)."""
    setting = SETTINGS.get(key)
    if key in RETIRED and str(value).strip() == "":
        return None
    if key in RETIRED:
        raise ValidationError(RETIRED[key])
    if setting is None:
        raise ValidationError(f"unknown setting '{show(key)}' (known: {', '.join(SETTINGS)})")
    text = str(value)
    if setting.optional and text.strip() == "":
        return None
    if len(text) > 4096 or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValidationError(f"{key}: control characters or more than 4096 characters")
    return setting.check(text)


def with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """The stored settings completed by their defaults (timezone: the system's); stored keys
    that are not settings (RETIRED ones) are left out."""
    out = {k: s.default for k, s in SETTINGS.items() if s.default is not None}
    out.update((k, v) for k, v in stored.items() if k in SETTINGS)
    if not out.get("timezone"):
        out["timezone"] = system_timezone()
    return out


def masked(values: dict[str, Any]) -> dict[str, Any]:
    """The settings as `settings show` prints them: secrets masked (a webhook URL keeps its host)."""
    out = {}
    for key, value in values.items():
        setting = SETTINGS.get(key)
        out[key] = setting.shown(value) if setting and setting.shown and value is not None else value
    return out


def changes_schedule(key: str) -> bool:
    return SETTINGS[key].scheduling


# ---------------------------------------------------------------------------------- tunables


@dataclass(frozen=True)
class Tunable:
    env: str
    default: float
    doc: str


TUNABLES: dict[str, Tunable] = {
    "guest_lock_ttl": Tunable("REPLQ_GUEST_LOCK_TTL", 30.0,
                              "s a dead engine's guest lock lives; a live one renews it every third"),
    "job_lock_ttl": Tunable("REPLQ_JOB_LOCK_TTL", 60.0, "s a dead worker's job lock lives"),
    "beat_tick": Tunable("REPLQ_BEAT_TICK", 1.0, "s between two scheduling ticks"),
    "beat_lock_ttl": Tunable("REPLQ_BEAT_LOCK_TTL", 30.0, "s until a standby beat takes over a dead active one"),
    "sweep_interval": Tunable("REPLQ_SWEEP_INTERVAL", 30.0, "s between sweeps for runs interrupted by a dead worker"),
    "enqueue_expires": Tunable("REPLQ_ENQUEUE_EXPIRES", 3600.0, "s an enqueued job waits for its worker"),
    "heartbeat_interval": Tunable("REPLQ_HEARTBEAT_INTERVAL", 10.0, "s between two heartbeats of a worker"),
}


def tunable(name: str) -> float:
    """The tunable's value from this process's environment (positive), else its default."""
    t = TUNABLES[name]
    raw = os.environ.get(t.env)
    if raw:
        try:
            value = float(raw)
            if value > 0:
                return value
        except ValueError:
            pass
    return t.default


def worker_alive(heartbeat: float | None, now: float, window: float) -> bool:
    """A node's worker is alive if it sent a heartbeat within `window` seconds of `now`."""
    return heartbeat is not None and now - heartbeat <= window
