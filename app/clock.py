"""The clock the application reads for expiry and state timing, passed in so that tests can move time themselves.

``monotonic()`` measures intervals (cache ages, breaker open periods); ``now()`` is wall-clock seconds since the
epoch (for times shared with other processes). Real I/O deadlines (socket timeouts) stay on the real clock.

Datetimes we keep or compare are timezone-aware UTC. One rule for a naive datetime wherever one comes in (a test's
``now``, a driver that drops the offset): it is UTC. ``as_utc`` applies it; ``utc_now`` is the current time.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """What the breaker and the caches ask the time of."""

    def monotonic(self) -> float: ...

    def now(self) -> float: ...


class SystemClock:
    """The real clock: time.monotonic and time.time."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> float:
        return time.time()

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()


def app_clock(app) -> Clock:
    """The application's clock: ``app.extensions["clock"]`` (set by create_app), else the system clock."""
    return app.extensions.get("clock") or SYSTEM_CLOCK


def wall_time(clock: Clock) -> datetime:
    """The clock's wall time as an aware UTC datetime (what the tables keep)."""
    return datetime.fromtimestamp(clock.now(), UTC)


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive ``moment`` is taken to be UTC already (never the host's local time)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def utc_now(now: datetime | None = None) -> datetime:
    """``now`` in UTC (naive is UTC, see ``as_utc``), or the current time: one clock for every table we keep."""
    return datetime.now(UTC) if now is None else as_utc(now)
