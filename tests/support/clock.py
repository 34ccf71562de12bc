"""A clock that moves only when a test says so: expiry and breaker timing without sleeping."""

from __future__ import annotations

import threading


class FakeClock:
    """Satisfies app.clock.Clock; starts at ``start`` (monotonic) and ``wall`` (epoch seconds), moves by `advance`."""

    def __init__(self, start: float = 1_000.0, wall: float = 1_700_000_000.0):
        self._lock = threading.Lock()
        self._monotonic = start
        self._wall = wall

    def monotonic(self) -> float:
        with self._lock:
            return self._monotonic

    def now(self) -> float:
        with self._lock:
            return self._wall

    def advance(self, seconds: float) -> None:
        """Move both readings forward by ``seconds`` (never backward: a monotonic clock cannot)."""
        if seconds < 0:
            raise ValueError("a clock only moves forward")
        with self._lock:
            self._monotonic += seconds
            self._wall += seconds

    def __call__(self) -> float:
        """The monotonic reading, for code that takes a plain ``Callable[[], float]``."""
        return self.monotonic()
