"""When a job is next due (SPEC §3): a pure function of config, state, settings and the clock."""

from __future__ import annotations

from replq.calendar import next_event_epoch
from replq.model import Job, JobState
from replq.settings import DEFAULT_RETRY_INTERVAL


def next_sync(job: Job, state: JobState, retry_interval: float | dict, tz: str, now: float,
              as_if_enabled: bool = False) -> float | None:
    """The epoch time the job is next due, or None for never.

    - remove_job set: due now; after a failed removal, retry_interval after last_try.
    - disabled: never.
    - fail_count > 0 (error state): retry_interval after last_try; the calendar is suspended.
    - never tried (last_try == 0): now.
    - else: the first calendar event strictly after last_try. Missed events collapse into
      one run because only the first event after last_try counts, however old it is.

    as_if_enabled: when a disabled job would be due, which `status` shows as pvesr does.
    """
    if isinstance(retry_interval, dict):
        retry_interval = float(retry_interval.get("retry_interval", DEFAULT_RETRY_INTERVAL))
    if job.remove_job:
        if state.fail_count > 0 and state.last_try:
            return state.last_try + retry_interval
        return now
    if job.disable and not as_if_enabled:
        return None
    if state.fail_count > 0:
        return state.last_try + retry_interval
    if not state.last_try:
        return now
    return next_event_epoch(job.effective_schedule, state.last_try, tz)
