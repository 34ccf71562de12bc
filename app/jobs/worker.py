"""The worker: claim a due job, run its handler with the lease kept alive, and record how it ended.

A handler runs on its own thread so that the worker can renew the lease while it works and, on shutdown,
hand the job back (release) when it does not finish within the grace period. Every outcome write is fenced
on the attempt (see ``ledger``), so a worker that lost its lease cannot overwrite a newer attempt.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from flask import Flask

from app.clock import Clock, app_clock, wall_time
from app.jobs import ledger, monitor
from app.jobs.maintenance import Maintenance
from app.jobs.presence import Presence
from app.jobs.registry import (
    JobContext,
    JobExpired,
    PermanentFailure,
    RetryLater,
    Snooze,
    job_kind,
    job_kinds,
    priorities,
)
from app.jobs.retry import RetryPolicy
from app.logs import describe

log = logging.getLogger(__name__)

DLQ_CHECK_SECONDS = 30.0
SNOOZED = "snoozed"  # an outcome, not a ledger state: the job is queued again, its attempt not counted


def new_worker_id() -> str:
    """host:pid:random, so that a lease names the process that holds it and never repeats after a restart."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Outcome:
    job_id: str
    kind: str
    state: str  # succeeded, queued (retry), dead, fenced, released, snoozed
    seconds: float


class Worker:
    """One claim-run-record loop. Run several (threads or processes, on one or many hosts) for throughput."""

    def __init__(
        self,
        app: Flask,
        *,
        worker_id: str | None = None,
        kinds: list[str] | None = None,
        lease_seconds: float | None = None,
        poll_seconds: float | None = None,
        grace_seconds: float = 20.0,
        stop: threading.Event | None = None,
        presence: Presence | None = None,
        rng: random.Random | None = None,
        clock: Clock | None = None,
    ):
        self.app = app
        # The ledger's times (claims, leases, backoffs) and the housekeeping's rounds. Waits for a handler's
        # thread, the grace period and run durations stay on the real clock: they measure real work.
        self.clock = clock or app_clock(app)
        self.engine = app.extensions["db"]
        self.worker_id = worker_id or new_worker_id()
        self.kinds = kinds
        self.lease_seconds = lease_seconds or app.config["JOB_LEASE_S"]
        self.poll_seconds = poll_seconds or app.config["JOB_POLL_S"]
        self.grace_seconds = grace_seconds
        self.stop = stop or threading.Event()
        self.maintenance = Maintenance(app, clock=self.clock)
        self.presence = presence  # the process's heartbeat (``jobs worker`` shares one among its claim loops)
        # The jitter of retry backoff (not a secret): tests pass a seeded or fixed generator.
        self.rng = rng or random.Random()  # noqa: S311

    def run(self) -> None:
        """Work until ``stop`` is set; then finish the job in hand (or release it after the grace period).
        Without a ``presence`` of its process, this loop keeps a heartbeat row of its own while it runs."""
        own = self.presence is None
        if own:
            self.presence = Presence.for_app(self.app, self.worker_id, self.kinds or job_kinds()).start()
        try:
            self._run()
        finally:
            if own:
                self.presence.stop()
                self.presence = None

    def _run(self) -> None:
        log.info("worker %s started (kinds: %s)", self.worker_id, ", ".join(self.kinds or job_kinds()))
        next_check = float("-inf")
        while not self.stop.is_set():
            if self.clock.monotonic() >= next_check:
                next_check = self.clock.monotonic() + DLQ_CHECK_SECONDS
                self._check_dead_letters()
            try:
                outcome = self.run_once()
            except Exception as exc:  # the database went away: keep the worker alive, retry after a pause
                log.error("worker %s: claim failed: %s", self.worker_id, describe(exc))
                outcome = None
            if outcome is None:
                self.stop.wait(self.poll_seconds)
        log.info("worker %s stopped", self.worker_id)

    def _check_dead_letters(self) -> None:
        try:
            monitor.check_dead_letters(self.app)
        except Exception as exc:  # an alert that cannot be raised must not stop the work
            log.error("worker %s: dead letter check failed: %s", self.worker_id, describe(exc))

    def run_until_idle(self, max_jobs: int | None = None) -> list[Outcome]:
        """Run due jobs until none is due (tests, benchmarks, ``--burst``); the outcomes in order."""
        outcomes: list[Outcome] = []
        while (max_jobs is None or len(outcomes) < max_jobs) and not self.stop.is_set():
            outcome = self.run_once()
            if outcome is None:
                break
            outcomes.append(outcome)
        return outcomes

    def run_once(self) -> Outcome | None:
        """Claim one due job and run it to its end; None when nothing is due."""
        self.maintenance.run_due()
        job = ledger.claim(
            self.engine,
            self.worker_id,
            lease_seconds=self.lease_seconds,
            kinds=self.kinds or job_kinds(),
            sweep_first=False,
            now=self._now(),
            priorities=priorities(),
        )
        if job is None:
            return None
        started = time.monotonic()
        state = self._execute(job)
        outcome = Outcome(job.id, job.kind, state, time.monotonic() - started)
        monitor.record_run(outcome.kind, outcome.state, outcome.seconds)
        if self.presence is not None:
            self.presence.count(outcome.state)
        return outcome

    def _execute(self, job: ledger.Job) -> str:
        declared = job_kind(job.kind)
        if declared is None:  # claimed with kinds=None by a caller that knows no handler for it
            return ledger.fail(self.engine, job, f"UnknownJobKind: {job.kind}", permanent=True, now=self._now())

        def heartbeat() -> bool:
            """Renew the lease; a database hiccup is not a lost lease, the next beat tries again."""
            try:
                return ledger.heartbeat(self.engine, job, lease_seconds=self.lease_seconds, now=self._now())
            except sa.exc.SQLAlchemyError as exc:
                log.warning("worker %s: heartbeat for job %s failed: %s", self.worker_id, job.id, describe(exc))
                return True

        run = _Run(JobContext(self.app, job, heartbeat), declared.handler)
        thread = threading.Thread(target=run, name=f"job-{job.kind}", daemon=True)
        thread.start()
        stop_noticed_at: float | None = None
        while True:
            thread.join(timeout=max(self.lease_seconds / 3, 0.05))
            if not thread.is_alive():
                break
            if self.stop.is_set():
                stop_noticed_at = stop_noticed_at or time.monotonic()
                if time.monotonic() - stop_noticed_at >= self.grace_seconds:
                    released = self._write_outcome(job, lambda: ledger.release(self.engine, job, now=self._now()))
                    return "released" if released is True else ledger.FENCED
            if not heartbeat():
                log.warning(
                    "worker %s: lost the lease on job %s; its outcome will not be recorded", self.worker_id, job.id
                )
        return self._record(job, run, declared.retry)

    def _now(self) -> datetime:
        """The worker's clock as the ledger keeps time (UTC); read at each write, as the ledger would itself."""
        return wall_time(self.clock)

    def _write_outcome(self, job: ledger.Job, write):
        """Write a job's outcome, retrying through database hiccups for as long as the lease lasts: giving up
        sooner would leave the job running with nobody watching it until the lease lapses and it runs again."""
        give_up_at = time.monotonic() + self.lease_seconds
        delay = 0.05
        while True:
            try:
                return write()
            except sa.exc.SQLAlchemyError as exc:
                if time.monotonic() + delay >= give_up_at:
                    log.error(
                        "worker %s: cannot record the outcome of job %s: %s", self.worker_id, job.id, describe(exc)
                    )
                    return ledger.FENCED  # the lease will lapse and another attempt takes over
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _record(self, job: ledger.Job, run: _Run, retry: RetryPolicy) -> str:
        exc = run.error
        if exc is None:
            completed = self._write_outcome(job, lambda: ledger.complete(self.engine, job, run.result, now=self._now()))
            return ledger.SUCCEEDED if completed is True else ledger.FENCED
        if isinstance(exc, JobExpired):
            expired = self._write_outcome(job, lambda: ledger.expire(self.engine, job, now=self._now()))
            return ledger.EXPIRED if expired is True else ledger.FENCED
        if isinstance(exc, Snooze):
            snoozed = self._write_outcome(
                job, lambda: ledger.snooze(self.engine, job, exc.seconds, f"Snooze: {exc.note}", now=self._now())
            )
            return SNOOZED if snoozed is True else ledger.FENCED
        if isinstance(exc, PermanentFailure):
            args = {"error": f"PermanentFailure: {exc}", "permanent": True}
        else:
            error = f"RetryLater: {exc.reason}" if isinstance(exc, RetryLater) else describe(exc)
            asked = exc.seconds if isinstance(exc, RetryLater) else None
            delay = asked if asked is not None else retry.delay(job.attempts, self.app.config, self.rng)
            args = {"error": error, "retry_in": delay}
        return self._write_outcome(job, lambda: ledger.fail(self.engine, job, **args, now=self._now()))


class _Run:
    """A handler call on its own thread, inside the application context; keeps its result or exception."""

    def __init__(self, ctx: JobContext, handler):
        self.ctx, self.handler = ctx, handler
        self.result = None
        self.error: BaseException | None = None

    def __call__(self) -> None:
        try:
            with self.ctx.app.app_context():
                self.result = self.handler(self.ctx)
        except BaseException as exc:  # noqa: BLE001 - every failure is recorded, none escapes the thread
            self.error = exc
