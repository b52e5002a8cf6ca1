"""What the command line and the web API both show and both read about jobs, so that `replq
read`, `update` and `calendar` mean the same as /api/ does (the list rows are in rows.py).

    read_record    one job as the web API shows it, with the digest for an update
    check_digest   a digest argument (40 hex digits) before the store compares it
    split_list     a list option's items, as PVE::Tools::split_list reads them (`--delete a,b`)
    calendar_preview  the normalised form and next events of a schedule (`replq calendar`)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, tzinfo
from typing import Any

from replq import calendar
from replq.errors import ValidationError
from replq.model import Job, show
from replq.store import job_digest


def read_record(job: Job) -> dict[str, Any]:
    """One job as the web API shows and edits it: every property with its value in force (the
    schedule too when unset: */15), `disable` always, and the digest for an update."""
    data = {"id": job.id, "type": "local", "guest": job.guest, "jobnum": job.jobnum, **job.config(),
            "schedule": job.effective_schedule, "digest": job_digest(job)}
    data.pop("disable", None)
    data["disable"] = job.disable
    if job.rate is not None:
        data["rate"] = job.rate
    return data


def check_digest(digest: str, what: str) -> str:
    if not (len(digest) == 40 and all(c in "0123456789abcdef" for c in digest)):
        raise ValidationError(f"{what}: invalid digest '{show(digest)}' (40 hex digits, as `read` prints)")
    return digest


def split_list(text: str | None) -> list[str]:
    """PVE::Tools::split_list: a list option's items, separated by ',', ';' or blanks (or NUL)."""
    if not text:
        return []
    if "\x00" in text:
        return [item for item in text.split("\x00") if item]
    return re.sub(r"[,;]", " ", text).split()



def calendar_preview(expression: str, zone_name: str, after: Callable[[tzinfo], datetime], iterations: int
                     ) -> tuple[dict[str, Any], calendar.CalendarEvent, list[datetime]]:
    """`replq calendar`'s data: the normalised expression, its next events after `after(zone)` in
    the zone, and whether a job may use it (and if not, why)."""
    ev = calendar.parse(expression)
    zone = calendar.resolve_zone(zone_name)
    events = ev.events(after(zone), zone, iterations)
    problem = calendar.job_limit_problem(ev, zone)
    data = {
        "expression": ev.expression,
        "normalized": ev.normalized,
        "timezone": "UTC" if ev.utc else zone_name,
        "events": [when.isoformat() for when in events],
        "job_ok": problem is None,
        "reason": problem,
    }
    return data, ev, events
