"""The clock the application reads for expiry and state timing, passed in so that tests can move time themselves.

``monotonic()`` measures intervals (cache ages, breaker open periods); ``now()`` is wall-clock seconds since the
epoch (for times shared with other processes). Real I/O deadlines (socket timeouts) stay on the real clock.
"""

from __future__ import annotations

import time
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
