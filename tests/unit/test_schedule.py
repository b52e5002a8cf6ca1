"""next_sync in every job state, with the clock as a parameter (SPEC §3)."""

from __future__ import annotations

from datetime import UTC, datetime

from replq.model import Job, JobState
from replq.schedule import next_sync


def ts(s: str) -> float:
    return datetime.fromisoformat(s).replace(tzinfo=UTC).timestamp()


NOW = ts("2026-03-10 12:07:30")


def ns(job: Job, state: JobState, retry: float = 1800, tz: str = "UTC", now: float = NOW) -> float | None:
    return next_sync(job, state, retry, tz, now)


def test_never_run_is_due_now() -> None:
    assert ns(Job("100-0", "b"), JobState()) == NOW


def test_calendar_event_strictly_after_last_try() -> None:
    job = Job("100-0", "b")  # */15
    assert ns(job, JobState(last_try=ts("2026-03-10 12:00:00"), last_sync=ts("2026-03-10 12:00:00"))) == ts(
        "2026-03-10 12:15:00")
    assert ns(job, JobState(last_try=ts("2026-03-10 12:14:59"))) == ts("2026-03-10 12:15:00")


def test_missed_events_collapse_into_one_run() -> None:
    # Scheduler down for a day: the first event after last_try is long past → due (once).
    job = Job("100-0", "b", schedule="*/5")
    due = ns(job, JobState(last_try=ts("2026-03-09 08:01:00")))
    assert due == ts("2026-03-09 08:05:00") and due < NOW


def test_hourly_star_slash_00() -> None:
    job = Job("100-0", "b", schedule="*/00")
    assert ns(job, JobState(last_try=ts("2026-03-10 12:00:00"))) == ts("2026-03-10 13:00:00")


def test_error_state_uses_retry_interval_not_calendar() -> None:
    job = Job("100-0", "b", schedule="*/1")
    st = JobState(last_try=ts("2026-03-10 12:00:00"), fail_count=3, error="boom")
    assert ns(job, st) == ts("2026-03-10 12:30:00")
    assert ns(job, st, retry=600) == ts("2026-03-10 12:10:00")
    assert ns(job, st, retry={"retry_interval": 60}) == ts("2026-03-10 12:01:00")


def test_disabled_is_never() -> None:
    assert ns(Job("100-0", "b", disable=True), JobState()) is None
    assert ns(Job("100-0", "b", disable=True), JobState(fail_count=2, last_try=NOW)) is None


def test_remove_job_due_now_even_when_disabled() -> None:
    st = JobState(last_try=ts("2026-03-10 12:00:00"))
    assert ns(Job("100-0", "b", remove_job="full"), st) == NOW
    assert ns(Job("100-0", "b", remove_job="local", disable=True), st) == NOW


def test_failed_removal_retries_after_interval() -> None:
    st = JobState(last_try=ts("2026-03-10 12:00:00"), fail_count=1, error="ssh down")
    assert ns(Job("100-0", "b", remove_job="full"), st) == ts("2026-03-10 12:30:00")


def test_schedule_now_semantics() -> None:
    # schedule-now sets last_try = 0: due now, and in error state due at once too (0 + retry).
    assert ns(Job("100-0", "b"), JobState(last_try=0, last_sync=ts("2026-03-10 12:00:00"))) == NOW
    assert ns(Job("100-0", "b"), JobState(last_try=0, fail_count=2)) <= NOW  # type: ignore[operator]


def test_time_zone_applies() -> None:
    job = Job("100-0", "b", schedule="12:00")
    # 12:00 in Vienna (UTC+1 in March before DST) is 11:00 UTC.
    assert ns(job, JobState(last_try=ts("2026-03-10 00:00:00")), tz="Europe/Vienna") == ts("2026-03-10 11:00:00")
    assert ns(job, JobState(last_try=ts("2026-03-10 00:00:00")), tz="UTC") == ts("2026-03-10 12:00:00")
