"""When to try a failed delivery again: the configured schedule with jitter (``delivery.RETRY``), or the
receiver's Retry-After."""

from __future__ import annotations

import random
from datetime import datetime
from email.utils import parsedate_to_datetime

from app.clock import as_utc, utc_now
from app.jobs.retry import RetryPolicy, ScheduleBackoff

JITTER = 0.2  # +-20 %, so that many deliveries failing together do not all come back at the same moment


def retry_delay(schedule: tuple[float, ...], attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): the schedule's entry for it, jittered
    as deliveries are (the worker applies ``delivery.RETRY``; this is the same computation for one schedule)."""
    return RetryPolicy(max_attempts=None, backoff=ScheduleBackoff(seconds=schedule, jitter=JITTER)).delay(
        attempt, {}, rng
    )


def retry_after_seconds(value: str | None, cap: float, now: datetime | None = None) -> float | None:
    """A Retry-After header (delay-seconds or HTTP-date) as seconds from ``now``, at most ``cap``; None when
    absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = (as_utc(when) - utc_now(now)).total_seconds()  # an HTTP-date without a zone is UTC (GMT)
    return min(max(seconds, 0.0), cap)
