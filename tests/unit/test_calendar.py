"""Calendar events: SPEC §4 and seed examples with hand-computed events, errors, job limits, DST, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from replq.calendar import (
    CalendarError,
    CalendarEvent,
    job_limit_problem,
    next_event_epoch,
    parse,
    system_timezone,
    validate_job_schedule,
)
from replq.errors import ValidationError

ROOT = Path(__file__).resolve().parents[2]
BERLIN = ZoneInfo("Europe/Berlin")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def iso(events: list[datetime]) -> list[str]:
    return [e.strftime("%Y-%m-%d %H:%M:%S") for e in events]


# Base: Saturday 2026-01-03 14:07:00 UTC.
SAT = "2026-01-03 14:07:00"

EXAMPLES = [
    # expression, normalized, base (UTC), expected events (UTC wall time)
    ("*/5", "*-*-* *:00/5:00", SAT, ["2026-01-03 14:10:00", "2026-01-03 14:15:00", "2026-01-03 14:20:00"]),
    ("0/5", "*-*-* *:00/5:00", SAT, ["2026-01-03 14:10:00", "2026-01-03 14:15:00", "2026-01-03 14:20:00"]),
    ("*/00", "*-*-* *:00:00", SAT, ["2026-01-03 15:00:00", "2026-01-03 16:00:00", "2026-01-03 17:00:00"]),
    ("mon..fri", "Mon..Fri *-*-* 00:00:00", SAT, ["2026-01-05 00:00:00", "2026-01-06 00:00:00", "2026-01-07 00:00:00"]),
    ("sat..sun", "Sat,Sun *-*-* 00:00:00", SAT, ["2026-01-04 00:00:00", "2026-01-10 00:00:00", "2026-01-11 00:00:00"]),
    (
        "mon,wed,fri",
        "Mon,Wed,Fri *-*-* 00:00:00",
        SAT,
        ["2026-01-05 00:00:00", "2026-01-07 00:00:00", "2026-01-09 00:00:00"],
    ),
    ("12:05", "*-*-* 12:05:00", SAT, ["2026-01-04 12:05:00", "2026-01-05 12:05:00"]),
    (
        "mon..wed 30/10",
        "Mon..Wed *-*-* *:30/10:00",
        SAT,
        ["2026-01-05 00:30:00", "2026-01-05 00:40:00", "2026-01-05 00:50:00", "2026-01-05 01:30:00"],
    ),
    (
        "mon..fri 8..17,22:0/15",
        "Mon..Fri *-*-* 08..17,22:00/15:00",
        "2026-01-05 17:40:00",
        [
            "2026-01-05 17:45:00",
            "2026-01-05 22:00:00",
            "2026-01-05 22:15:00",
            "2026-01-05 22:30:00",
            "2026-01-05 22:45:00",
            "2026-01-06 08:00:00",
        ],
    ),
    (
        "fri 12..13:5/20",
        "Fri *-*-* 12..13:05/20:00",
        SAT,
        [
            "2026-01-09 12:05:00",
            "2026-01-09 12:25:00",
            "2026-01-09 12:45:00",
            "2026-01-09 13:05:00",
            "2026-01-09 13:25:00",
            "2026-01-09 13:45:00",
            "2026-01-16 12:05:00",
        ],
    ),
    (
        "12/2:5",
        "*-*-* 12/2:05:00",
        SAT,
        [
            "2026-01-03 16:05:00",
            "2026-01-03 18:05:00",
            "2026-01-03 20:05:00",
            "2026-01-03 22:05:00",
            "2026-01-04 12:05:00",
            "2026-01-04 14:05:00",
        ],
    ),
    ("*", "*-*-* *:*:00", SAT, ["2026-01-03 14:08:00", "2026-01-03 14:09:00"]),
    (
        "sat *-1..7 15:00",
        "Sat *-*-01..07 15:00:00",
        SAT,
        ["2026-01-03 15:00:00", "2026-02-07 15:00:00", "2026-03-07 15:00:00", "2026-04-04 15:00:00"],
    ),
    ("*-05", "*-*-05 00:00:00", SAT, ["2026-01-05 00:00:00", "2026-02-05 00:00:00", "2026-03-05 00:00:00"]),
    ("2015-10-21", "2015-10-21 00:00:00", "2015-10-01 00:00:00", ["2015-10-21 00:00:00"]),
    ("2015-10-21", "2015-10-21 00:00:00", SAT, []),
    ("weekly", "Mon *-*-* 00:00:00", SAT, ["2026-01-05 00:00:00", "2026-01-12 00:00:00", "2026-01-19 00:00:00"]),
    ("minutely", "*-*-* *:*:00", SAT, ["2026-01-03 14:08:00", "2026-01-03 14:09:00"]),
    ("hourly", "*-*-* *:00:00", SAT, ["2026-01-03 15:00:00", "2026-01-03 16:00:00"]),
    ("daily", "*-*-* 00:00:00", SAT, ["2026-01-04 00:00:00", "2026-01-05 00:00:00"]),
    ("monthly", "*-*-01 00:00:00", SAT, ["2026-02-01 00:00:00", "2026-03-01 00:00:00"]),
    ("yearly", "*-01-01 00:00:00", SAT, ["2027-01-01 00:00:00", "2028-01-01 00:00:00"]),
    ("annually", "*-01-01 00:00:00", SAT, ["2027-01-01 00:00:00"]),
    (
        "quarterly",
        "*-01,04,07,10-01 00:00:00",
        SAT,
        ["2026-04-01 00:00:00", "2026-07-01 00:00:00", "2026-10-01 00:00:00", "2027-01-01 00:00:00"],
    ),
    ("semiannually", "*-01,07-01 00:00:00", SAT, ["2026-07-01 00:00:00", "2027-01-01 00:00:00"]),
    ("semi-annually", "*-01,07-01 00:00:00", SAT, ["2026-07-01 00:00:00"]),
    ("30/10", "*-*-* *:30/10:00", SAT, ["2026-01-03 14:30:00", "2026-01-03 14:40:00", "2026-01-03 14:50:00"]),
    (
        "fri..mon",
        "Mon,Fri..Sun *-*-* 00:00:00",
        SAT,
        ["2026-01-04 00:00:00", "2026-01-05 00:00:00", "2026-01-09 00:00:00"],
    ),
    ("FRIDAY..Monday 9:00", "Mon,Fri..Sun *-*-* 09:00:00", SAT, ["2026-01-04 09:00:00", "2026-01-05 09:00:00"]),
    ("*-2-29", "*-02-29 00:00:00", SAT, ["2028-02-29 00:00:00", "2032-02-29 00:00:00"]),
    ("*-*-31 23:59:59", "*-*-31 23:59:59", SAT, ["2026-01-31 23:59:59", "2026-03-31 23:59:59"]),
    ("*:*:0/20", "*-*-* *:*:00/20", SAT, ["2026-01-03 14:07:20", "2026-01-03 14:07:40", "2026-01-03 14:08:00"]),
    ("55/10", "*-*-* *:55:00", SAT, ["2026-01-03 14:55:00", "2026-01-03 15:55:00"]),
    ("*-*/3-1 0:0", "*-01/3-01 00:00:00", SAT, ["2026-04-01 00:00:00", "2026-07-01 00:00:00"]),
    ("2026..2027-12-31 23:00", "2026..2027-12-31 23:00:00", SAT, ["2026-12-31 23:00:00", "2027-12-31 23:00:00"]),
]


@pytest.mark.parametrize(("expr", "normalized", "base", "expected"), EXAMPLES)
def test_examples(expr: str, normalized: str, base: str, expected: list[str]) -> None:
    ev = parse(expr)
    assert ev.expression == expr
    assert ev.normalized == normalized
    got = ev.events(utc(base), "UTC", len(expected) + 1 if not expected else len(expected))
    assert iso(got) == expected
    # the normalised form means the same thing
    assert iso(parse(normalized).events(utc(base), "UTC", len(expected) or 1)) == expected


def test_one_shot_has_no_further_event() -> None:
    ev = parse("2015-10-21")
    assert ev.next_event(utc("2015-10-21 00:00:00"), "UTC") is None
    assert (
        next_event_epoch("2015-10-21", utc("2015-10-20 12:00:00").timestamp(), "UTC")
        == utc("2015-10-21 00:00:00").timestamp()
    )


def test_impossible_date_ends_quickly() -> None:
    for expr in ("*-2-30", "*-4-31", "*-2-30 12:00:00", "2199-2-29"):
        assert parse(expr).next_event(utc(SAT), "Europe/Berlin") is None


def test_search_stops_at_year_2199() -> None:
    assert iso(parse("*-12-31 23:59:59 UTC").events(utc("2199-12-30 00:00:00"), "UTC", 3)) == ["2199-12-31 23:59:59"]


def test_far_instants() -> None:
    assert next_event_epoch("*/5", 1e15, "UTC") is None
    assert parse("*/5").next_event(datetime(9999, 12, 31, 23, 59, tzinfo=UTC), "Pacific/Kiritimati") is None
    assert next_event_epoch("*/5", -1e12, "UTC") == 0.0
    assert next_event_epoch("daily", -3600, "Europe/Berlin") == 23 * 3600  # 1970-01-02 00:00 CET
    with pytest.raises(CalendarError):
        next_event_epoch("*/5", float("nan"), "UTC")


def test_strictly_after_and_fractions() -> None:
    ev = parse("*/5")
    assert next_event_epoch(ev, utc("2026-01-03 14:10:00").timestamp(), "UTC") == utc("2026-01-03 14:15:00").timestamp()
    assert (
        next_event_epoch(ev, utc("2026-01-03 14:09:59").timestamp() + 0.5, "UTC")
        == utc("2026-01-03 14:10:00").timestamp()
    )
    assert ev.next_event(utc("2026-01-03 14:09:59").replace(microsecond=999999), "UTC") == utc("2026-01-03 14:10:00")


def test_results_are_aware_in_the_zone() -> None:
    got = parse("12:00").next_event(utc(SAT), "Europe/Berlin")
    assert got is not None
    assert got.tzinfo is not None and got.utcoffset() == timedelta(hours=1)
    assert got.isoformat() == "2026-01-04T12:00:00+01:00"
    got = parse("12:00 UTC").next_event(utc(SAT), "Europe/Berlin")
    assert got is not None and got.isoformat() == "2026-01-04T12:00:00+00:00"
    assert got.utcoffset() == timedelta(0)


def test_naive_after_is_wall_time_in_zone() -> None:
    got = parse("*/30").next_event(datetime(2026, 7, 1, 10, 10), "Europe/Berlin")
    assert got is not None and got.isoformat() == "2026-07-01T10:30:00+02:00"


# --- daylight saving, hand-checked against systemd-analyze (systemd 252) -------------------------


def berlin_events(expr: str, base_utc: str, n: int) -> list[str]:
    return [e.isoformat() for e in parse(expr).events(utc(base_utc), BERLIN, n)]


def test_spring_forward_skips_missing_times() -> None:
    assert berlin_events("*/15", "2026-03-29 00:40:00", 3) == [
        "2026-03-29T01:45:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-29T03:15:00+02:00",
    ]
    # 02:30 does not exist on 29 March: that day is skipped
    assert berlin_events("2:30", "2026-03-28 12:00:00", 2) == ["2026-03-30T02:30:00+02:00", "2026-03-31T02:30:00+02:00"]
    assert berlin_events("2,3:30", "2026-03-28 12:00:00", 2) == [
        "2026-03-29T03:30:00+02:00",
        "2026-03-30T02:30:00+02:00",
    ]


def test_fall_back_fires_repeated_hour_once() -> None:
    # 02:00-02:59 happens twice on 25 October; events fire in the first pass only
    assert berlin_events("*/15", "2026-10-25 00:20:00", 4) == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:45:00+02:00",
        "2026-10-25T03:00:00+01:00",
        "2026-10-25T03:15:00+01:00",
    ]
    assert berlin_events("2:30", "2026-10-24 12:00:00", 2) == ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]
    assert berlin_events("1..3:20/20", "2026-10-24 22:00:00", 6) == [
        "2026-10-25T01:20:00+02:00",
        "2026-10-25T01:40:00+02:00",
        "2026-10-25T02:20:00+02:00",
        "2026-10-25T02:40:00+02:00",
        "2026-10-25T03:20:00+01:00",
        "2026-10-25T03:40:00+01:00",
    ]


def test_fall_back_from_inside_second_pass_continues_there() -> None:
    # systemd: starting at 02:10 CET (the second 02:10) it goes on in that hour
    assert berlin_events("*/15", "2026-10-25 01:10:00", 3) == [
        "2026-10-25T02:15:00+01:00",
        "2026-10-25T02:30:00+01:00",
        "2026-10-25T02:45:00+01:00",
    ]


def test_weekly_across_dst_is_wall_clock() -> None:
    got = parse("weekly").events(utc("2026-03-20 00:00:00"), BERLIN, 3)
    assert [g.isoformat() for g in got] == [
        "2026-03-23T00:00:00+01:00",
        "2026-03-30T00:00:00+02:00",
        "2026-04-06T00:00:00+02:00",
    ]
    assert got[1].timestamp() - got[0].timestamp() == 7 * 86400 - 3600  # real time: 7 days less an hour
    assert job_limit_problem(parse("weekly"), BERLIN) is None


def test_negative_dst_zone_moves_forward() -> None:
    # Europe/Dublin: tzdata marks winter (GMT) as the DST period; systemd before PR #36897 repeated
    # 00:00 GMT forever here. Hand-checked: 01:00 GMT does not exist on 30 March 2025.
    got = parse("hourly").events(utc("2025-03-29 22:00:00"), "Europe/Dublin", 4)
    assert [g.isoformat() for g in got] == [
        "2025-03-29T23:00:00+00:00",
        "2025-03-30T00:00:00+00:00",
        "2025-03-30T02:00:00+01:00",
        "2025-03-30T03:00:00+01:00",
    ]


def test_systemd_infinite_loop_case_still_finds_the_event() -> None:
    # systemd 252 gives up here ("Infinite loop in calendar calculation"); a job must not stop.
    got = next_event_epoch("14/6:25..55", utc("2026-03-28 22:30:00").timestamp(), "Europe/Berlin")
    assert got == datetime(2026, 3, 29, 14, 25, tzinfo=BERLIN).timestamp()


# --- parse errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "where"),
    [
        ("*/00x", "/00x"),
        ("*/0", "/0"),
        ("5/0", "/0"),
        ("61", "61"),
        ("24:00", "24:00"),
        ("12:60", "60"),
        ("12:00:60", "60"),
        ("*-13-01", "13-01"),
        ("*-0-01", "0-01"),
        ("*-01-32", "32"),
        ("*-01-0", "0"),
        ("1969-01-01", "1969-01-01"),
        ("2200-01-01", "2200-01-01"),
        ("funday", "funday"),
        ("mon..", ""),
        ("mon..fri8", "8"),
        ("5..3", "5..3"),
        ("5..", ".."),
        ("*/", "/"),
        ("1:2:3:4", ":4"),
        ("12:05 foo", "foo"),
        ("*/60", "60"),
        ("mon,", ""),
        ("1-2-3-4", "-4"),
        ("", ""),
        ("   ", ""),
        ("UTC", "UTC"),
        ("*/5 UTCX", "UTCX"),
        ("12345678901", "12345678901"),
        ("1,,2", ",2"),
        ("--", "--"),
    ],
)
def test_parse_errors_name_the_position(expr: str, where: str) -> None:
    with pytest.raises(CalendarError) as exc:
        parse(expr)
    assert str(exc.value).startswith(f"unable to parse calendar event at '{where}'")
    assert isinstance(exc.value, ValidationError)


@pytest.mark.parametrize("bad", [None, 5, b"*/5", ["*/5"], 1.5])
def test_parse_non_string(bad: object) -> None:
    with pytest.raises(CalendarError):
        parse(bad)  # type: ignore[arg-type]


def test_parse_huge_input_is_refused_fast() -> None:
    with pytest.raises(CalendarError, match="too long"):
        parse("1," * 100_000 + "1")
    with pytest.raises(CalendarError):
        parse(",".join(["1"] * 300))  # more values than systemd's 240 per list


def test_parse_is_cached() -> None:
    assert parse("*/7") is parse("*/7")


def test_trailing_utc_and_case() -> None:
    ev = parse("MON..fri 8:00 utc")
    assert ev.utc and ev.normalized == "Mon..Fri *-*-* 08:00:00 UTC"
    assert parse("DAILY").normalized == "*-*-* 00:00:00"


def test_unknown_zone() -> None:
    with pytest.raises(CalendarError, match="unknown time zone 'Mars/Olympus'"):
        parse("*/5").next_event(utc(SAT), "Mars/Olympus")
    with pytest.raises(CalendarError):
        next_event_epoch("*/5", 0, "../etc/passwd")


def test_system_timezone_is_a_zone() -> None:
    ZoneInfo(system_timezone())


# --- job limits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("expr", ["*/5", "*/00", "*", "weekly", "daily", "mon..fri", "sun 23:59", "fri..mon 3:00"])
def test_job_allows(expr: str) -> None:
    assert job_limit_problem(parse(expr), "UTC") is None
    assert isinstance(validate_job_schedule(expr, "Europe/Berlin"), CalendarEvent)


@pytest.mark.parametrize(
    ("expr", "words"),
    [
        ("*:*:0/10", "more than once a minute"),
        ("*:*:*", "more than once a minute"),
        ("*:*:0,30", "more than once a minute"),
        ("monthly", "up to 31 days"),
        ("sat *-1..7 15:00", "up to 35 days"),
        ("*-05", "up to 31 days"),
        ("2015-10-21", "stops firing after 2015"),
        ("2026..2030-*-* 12:00", "stops firing after 2030"),
        ("mon,wed 12:00", None),
        ("mon 12:00", None),
        ("*-2-30", "never fires"),
        ("*-*-1..7", "up to 25 days"),
        ("*-*-1..8", "up to 24 days"),
        ("*-*-1..25", None),
        ("*-*-1..30", None),
        ("*-*-1..24", "up to 8 days"),
        ("*-2..12-*", "up to 32 days"),
        ("*-*/7", "after 2001-12-29 the next event is 2002-01-08"),  # systemd skips Jan 1 here
        ("*-*-1/10", "up to 10 days"),
        ("*-*-1/6 12:00", None),  # ... 25, 31, then Jan 1: 31 is in the list
    ],
)
def test_job_limits(expr: str, words: str | None) -> None:
    problem = job_limit_problem(parse(expr), "UTC")
    if words is None:
        assert problem is None
        return
    assert problem is not None and words in problem
    with pytest.raises(ValidationError, match="not allowed for a replication job"):
        validate_job_schedule(expr, "UTC")


def test_job_limit_boundaries() -> None:
    # the 29th to the 1st is at most 3 days; but from the 22nd of a 31-day month to the 1st is 10
    assert job_limit_problem(parse("*-*-1,8,15,22,29"), "UTC") is None
    assert "up to 10 days" in (job_limit_problem(parse("*-*-1,8,15,22"), "UTC") or "")
    # weekly at different times of day: Mon 00:00 to the next Mon 00:00 is exactly 7 days, allowed
    assert job_limit_problem(parse("mon 0:00"), "UTC") is None


def test_validate_job_schedule_parse_error_is_calendar_error() -> None:
    with pytest.raises(CalendarError):
        validate_job_schedule("*/0", "UTC")


# --- CLI --------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replq", "calendar", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_cli_json() -> None:
    r = run_cli(
        "sat *-1..7 15:00",
        "--from",
        "2026-01-01T00:00:00Z",
        "--tz",
        "UTC",
        "--iterations",
        "3",
        "--output-format",
        "json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "expression": "sat *-1..7 15:00",
        "normalized": "Sat *-*-01..07 15:00:00",
        "timezone": "UTC",
        "events": ["2026-01-03T15:00:00+00:00", "2026-02-07T15:00:00+00:00", "2026-03-07T15:00:00+00:00"],
        "job_ok": False,
        "reason": "leaves gaps of up to 35 days between events (wall clock); a job must run at least every 7 days",
    }


def test_cli_json_dst_offsets_and_default_iterations() -> None:
    r = run_cli("*/30", "--from", "2026-03-29T01:00:00+01:00", "--tz", "Europe/Berlin", "--output-format", "json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["events"] == [
        "2026-03-29T01:30:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-29T03:30:00+02:00",
        "2026-03-29T04:00:00+02:00",
        "2026-03-29T04:30:00+02:00",
    ]
    assert data["job_ok"] is True and data["reason"] is None and data["timezone"] == "Europe/Berlin"


def test_cli_naive_from_is_in_tz() -> None:
    r = run_cli(
        "*/30", "--from", "2026-07-01T10:10:00", "--tz", "Europe/Berlin", "--iterations", "1", "--output-format", "json"
    )
    assert json.loads(r.stdout)["events"] == ["2026-07-01T10:30:00+02:00"]


def test_cli_text() -> None:
    r = run_cli("*/5", "--from", "2026-03-29T00:52:00Z", "--tz", "Europe/Berlin", "--iterations", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "  Original form: */5",
        "Normalized form: *-*-* *:00/5:00",
        "      Time zone: Europe/Berlin",
        "    Next elapse: Sun 2026-03-29 01:55:00 CET",
        "       (in UTC): Sun 2026-03-29 00:55:00 UTC",
        "       Iter. #2: Sun 2026-03-29 03:00:00 CEST",
        "       (in UTC): Sun 2026-03-29 01:00:00 UTC",
        "    Job allowed: yes",
    ]


def test_cli_text_refused_and_never() -> None:
    r = run_cli("2015-10-21", "--from", "2026-01-01T00:00:00Z", "--tz", "UTC")
    assert r.returncode == 0, r.stderr
    assert "    Next elapse: never" in r.stdout
    assert "Job allowed: no - it names specific years" in r.stdout


def test_cli_yaml() -> None:
    r = run_cli(
        "weekly", "--from", "2026-01-01T00:00:00Z", "--tz", "UTC", "--iterations", "1", "--output-format", "yaml"
    )
    assert r.returncode == 0, r.stderr
    assert "normalized: Mon *-*-* 00:00:00" in r.stdout and "job_ok: true" in r.stdout


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["*/0x"], 1, "unable to parse calendar event at '/0x'"),
        (["*/00x"], 1, "unable to parse calendar event at '/00x'"),
        (["*/5", "--tz", "Nowhere/Land"], 1, "unknown time zone 'Nowhere/Land'"),
        (["*/5", "--from", "yesterday"], 1, "invalid --from 'yesterday'"),
        (["*/5", "--iterations", "0"], 1, "invalid --iterations 0"),
        (["*/5", "--iterations", "100000"], 1, "invalid --iterations"),
        (["*/5", "--iterations", "many"], 2, "'many' is not a valid integer"),
        ([], 2, "Missing argument"),
        (["x" * 5000], 1, "too long"),
    ],
)
def test_cli_bad_input(args: list[str], code: int, words: str) -> None:
    r = run_cli(*args)
    assert r.returncode == code
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert words in lines[0]
    assert "Traceback" not in r.stderr
