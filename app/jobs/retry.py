"""Retry policies: how many attempts a job kind gets and how long it waits between them, declared on its handler.

``@job_handler(kind, retry=RetryPolicy(max_attempts=5, backoff=ExponentialBackoff(base=2, cap=300)))`` is the one
place that says it: ``submit`` stores the policy's attempts in the job's row (the ledger dead-letters the job
at that count, whichever worker runs it), and the worker asks the policy for the delay after each failed
attempt. Jitter is drawn from the ``random.Random`` the worker was given, so a test passes a seeded or fixed one
instead of changing constants. A delay is a duration: the clock it is added to is the ledger's ``now``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Config = Mapping[str, Any]
_RANDOM = random.Random()  # noqa: S311 - jitter, not a secret; used when the caller gives no generator


class Backoff(Protocol):
    def delay(self, attempt: int, config: Config, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""

    def implied_attempts(self, config: Config) -> int | None:
        """The attempts this backoff implies (a schedule's length plus the first try); None when it has no end."""


@dataclass(frozen=True)
class ExponentialBackoff:
    """``base * 2**(attempt-1)`` seconds, at most ``cap``; with ``jitter="full"`` a uniform draw below that."""

    base: float = 2.0
    cap: float = 300.0
    jitter: Literal["full", "none"] = "full"

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < 0 or self.jitter not in ("full", "none"):
            raise ValueError("ExponentialBackoff needs base >= 0, cap >= 0 and jitter 'full' or 'none'")

    def delay(self, attempt: int, config: Config, rng: random.Random) -> float:
        ceiling = min(self.cap, self.base * 2 ** max(attempt - 1, 0))
        return rng.uniform(0, ceiling) if self.jitter == "full" else ceiling

    def implied_attempts(self, config: Config) -> int | None:
        return None


@dataclass(frozen=True)
class ScheduleBackoff:
    """The schedule's entry for each failed attempt (its last one repeats), times ``1 +- jitter``.

    The schedule is ``seconds``, or the setting named by ``setting`` (a sequence of seconds, read from the
    application's config when the policy is applied, so operators can change it)."""

    seconds: tuple[float, ...] = ()
    setting: str | None = None
    jitter: float = 0.2  # +-20 %: many deliveries failing together do not all come back at the same moment

    def __post_init__(self) -> None:
        if bool(self.seconds) == bool(self.setting) or not 0 <= self.jitter < 1:
            raise ValueError("ScheduleBackoff needs either seconds or setting, and 0 <= jitter < 1")
        object.__setattr__(self, "seconds", tuple(float(s) for s in self.seconds))

    def schedule(self, config: Config) -> tuple[float, ...]:
        schedule = tuple(config[self.setting]) if self.setting else self.seconds
        if not schedule:
            raise ValueError(f"{self.setting} must hold at least one delay")
        return schedule

    def delay(self, attempt: int, config: Config, rng: random.Random) -> float:
        schedule = self.schedule(config)
        return schedule[min(max(attempt, 1), len(schedule)) - 1] * rng.uniform(1 - self.jitter, 1 + self.jitter)

    def implied_attempts(self, config: Config) -> int | None:
        """The immediate first try plus one per entry of the schedule."""
        return len(self.schedule(config)) + 1


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts and backoff of one job kind.

    ``max_attempts`` None takes the attempts the backoff implies (a schedule). ``max_attempts_setting`` names a
    setting that, when the application's config holds a value for it, replaces ``max_attempts``: an explicit,
    documented override for operators, declared here next to the number it overrides."""

    max_attempts: int | None = 5
    backoff: Backoff = field(default_factory=ExponentialBackoff)
    max_attempts_setting: str | None = None

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_attempts is None and not isinstance(self.backoff, ScheduleBackoff):
            raise ValueError("max_attempts may be left out only with a ScheduleBackoff (its length sets it)")

    def attempts(self, config: Config) -> int:
        """How many attempts a job of this kind gets, before it is dead-lettered."""
        if self.max_attempts_setting and config.get(self.max_attempts_setting) is not None:
            return int(config[self.max_attempts_setting])
        if self.max_attempts is not None:
            return self.max_attempts
        return self.backoff.implied_attempts(config)

    def delay(self, attempt: int, config: Config, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` before the next one."""
        return max(0.0, self.backoff.delay(attempt, config, rng or _RANDOM))


DEFAULT_BACKOFF = ExponentialBackoff()
DEFAULT_POLICY = RetryPolicy()
