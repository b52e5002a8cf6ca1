"""pvesr's own text output, byte for byte: `list`, `status` and `read` (pve-manager PVE/CLI/pvesr.pm).

    list    printf "%-20s %-20s %10s %5s %8s\\n": JobID, Target (local/<node>), Schedule (the
            default */15 when unset), Rate (as Perl prints the number, or -), Enabled (yes/no)
    status  printf "%-10s %-10s %-20s %20s %20s %10s %10s %s\\n": JobID, Enabled (Yes/No), Target,
            LastSync (%Y-%m-%d_%H:%M:%S or -), NextSync (the same, `pending` when due, - for
            never), Duration (the stored seconds as Perl prints them, or - before the first
            run), FailCount, State (OK, SYNCING, or the error). replq's `--progress` adds a
            running job's bytes, rate and ETA after SYNCING: not pvesr's format, so only on request
    read    to_json($job, {utf8, pretty, canonical}): JSON::XS's pretty form, keys sorted, three
            spaces of indent, `"key" : value`, only the properties that are set

Rows of list and status are sorted as pvesr sorts them: by job id as a string (the API's
`sort keys`), then stably by guest as a number: 100-0, 100-1, 100-10, 100-2, 101-0.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from replq.jobstate import state_cell, state_text
from replq.model import Job, JobState, format_rate, perl_number

LIST_FORMAT = "%-20s %-20s %10s %5s %8s"
STATUS_FORMAT = "%-10s %-10s %-20s %20s %20s %10s %10s %s"


def pvesr_order(jobs: Iterable[Any], key: Any = lambda j: j) -> list[Any]:
    """pvesr's row order: job ids sorted as strings, then (stably) by guest number."""
    by_id = sorted(jobs, key=lambda x: key(x).id)
    return sorted(by_id, key=lambda x: key(x).guest)


def list_text(jobs: Sequence[Job]) -> str:
    lines = [LIST_FORMAT % ("JobID", "Target", "Schedule", "Rate", "Enabled")]
    for j in pvesr_order(jobs):
        lines.append(LIST_FORMAT % (j.id, f"local/{j.target}", j.effective_schedule, format_rate(j.rate),
                                    "no" if j.disable else "yes"))
    return "\n".join(lines)


def timestamp(ts: float | None, tz: ZoneInfo) -> str:
    """strftime("%Y-%m-%d_%H:%M:%S") in the cluster's time zone, `-` for never."""
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d_%H:%M:%S")


def next_sync_text(next_sync: float | None, now: float, tz: ZoneInfo) -> str:
    if not next_sync:
        return "-"
    return timestamp(next_sync, tz) if next_sync > now else "pending"


def state_column(state: JobState, progress: bool = False) -> str:
    """OK, the error, or SYNCING; with `progress` (replq's option) SYNCING and its bytes, rate, ETA."""
    return state_cell(state) if progress else state_text(state)


def status_line(job: Job, state: JobState, next_sync: float | None, now: float, tz: ZoneInfo,
                progress: bool = False) -> str:
    return STATUS_FORMAT % (job.id, "No" if job.disable else "Yes", f"local/{job.target}",
                            timestamp(state.last_sync, tz), next_sync_text(next_sync, now, tz),
                            perl_number(state.duration) if state.duration else "-", state.fail_count,
                            state_column(state, progress))


def status_text(rows: Sequence[tuple[Job, JobState, float | None]], now: float, tz: ZoneInfo,
                progress: bool = False) -> str:
    """`rows`: each job with its state and the NextSync pvesr shows (for a disabled job too)."""
    lines = [STATUS_FORMAT % ("JobID", "Enabled", "Target", "LastSync", "NextSync", "Duration", "FailCount", "State")]
    lines += [status_line(j, s, ns, now, tz, progress) for j, s, ns in pvesr_order(rows, key=lambda r: r[0])]
    return "\n".join(lines)


def read_data(job: Job, digest: str) -> dict[str, Any]:
    """The job as pvesr's read returns it: its set properties, type, id, guest, jobnum, digest."""
    data: dict[str, Any] = {"type": "local", **job.config(), "guest": job.guest, "jobnum": job.jobnum,
                            "digest": digest}
    if job.disable:
        data["disable"] = 1
    return data


def pretty_json(value: Any, indent: int = 0) -> str:
    """JSON::XS->new->utf8->pretty->canonical: sorted keys, indent 3, ' : ', numbers as Perl
    prints them, non-ASCII as itself; the caller adds the final newline."""
    pad, inner = "   " * indent, "   " * (indent + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)} : {pretty_json(v, indent + 1)}"
                 for k, v in sorted(value.items())]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list | tuple):
        if not value:
            return "[]"
        return "[\n" + ",\n".join(f"{inner}{pretty_json(v, indent + 1)}" for v in value) + f"\n{pad}]"
    if isinstance(value, bool):
        return "1" if value else "0"  # Perl has no booleans: check_value stores 1/0
    if isinstance(value, float):
        return perl_number(value)
    if value is None:
        return "null"
    return json.dumps(value, ensure_ascii=False)
