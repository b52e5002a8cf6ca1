"""replq commands: calendar (preview a schedule, like `systemd-analyze calendar`)."""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo

import click

from replq import calendar
from replq.cli.base import emit, output_option
from replq.errors import ValidationError
from replq.views import calendar_preview

DEFAULT_ITERATIONS = 5
MAX_ITERATIONS = 1000


def _parse_from(text: str | None, zone: tzinfo) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValidationError(f"invalid --from '{text}': expected ISO 8601, e.g. 2026-01-03T15:00:00+01:00") from None
    if when.tzinfo is None:  # a wall-clock time in the preview's zone
        when = when.replace(tzinfo=zone)
    return when


def _stamp(when: datetime) -> str:
    return when.strftime("%a %Y-%m-%d %H:%M:%S ") + (when.tzname() or "")


def _text(ev: calendar.CalendarEvent, zone_name: str, events: list[datetime], problem: str | None) -> str:
    lines = []
    if ev.expression != ev.normalized:
        lines.append(f"  Original form: {ev.expression}")
    lines.append(f"Normalized form: {ev.normalized}")
    lines.append(f"      Time zone: {zone_name}")
    if not events:
        lines.append("    Next elapse: never")
    for i, when in enumerate(events):
        label = "Next elapse" if i == 0 else f"Iter. #{i + 1}"
        lines.append(f"{label:>15}: {_stamp(when)}")
        if when.utcoffset():
            lines.append(f"       (in UTC): {_stamp(when.astimezone(UTC))}")
    if problem:
        lines.append(f"    Job allowed: no - it {problem}")
    else:
        lines.append("    Job allowed: yes")
    return "\n".join(lines)


@click.command("calendar")
@click.argument("expression")
@click.option(
    "--from",
    "from_",
    metavar="ISO8601",
    help="List events strictly after this instant (default: now). Without a UTC offset it is read in --tz.",
)
@click.option(
    "--iterations",
    type=int,
    default=DEFAULT_ITERATIONS,
    show_default=True,
    metavar="N",
    help=f"How many events to list (1..{MAX_ITERATIONS}).",
)
@click.option("--tz", "tz", metavar="ZONE", help="IANA time zone, e.g. Europe/Berlin (default: the system's).")
@output_option
def calendar_cmd(expression: str, from_: str | None, iterations: int, tz: str | None, output_format: str) -> None:
    """Show the normalised form of a schedule EXPRESSION and its next events.

    EXPRESSION is a calendar event (SPEC §4), e.g. '*/15', 'mon..fri 8..17:00', 'weekly'.
    Also says whether a replication job may use it (at most once a minute, at least once a week).
    """
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise ValidationError(f"invalid --iterations {iterations}: must be 1..{MAX_ITERATIONS}")
    zone_name = tz if tz is not None else calendar.system_timezone()
    data, ev, events = calendar_preview(expression, zone_name, lambda zone: _parse_from(from_, zone), iterations)
    emit(data, output_format, lambda: _text(ev, data["timezone"], events, data["reason"]))
