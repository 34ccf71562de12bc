"""Job kinds and their handlers: declared with ``@job_handler`` next to the function that does the work.

A handler receives a :class:`JobContext` and returns the job's result (JSON-serialisable). Raising
:class:`RetryLater` asks for another attempt after a given delay, :class:`Snooze` puts the job back to wait
without counting an attempt (not ready yet: an export being prepared), :class:`PermanentFailure` sends the job to the
dead letter queue at once, :class:`JobExpired` ends it as expired, and any other exception is a transient failure
retried after the backoff of the kind's :class:`~app.jobs.retry.RetryPolicy` (declared with the handler, and
nowhere else). Handlers must be idempotent: a job may run more than once (a worker killed after the work, before
the completion write).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from flask import Flask

from app.audit import audit
from app.clock import app_clock, wall_time
from app.jobs import ledger
from app.jobs.retry import DEFAULT_POLICY, RetryPolicy


class PermanentFailure(Exception):
    """Retrying cannot help (bad payload, refused destination): dead-letter the job now."""


class JobExpired(Exception):
    """The job's clinical expiry passed while it ran: its result must not be written or delivered."""


class Snooze(Exception):
    """Not ready yet, not failing: run again after ``seconds`` without counting an attempt (an export the server
    is still preparing, a model behind an open breaker). ``note`` (no PHI) says why it waits."""

    def __init__(self, seconds: float, note: str):
        super().__init__(note)
        self.seconds = seconds
        self.note = note


class RetryLater(Exception):
    """Try again after ``seconds`` (e.g. a receiver's Retry-After), or after the kind's backoff when None; counted
    as a failed attempt, recorded with ``reason`` (which must hold no PHI) rather than the exception's place."""

    def __init__(self, seconds: float | None, reason: str):
        super().__init__(reason)
        self.seconds = seconds
        self.reason = reason


@dataclass
class JobContext:
    """What a handler gets: the job, the application, and a way to keep its lease alive during long work."""

    app: Flask
    job: ledger.Job
    heartbeat: Callable[[], bool] = field(default=lambda: True)

    @property
    def payload(self) -> Any:
        return self.job.payload

    @property
    def engine(self):
        return self.app.extensions["db"]

    def audit(self, event: str, **fields: Any) -> None:
        """An audit record of something this job did, tagged with the job (id, kind, attempt)."""
        audit(self.app).record(event, job=self.job.id, kind=self.job.kind, attempt=self.job.attempts, **fields)

    def fhir_auditor(self, **who: Any) -> Callable[[dict[str, Any]], None]:
        """An observer for this job's FHIR client (``app.fhir.client.Client(observe=...)``): one audit record per
        request, ``job.fhir-read`` or ``job.fhir-write``, tagged with ``who`` (iss, user, patient...) as hook
        records are. Resource types, methods and statuses only, never content."""

        def observe(call: dict[str, Any]) -> None:
            event = "job.fhir-read" if call["method"] in ("GET", "HEAD") else "job.fhir-write"
            self.audit(event, **who, **call)

        return observe


Handler = Callable[[JobContext], Any]


@dataclass(frozen=True)
class JobKind:
    name: str
    handler: Handler
    retry: RetryPolicy
    client_visible: bool  # whether the calling client may read it at GET /jobs/{id}
    priority: int = 0  # lower first: a due job of a lower number is claimed before older ones of higher numbers


_KINDS: dict[str, JobKind] = {}


def job_handler(kind: str, *, retry: RetryPolicy = DEFAULT_POLICY, client_visible: bool = False, priority: int = 0):
    """Register the decorated function as the handler of jobs of ``kind``, retried by ``retry`` (5 attempts,
    capped exponential backoff with full jitter, unless it says otherwise). Workers take due jobs of a lower
    ``priority`` number first (background work such as batch parts declares a higher one).

    ``client_visible`` jobs carry ``client_iss`` in their payload and that client may read them at GET /jobs/{id}.
    """

    def register(fn: Handler) -> Handler:
        if kind in _KINDS and _KINDS[kind].handler is not fn:
            raise ValueError(f"job kind {kind!r} is declared twice")
        _KINDS[kind] = JobKind(kind, fn, retry, client_visible, priority)
        return fn

    return register


def job_kind(kind: str) -> JobKind | None:
    return _KINDS.get(kind)


def job_kinds() -> list[str]:
    return sorted(_KINDS)


def priorities() -> dict[str, int]:
    """Each registered kind's claim priority (lower first)."""
    return {name: kind.priority for name, kind in _KINDS.items()}


def submit(
    app: Flask,
    kind: str,
    job_id: str,
    payload: Any,
    *,
    expires_in: float | None = None,
    delay: float = 0.0,
) -> bool:
    """Enqueue a job of a registered ``kind`` under its idempotency key; True when newly created. The job gets
    the attempts of its kind's retry policy (as the application is configured now).

    ``expires_in`` (seconds): after that the result is clinically stale and the job is not run or delivered.
    """
    declared = job_kind(kind)
    if declared is None:
        raise ValueError(f"no handler is registered for job kind {kind!r}")
    now = wall_time(app_clock(app))
    return ledger.enqueue(
        app.extensions["db"],
        job_id,
        kind,
        payload,
        max_attempts=declared.retry.attempts(app.config),
        expires_at=now + timedelta(seconds=expires_in) if expires_in else None,
        run_after=now + timedelta(seconds=delay) if delay else None,
        now=now,
    )
