"""Failure notification: tell an operator that a replication job failed, without nagging.

The worker task calls `job_failed(store, job_id)` after a failed run. If a hook is configured,
it is called at fail_count 1, 2 and 3, then only at every `notify_every`-th consecutive failure
(default 10: with the 30-minute retry interval, every five hours), so a job stuck in error
state does not page someone on every retry forever.

Configuration:
    REPLQ_NOTIFY_COMMAND  the program to run, from the environment of this node's service only
                          (/etc/replq/replq.env), never from Redis: whoever can write to Redis
                          must not choose what runs as root. Split into words like a shell
                          would, never run by one; the program must be root's alone (hooks.py).
                          Its environment is clean (hooks.clean_environment) plus the facts:
                          REPLQ_EVENT, REPLQ_JOB_ID, REPLQ_JOB_GUEST, REPLQ_JOB_TARGET,
                          REPLQ_JOB_SOURCE, REPLQ_FAIL_COUNT, REPLQ_ERROR, REPLQ_LAST_TRY.
    notify_url            cluster setting (else REPLQ_NOTIFY_URL): an http(s) URL that
                          receives the same facts as a JSON POST.
    notify_every          cluster setting (else REPLQ_NOTIFY_EVERY): after the third failure,
                          notify every N-th (default 10, min 1).
A `notify_command` left in the cluster settings by an older replq is ignored with a warning.

A hook that fails or hangs is logged and given up on (short timeouts); it never fails the task.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
import urllib.error
import urllib.request
from typing import Any

from replq import hooks
from replq.errors import UntrustedProgram
from replq.redact import mask_url
from replq.settings import SETTINGS

log = logging.getLogger("replq.notify")

COMMAND_TIMEOUT = 20.0
WEBHOOK_TIMEOUT = 5.0
FIRST_NOTIFICATIONS = 3
DEFAULT_EVERY = 10


def should_notify(fail_count: int, every: int = DEFAULT_EVERY) -> bool:
    """1, 2, 3, then every `every`-th consecutive failure."""
    if fail_count <= 0:
        return False
    return fail_count <= FIRST_NOTIFICATIONS or fail_count % max(1, every) == 0


COMMAND_ENV = "REPLQ_NOTIFY_COMMAND"


def _with_env(settings: dict[str, Any]) -> dict[str, Any]:
    """Cluster settings win; a worker's environment (e.g. /etc/replq/replq.env) fills the gaps."""
    out = dict(settings)
    for key in ("notify_url", "notify_every"):
        env = SETTINGS[key].env
        if out.get(key) in (None, "", []) and env:
            value = os.environ.get(env)
            if value:
                out[key] = value
    return out


def node_command() -> list[str] | None:
    """The notification program of this node (REPLQ_NOTIFY_COMMAND), as argv; None if unset or unusable."""
    raw = os.environ.get(COMMAND_ENV, "")
    try:
        return shlex.split(raw) or None
    except ValueError:
        log.warning("%s: cannot split %r into words; ignored", COMMAND_ENV, raw)
        return None


def hook_settings(settings: dict[str, Any]) -> tuple[list[str] | None, str | None, int]:
    """(command argv from this node, webhook URL, every) from the settings (or environment);
    invalid values are ignored."""
    settings = _with_env(settings)
    url = settings.get("notify_url")
    if not (isinstance(url, str) and url.lower().startswith(("http://", "https://"))):
        if url:
            log.warning("notify_url: only http:// and https:// URLs are used; ignored %s", mask_url(str(url)))
        url = None
    try:
        every = max(1, int(settings.get("notify_every") or DEFAULT_EVERY))
    except (TypeError, ValueError):
        every = DEFAULT_EVERY
    return node_command(), url, every


def failure_facts(store: Any, job_id: str) -> dict[str, Any]:
    """What a notification says: the job, where it replicates from and to, and why it failed."""
    job = store.get_job(job_id)
    state = store.get_state(job_id)
    try:
        source = store.get_guest(job.guest).node
    except Exception:  # noqa: BLE001 - the guest may be gone (purge); the job's source still tells
        source = job.source
    return {
        "event": "job_failed",
        "job": job_id,
        "guest": job.guest,
        "target": job.target,
        "source": source or "",
        "fail_count": state.fail_count,
        "error": state.error or "",
        "last_try": state.last_try,
        "time": time.time(),
    }


def job_failed(store: Any, job_id: str) -> list[str]:
    """Call the configured hooks if this failure is one to report; returns the hooks called.

    Never raises: a notification problem must not turn into a task failure or a retry storm.
    """
    try:
        if "notify_command" in store.retired_settings():
            log.warning("notify_command in the cluster settings is ignored: the notification program is set on "
                        "each node (%s in /etc/replq/replq.env)", COMMAND_ENV)
        command, url, every = hook_settings(store.get_settings())
        if not command and not url:
            return []
        facts = failure_facts(store, job_id)
    except Exception as exc:  # noqa: BLE001
        log.warning("notify %s: cannot read the job's state: %s", job_id, exc)
        return []
    if not should_notify(int(facts["fail_count"] or 0), every):
        return []
    called = []
    if command and run_command(command, facts):
        called.append("command")
    if url and post_webhook(url, facts):
        called.append("webhook")
    return called


def _env(facts: dict[str, Any]) -> dict[str, str]:
    return hooks.clean_environment({
        "REPLQ_EVENT": facts["event"],
        "REPLQ_JOB_ID": facts["job"],
        "REPLQ_JOB_GUEST": facts["guest"],
        "REPLQ_JOB_TARGET": facts["target"],
        "REPLQ_JOB_SOURCE": facts["source"],
        "REPLQ_FAIL_COUNT": facts["fail_count"],
        "REPLQ_ERROR": facts["error"],
        "REPLQ_LAST_TRY": int(facts["last_try"] or 0),
    })


def run_command(argv: list[str], facts: dict[str, Any], timeout: float = COMMAND_TIMEOUT) -> bool:
    """Run the node's notification program (root's alone, no shell, clean environment); True if it
    exited 0. A hung program is killed with its children."""
    try:
        ok, why = hooks.run_program(argv, _env(facts), timeout)
    except UntrustedProgram as exc:
        ok, why = False, str(exc)
    if not ok:
        log.warning("notify %s: %s", facts["job"], why)
    return ok


def post_webhook(url: str, facts: dict[str, Any], timeout: float = WEBHOOK_TIMEOUT) -> bool:
    """POST the facts as JSON; True on a 2xx answer."""
    body = json.dumps(facts).encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "replq-notify"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - scheme checked above
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("notify %s: webhook %s failed: %s", facts["job"], mask_url(url), exc)
        return False

