"""Property tests (hypothesis): events are increasing, match, and none is skipped (brute-force scan)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replq.calendar import CalendarError, CalendarEvent, chain_values, job_limit_problem, parse

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BOUNDS = {"year": (2026, 2030), "month": (1, 12), "day": (1, 31), "hour": (0, 23), "minute": (0, 59), "second": (0, 59)}
NAMES = ["mon", "tue", "wed", "thu", "fri", "sat", "sun", "Monday", "FRIDAY", "Sunday"]


@st.composite
def item(draw: st.DrawFn, field: str) -> str:
    lo, hi = BOUNDS[field]
    n = draw(st.integers(lo, hi))
    kind = draw(st.sampled_from(["*", "*/R", "N", "N..M", "N/R", "N..M/R"] if field != "year" else ["*", "N", "N..M"]))
    if kind == "*":
        return "*"
    if kind == "N":
        return str(n)
    r = draw(st.integers(1, min(hi - lo, 30)))
    if kind == "*/R":
        return f"*/{r}"
    if kind == "N/R":
        return f"{n}/{r}"
    m = draw(st.integers(n, hi))
    return f"{n}..{m}" if kind == "N..M" else f"{n}..{m}/{r}"


def comp(field: str, size: int = 3) -> st.SearchStrategy[str]:
    return st.lists(item(field), min_size=1, max_size=size).map(",".join)


@st.composite
def expressions(draw: st.DrawFn) -> str:
    parts = []
    if draw(st.booleans()):
        days = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=2))
        if draw(st.booleans()):
            days = [f"{days[0]}..{draw(st.sampled_from(NAMES))}"] + days[1:]
        parts.append(",".join(days))
    if draw(st.booleans()):
        date = f"{draw(comp('month'))}-{draw(comp('day'))}"
        if draw(st.integers(0, 4)) == 0:
            date = f"{draw(comp('year', 2))}-{date}"
        parts.append(date)
    shape = draw(st.integers(0 if parts else 1, 3))
    if shape == 1:
        parts.append(draw(comp("minute")))
    elif shape == 2:
        parts.append(f"{draw(comp('hour'))}:{draw(comp('minute'))}")
    elif shape == 3:
        parts.append(f"{draw(comp('hour'))}:{draw(comp('minute'))}:{draw(comp('second', 2))}")
    return " ".join(parts)


instants = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2030, 12, 31)).map(
    lambda d: d.replace(tzinfo=UTC)
)


def brute_force(ev: CalendarEvent, start: datetime, end: datetime) -> list[datetime]:
    """Every whole second in (start, end] that matches, by scanning minute by minute (UTC).

    Matching here uses the expanded value sets (chain_values), not the engine's arithmetic."""
    sets = {f: set(chain_values(getattr(ev, f), f)) for f in ("year", "month", "day", "hour", "minute")}
    seconds = chain_values(ev.second, "second")
    out = []
    t0 = int(start.timestamp()) // 60 * 60
    for m in range(t0, int(end.timestamp()) + 1, 60):
        g = time.gmtime(m)
        if (
            g.tm_year in sets["year"]
            and g.tm_mon in sets["month"]
            and g.tm_mday in sets["day"]
            and g.tm_hour in sets["hour"]
            and g.tm_min in sets["minute"]
            and ev.weekdays & (1 << g.tm_wday)
        ):
            out.extend(
                datetime.fromtimestamp(m + s, UTC) for s in seconds if start.timestamp() < m + s <= end.timestamp()
            )
    return out


def systemd_may_skip(ev: CalendarEvent, when: datetime) -> bool:
    """systemd (and so replq) skips the first matches of a larger unit when a repetition overshoots
    across two units: after 23:56, `*:0/7` next fires at 00:07, not 00:00; after Dec 29, `*-*/7` next
    fires on Jan 8. tm_within_bounds() resets only the unit just below the highest one that changed."""

    def open_repeat(chain: tuple[tuple[int, int, int], ...]) -> bool:
        return any(r and stop < 0 for _, stop, r in chain)

    return (
        (open_repeat(ev.second) and when.minute == 0)
        or (open_repeat(ev.minute) and when.hour == 0)
        or (open_repeat(ev.hour) and when.day == 1)
        or (open_repeat(ev.day) and when.month == 1)
    )


@SETTINGS
@given(expr=expressions(), after=instants)
def test_events_are_exactly_the_matching_seconds_utc(expr: str, after: datetime) -> None:
    ev = parse(expr)
    end = after + timedelta(days=1)
    got: list[datetime] = []
    when: datetime | None = after
    while True:
        when = ev.next_event(when, "UTC")  # type: ignore[arg-type]
        if when is None or when > end:
            break
        got.append(when)
        if len(got) >= 600:  # a per-second schedule: a few minutes are enough
            end = got[-1]
            break
    assert all(a < b for a, b in zip(got, got[1:], strict=False))
    assert all(ev.matches(g) for g in got)
    expected = brute_force(ev, after, end)
    assert set(got) <= set(expected)
    missed = [m for m in expected if m not in set(got)]
    assert all(systemd_may_skip(ev, m) for m in missed), (expr, missed[:3])


@SETTINGS
@given(
    expr=expressions(),
    after=instants,
    zone=st.sampled_from(["Europe/Berlin", "America/New_York", "Europe/Dublin", "Australia/Lord_Howe"]),
)
def test_events_in_dst_zones(expr: str, after: datetime, zone: str) -> None:
    """Increasing and matching in wall time; a skipped match is only ever a second pass of a repeated hour."""
    ev = parse(expr)
    tz = ZoneInfo(zone)
    events = ev.events(after, zone, 30)
    assert all(a < b for a, b in zip(events, events[1:], strict=False))
    for e in events:
        assert e > after and e.tzinfo is not None
        assert ev.matches(e.astimezone(tz))
    per_second = len(chain_values(ev.second, "second")) > 1
    window = timedelta(hours=1 if per_second else 30)
    if len(events) >= 2 and events[-1] - events[0] <= window:
        # every matching instant between the first and the last event is listed, unless its wall
        # time also happened an hour earlier (systemd fires a repeated local time once)
        listed = {e.timestamp() for e in events}
        t = events[0].astimezone(UTC)  # step real time, not wall time
        while t < events[-1]:
            local = t.astimezone(tz)
            if ev.matches(local) and t.timestamp() not in listed:
                assert local.fold == 1 or systemd_may_skip(ev, local), (expr, t)
            t += timedelta(seconds=1 if per_second else 60)


@SETTINGS
@given(expr=expressions(), after=instants)
def test_job_allowed_schedules_fire_within_a_week(expr: str, after: datetime) -> None:
    ev = parse(expr)
    if job_limit_problem(ev, "UTC") is not None:
        return
    events = [after, *ev.events(after, "UTC", 12)]
    assert len(events) == 13
    assert all(b - a <= timedelta(days=7) for a, b in zip(events, events[1:], strict=False))
    assert len({e.replace(second=0) for e in events[1:]}) == 12  # at most once a minute


@SETTINGS
@given(expr=expressions())
def test_normalized_form_round_trips(expr: str) -> None:
    ev = parse(expr)
    again = parse(ev.normalized)
    assert again.normalized == ev.normalized
    fields = ("weekdays", "year", "month", "day", "hour", "minute", "second", "utc")
    assert [getattr(again, f) for f in fields] == [getattr(ev, f) for f in fields]


def _parse_or_error(text: str) -> None:
    try:
        ev = parse(text)
    except CalendarError as exc:
        assert str(exc)
        assert "\n" not in str(exc)
        return
    assert parse(ev.normalized).normalized == ev.normalized


@settings(max_examples=400, deadline=None)
@given(text=st.text(max_size=60))
def test_arbitrary_text_only_raises_calendar_error(text: str) -> None:
    _parse_or_error(text)


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet="0123456789*/.,:- \tmonfriSatuUTCweklydh", max_size=40))
def test_grammar_like_text_only_raises_calendar_error(text: str) -> None:
    _parse_or_error(text)
