"""What the command line and the web API both show and both read about jobs and nodes, so that
`replq list`, `read`, `node list`, `update` and `calendar` mean the same as /api/ does.

    job_row        one job as `list --output-format json` prints it
    read_record    one job as `read` prints it, with the digest for `update --digest`
    node_row       one node as `node list --output-format json` prints it
    check_digest   a digest argument (40 hex digits) before the store compares it
    property_list  the `--delete` list of properties to unset
    calendar_preview  the normalised form and next events of a schedule (`replq calendar`)
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, tzinfo
from typing import Any

from replq import calendar
from replq.errors import ValidationError
from replq.model import Job, Node, host_key_fingerprint, show
from replq.store import job_digest


def job_row(job: Job) -> dict[str, Any]:
    return {"id": job.id, "type": "local", "guest": job.guest, "jobnum": job.jobnum, "target": job.target,
            "schedule": job.schedule, "rate": job.rate, "enabled": not job.disable, "comment": job.comment,
            "source": job.source, "remove_job": job.remove_job}


def read_record(job: Job) -> dict[str, Any]:
    data = {"id": job.id, "type": "local", "guest": job.guest, "jobnum": job.jobnum, **job.config(),
            "digest": job_digest(job)}
    data.pop("disable", None)
    data["disable"] = job.disable
    if job.rate is not None:
        data["rate"] = job.rate
    return data


def node_row(n: Node) -> dict[str, Any]:
    return {**n.to_dict(), "fingerprint": host_key_fingerprint(n.host_key) if n.host_key else None}


def check_digest(digest: str, what: str) -> str:
    if not (len(digest) == 40 and all(c in "0123456789abcdef" for c in digest)):
        raise ValidationError(f"{what}: invalid digest '{show(digest)}' (40 hex digits, as `read` prints)")
    return digest


def property_list(text: str, what: str) -> list[str]:
    props = [p.strip() for p in text.split(",")]
    if any(not p for p in props):
        raise ValidationError(f"{what}: invalid property list '{show(text)}'")
    return props


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
