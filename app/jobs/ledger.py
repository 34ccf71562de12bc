"""The job ledger: enqueue idempotently, claim with a lease, heartbeat, and complete or fail fenced on the attempt.

One table is both queue and record. A job's id is its idempotency key. Workers claim a job with a lease
(``lease_owner`` + ``lease_expires_at``) and the attempt number; every later write by that worker is fenced on
(id, lease_owner, attempts), so a worker whose lease was taken over cannot overwrite the newer attempt.
PostgreSQL claims with ``FOR UPDATE SKIP LOCKED``; SQLite serialises claims with ``BEGIN IMMEDIATE``.
All times are timezone-aware UTC; every function that reads the clock accepts ``now`` for tests.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from app.db import metadata

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
DEAD = "dead"
EXPIRED = "expired"
STATES = (QUEUED, RUNNING, SUCCEEDED, DEAD, EXPIRED)

# The allowed transitions, written down once. RUNNING -> RUNNING is a takeover of an expired lease.
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, EXPIRED}),
    RUNNING: frozenset({RUNNING, SUCCEEDED, QUEUED, DEAD, EXPIRED}),
    DEAD: frozenset({QUEUED}),
    SUCCEEDED: frozenset(),
    EXPIRED: frozenset(),
}

BACKOFF_BASE_SECONDS = 2.0
BACKOFF_CAP_SECONDS = 300.0
FENCED = "fenced"


class UTCDateTime(sa.types.TypeDecorator):
    """A timestamptz that always binds UTC and always reads back aware (SQLite stores no offset)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("job ledger times must be timezone-aware")
        return value.astimezone(UTC)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("run_after", UTCDateTime, nullable=False),
    sa.Column("lease_owner", sa.Text, nullable=True),
    sa.Column("lease_expires_at", UTCDateTime, nullable=True),
    sa.Column("expires_at", UTCDateTime, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("result", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index("ix_jobs_state_run_after", "state", "run_after"),
)


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    payload: Any
    state: str
    attempts: int
    max_attempts: int
    run_after: datetime
    lease_owner: str | None
    lease_expires_at: datetime | None
    expires_at: datetime | None
    last_error: str | None
    result: Any
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row) -> Job:
        return cls(**row._mapping)


def can_transition(source: str, target: str) -> bool:
    return target in TRANSITIONS.get(source, frozenset())


def backoff_seconds(attempt: int, rng: random.Random | None = None) -> float:
    """Capped exponential backoff with full jitter before retrying after failed attempt number ``attempt``."""
    ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(attempt - 1, 0))
    return (rng or random).uniform(0, ceiling)


def utc_now(now: datetime | None = None) -> datetime:
    """``now`` (which must be timezone-aware) in UTC, or the current time: one clock for every table we keep."""
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC)


@contextmanager
def _write_transaction(engine: sa.Engine) -> Iterator[sa.Connection]:
    """One write transaction: ``BEGIN IMMEDIATE`` on SQLite (the write lock up front, waiting on busy_timeout),
    an ordinary transaction elsewhere (PostgreSQL locks rows with FOR UPDATE SKIP LOCKED)."""
    if engine.dialect.name != "sqlite":
        with engine.begin() as conn:
            yield conn
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.exec_driver_sql("ROLLBACK")
            raise
        conn.exec_driver_sql("COMMIT")


def _insert(engine: sa.Engine):
    return (postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert)(jobs)


def enqueue(
    engine: sa.Engine,
    job_id: str,
    kind: str,
    payload: Any,
    *,
    max_attempts: int = 5,
    expires_at: datetime | None = None,
    run_after: datetime | None = None,
    now: datetime | None = None,
) -> bool:
    """Add a job unless one with this id (the idempotency key) exists; True when newly created."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    now = utc_now(now)
    values = {
        "id": job_id,
        "kind": kind,
        "payload": payload,
        "state": QUEUED,
        "attempts": 0,
        "max_attempts": max_attempts,
        "run_after": run_after or now,
        "expires_at": expires_at,
        "created_at": now,
        "updated_at": now,
    }
    statement = _insert(engine).values(**values).on_conflict_do_nothing(index_elements=["id"])
    with engine.begin() as conn:
        return _changed(conn, statement)


def _changed(conn: sa.Connection, statement) -> bool:
    """Whether a single-row INSERT/UPDATE wrote its row (RETURNING, as drivers differ on rowcount)."""
    return conn.execute(statement.returning(jobs.c.id)).first() is not None


def _lease_lapsed(now: datetime):
    return sa.and_(jobs.c.state == RUNNING, jobs.c.lease_expires_at <= now)


def _sweep(conn: sa.Connection, now: datetime) -> None:
    """Expire clinically stale jobs, and dead-letter jobs whose lease lapsed on their last allowed attempt
    (they keep killing their worker). Rows another claimer holds are skipped, not waited for."""
    stale = sa.and_(
        jobs.c.expires_at.is_not(None),
        jobs.c.expires_at <= now,
        sa.or_(jobs.c.state == QUEUED, _lease_lapsed(now)),
    )
    killers = sa.and_(_lease_lapsed(now), jobs.c.attempts >= jobs.c.max_attempts)
    for condition, state, error in ((stale, EXPIRED, None), (killers, DEAD, "LeaseExpired: worker lost")):
        ids = sa.select(jobs.c.id).where(condition).with_for_update(skip_locked=True)
        values = {"state": state, "lease_owner": None, "lease_expires_at": None, "updated_at": now}
        if error:
            values["last_error"] = error
        conn.execute(jobs.update().where(jobs.c.id.in_(ids)).values(**values))


def sweep(engine: sa.Engine, now: datetime | None = None) -> None:
    """Expire stale jobs and dead-letter the ones that keep killing their worker (see ``_sweep``)."""
    with _write_transaction(engine) as conn:
        _sweep(conn, utc_now(now))


def claim(
    engine: sa.Engine,
    worker_id: str,
    *,
    lease_seconds: float = 30,
    kinds: Iterable[str] | None = None,
    now: datetime | None = None,
    sweep_first: bool = True,
) -> Job | None:
    """Take the oldest due job (queued, or running with a lapsed lease) for ``worker_id``; None when none is due.

    Stale jobs and jobs at their last attempt are never claimed, swept or not; ``sweep_first=False`` leaves
    moving them to expired/dead to a periodic :func:`sweep` (workers do that, to keep claims one statement)."""
    now = utc_now(now)
    not_stale = sa.or_(jobs.c.expires_at.is_(None), jobs.c.expires_at > now)
    due = sa.or_(sa.and_(jobs.c.state == QUEUED, jobs.c.run_after <= now), _lease_lapsed(now))
    candidate = (
        sa.select(jobs.c.id)
        .where(due, not_stale, jobs.c.attempts < jobs.c.max_attempts)
        .order_by(jobs.c.run_after, jobs.c.created_at, jobs.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    if kinds is not None:
        candidate = candidate.where(jobs.c.kind.in_(list(kinds)))
    statement = (
        jobs.update()
        .where(jobs.c.id == candidate.scalar_subquery())
        .values(
            state=RUNNING,
            attempts=jobs.c.attempts + 1,
            lease_owner=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            updated_at=now,
        )
        .returning(*jobs.c)
    )
    with _write_transaction(engine) as conn:
        if sweep_first:
            _sweep(conn, now)
        row = conn.execute(statement).first()
    return Job.from_row(row) if row else None


def _fence(job: Job):
    return sa.and_(
        jobs.c.id == job.id,
        jobs.c.state == RUNNING,
        jobs.c.lease_owner == job.lease_owner,
        jobs.c.attempts == job.attempts,
    )


def heartbeat(engine: sa.Engine, job: Job, *, lease_seconds: float = 30, now: datetime | None = None) -> bool:
    """Extend the lease while this worker's attempt still owns it; False once it was taken over or ended."""
    now = utc_now(now)
    statement = (
        jobs.update().where(_fence(job)).values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
    )
    with engine.begin() as conn:
        return _changed(conn, statement)


def complete(engine: sa.Engine, job: Job, result: Any, *, now: datetime | None = None) -> bool:
    """Record success; False (and nothing written) when the lease was taken over."""
    now = utc_now(now)
    statement = (
        jobs.update()
        .where(_fence(job))
        .values(state=SUCCEEDED, result=result, lease_owner=None, lease_expires_at=None, updated_at=now)
    )
    with engine.begin() as conn:
        return _changed(conn, statement)


def fail(
    engine: sa.Engine,
    job: Job,
    error: str,
    *,
    retry_in: float | None = None,
    permanent: bool = False,
    now: datetime | None = None,
    rng: random.Random | None = None,
) -> str:
    """Record a failed attempt (``error``: exception type and place, never PHI). Returns the new state: queued
    for a retry after backoff (or after ``retry_in`` seconds when the caller knows better, e.g. Retry-After),
    dead at max_attempts or when ``permanent``, or "fenced" when the lease was taken over."""
    now = utc_now(now)
    if permanent or job.attempts >= job.max_attempts:
        state, run_after = DEAD, now
    else:
        delay = backoff_seconds(job.attempts, rng) if retry_in is None else max(0.0, retry_in)
        state, run_after = QUEUED, now + timedelta(seconds=delay)
    statement = (
        jobs.update()
        .where(_fence(job))
        .values(
            state=state,
            run_after=run_after,
            last_error=error,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
        )
    )
    with engine.begin() as conn:
        return state if _changed(conn, statement) else FENCED


def expire(engine: sa.Engine, job: Job, *, now: datetime | None = None) -> bool:
    """End a running attempt as expired (its result came too late to be used); False when fenced."""
    now = utc_now(now)
    statement = (
        jobs.update().where(_fence(job)).values(state=EXPIRED, lease_owner=None, lease_expires_at=None, updated_at=now)
    )
    with engine.begin() as conn:
        return _changed(conn, statement)


def release(engine: sa.Engine, job: Job, *, now: datetime | None = None) -> bool:
    """Hand a running job back unfinished (a worker shutting down): queued again at once, the attempt not
    counted. False when the lease was already taken over."""
    now = utc_now(now)
    statement = (
        jobs.update()
        .where(_fence(job))
        .values(
            state=QUEUED,
            attempts=jobs.c.attempts - 1,
            run_after=now,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
        )
    )
    with engine.begin() as conn:
        return _changed(conn, statement)


def requeue(engine: sa.Engine, job_id: str, *, now: datetime | None = None) -> bool:
    """Send a dead job back to the queue with its attempts reset; False unless it was dead."""
    now = utc_now(now)
    statement = (
        jobs.update()
        .where(jobs.c.id == job_id, jobs.c.state == DEAD)
        .values(state=QUEUED, attempts=0, run_after=now, lease_owner=None, lease_expires_at=None, updated_at=now)
    )
    with engine.begin() as conn:
        return _changed(conn, statement)


def get(engine: sa.Engine, job_id: str) -> Job | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
    return Job.from_row(row) if row else None


def find(engine: sa.Engine, state: str, *, kind: str | None = None, limit: int = 100) -> list[Job]:
    """Jobs in ``state`` (newest change first), e.g. the dead letter queue."""
    query = sa.select(jobs).where(jobs.c.state == state).order_by(jobs.c.updated_at.desc(), jobs.c.id).limit(limit)
    if kind is not None:
        query = query.where(jobs.c.kind == kind)
    with engine.connect() as conn:
        return [Job.from_row(row) for row in conn.execute(query)]


def attempts_by_state(engine: sa.Engine) -> dict[tuple[str, str], tuple[int, int]]:
    """(kind, state) -> (jobs, attempts made): the difference is how many retries the ledger has seen."""
    query = sa.select(jobs.c.kind, jobs.c.state, sa.func.count(), sa.func.coalesce(sa.func.sum(jobs.c.attempts), 0))
    with engine.connect() as conn:
        rows = conn.execute(query.group_by(jobs.c.kind, jobs.c.state)).all()
    return {(kind, state): (int(n), int(attempts)) for kind, state, n, attempts in rows}


def counts(engine: sa.Engine) -> dict[str, int]:
    """Jobs per state, every state present."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)).all()
    return {state: 0 for state in STATES} | {state: n for state, n in rows}


def oldest_queued_age(engine: sa.Engine, now: datetime | None = None) -> float | None:
    """Seconds the longest-waiting due job has waited since it became due (its run_after); None when no
    queued job is due. Jobs held back by retry backoff are not waiting yet."""
    now = utc_now(now)
    query = sa.select(sa.func.min(jobs.c.run_after)).where(jobs.c.state == QUEUED, jobs.c.run_after <= now)
    with engine.connect() as conn:
        oldest = conn.execute(query).scalar()
    if oldest is None:
        return None
    if oldest.tzinfo is None:  # aggregates bypass the column type on SQLite
        oldest = datetime.fromisoformat(str(oldest)).replace(tzinfo=UTC)
    return (now - oldest).total_seconds()
