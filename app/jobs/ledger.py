"""The job ledger: enqueue idempotently, claim with a lease, heartbeat, and complete or fail fenced on the attempt.

One table is both queue and record. A job's id is its idempotency key. Workers claim a job with a lease
(``lease_owner`` + ``lease_expires_at``) and the attempt number; every later write by that worker is fenced on
(id, lease_owner, attempts), so a worker whose lease lapsed (the sweep put the job back in the queue, and
another worker may hold it now) cannot overwrite the newer attempt.
PostgreSQL claims with ``FOR UPDATE SKIP LOCKED``; SQLite serialises claims with ``BEGIN IMMEDIATE``.
All times are timezone-aware UTC (``app.clock.utc_now``, columns typed ``app.db.UTCDateTime``); every function
that reads the clock accepts ``now`` for tests.

At any depth, every hot statement reads an index in order and touches a bounded number of rows: a claim
takes the head of the queue (``ix_jobs_queue``, or one lookup per kind in ``ix_jobs_queue_by_kind``), the
sweep returns lapsed leases to the queue so that claims read one branch, and the counts behind the metrics
are kept by triggers (``job_counts`` plus the ``job_count_changes`` not yet folded in), never counted.
Finished jobs are purged after their retention (they hold PHI).
Every committed change of a job's state is logged as one JSON line (``app.jobs.events``, never PHI).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from app.clock import utc_now
from app.db import UTCDateTime, metadata
from app.jobs import events
from app.jobs.retry import DEFAULT_POLICY

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
DEAD = "dead"
EXPIRED = "expired"
STATES = (QUEUED, RUNNING, SUCCEEDED, DEAD, EXPIRED)

# The allowed transitions, written down once. A lapsed lease goes back to QUEUED (or DEAD, EXPIRED) by the
# sweep, and is claimed from there. Finished jobs leave the table after their retention.
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, EXPIRED}),
    RUNNING: frozenset({SUCCEEDED, QUEUED, DEAD, EXPIRED}),
    DEAD: frozenset({QUEUED}),
    SUCCEEDED: frozenset(),
    EXPIRED: frozenset(),
}
SWEEP_BATCH = 500  # rows one sweep statement moves: bounds how long it holds SQLite's write lock
PURGE_BATCH = 1000
FOLD_BATCH = 5_000
SQLITE_LOCK_WAIT_S = 15.0  # as the engine's busy_timeout (app/db.py)
# (first, longest) pause between tries for SQLite's write lock: hooks ask often, workers give way.
HOOK_LOCK_PAUSES = (0.00005, 0.0005)
WORKER_LOCK_PAUSES = (0.001, 0.005)

FENCED = "fenced"
LEASE_LOST = "LeaseExpired: worker lost"


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
    # Each hot query's index, read in order (migration 0006).
    sa.Index("ix_jobs_queue", "state", "run_after", "id"),
    sa.Index("ix_jobs_queue_by_kind", "state", "kind", "run_after", "id"),
    sa.Index("ix_jobs_leases", "state", "lease_expires_at"),
    sa.Index("ix_jobs_expiry", "state", "expires_at"),
    sa.Index("ix_jobs_state_updated", "state", "updated_at", "id"),
)

# Jobs and attempts per (kind, state), kept by triggers on ``jobs``: every insert, change of kind, state or
# attempts, and delete appends to ``job_count_changes``; ``fold_counts`` moves those into ``job_counts``.
job_counts = sa.Table(
    "job_counts",
    metadata,
    sa.Column("kind", sa.Text, primary_key=True),
    sa.Column("state", sa.Text, primary_key=True),
    sa.Column("jobs", sa.BigInteger, nullable=False),
    sa.Column("attempts", sa.BigInteger, nullable=False),
)
job_count_changes = sa.Table(
    "job_count_changes",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("jobs", sa.Integer, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
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
    """The default policy's delay after failed attempt number ``attempt`` (``retry.DEFAULT_BACKOFF``), for callers
    that know no job kind's policy; the worker passes the kind's own delay as ``retry_in``."""
    return DEFAULT_POLICY.delay(attempt, {}, rng)


@contextmanager
def _write_transaction(engine: sa.Engine, *, hook: bool = False) -> Iterator[sa.Connection]:
    """One write transaction: on SQLite ``BEGIN IMMEDIATE`` (the write lock up front, see ``_begin_immediate``),
    elsewhere an ordinary transaction (PostgreSQL locks rows, with FOR UPDATE SKIP LOCKED where it claims).
    ``hook``: a clinician waits on this one (an enqueue), so on SQLite it asks for the lock more often than the
    workers do, and gets it first when a worker lets go."""
    if engine.dialect.name != "sqlite":
        with engine.begin() as conn:
            yield conn
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        _begin_immediate(conn, *(HOOK_LOCK_PAUSES if hook else WORKER_LOCK_PAUSES))
        try:
            yield conn
        except BaseException:
            conn.exec_driver_sql("ROLLBACK")
            raise
        conn.exec_driver_sql("COMMIT")


def _begin_immediate(conn: sa.Connection, first_pause: float, longest_pause: float) -> None:
    """Take SQLite's write lock, trying again after ``first_pause``, growing to ``longest_pause`` (to 5 ms once
    it has waited 20 ms), for at most SQLITE_LOCK_WAIT_S. SQLite's own busy handler sleeps 1, 2, 5, 10 ... up to
    100 ms a round: a hook's enqueue that met a worker's claim (held a few milliseconds) waited far longer than
    the claim held the lock."""
    conn.exec_driver_sql("PRAGMA busy_timeout = 0")
    try:
        started = time.monotonic()
        pause = first_pause
        while True:
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                return
            except sa.exc.OperationalError as exc:
                waited = time.monotonic() - started
                if "locked" not in str(exc) or waited > SQLITE_LOCK_WAIT_S:
                    raise
                time.sleep(pause)
                # A hold this long is not a worker's transaction: stop spinning on the CPU the holder needs.
                pause = min(pause * 1.5, longest_pause if waited < 0.02 else 0.005)
    finally:
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(SQLITE_LOCK_WAIT_S * 1000)}")


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
    with _write_transaction(engine, hook=True) as conn:
        created = _changed(conn, statement)
    if created:
        events.job_changed(events.ENQUEUED, job_id, kind, None, QUEUED, 0)
    return created


def _changed(conn: sa.Connection, statement) -> bool:
    """Whether a single-row INSERT/UPDATE wrote its row (RETURNING, as drivers differ on rowcount)."""
    return conn.execute(statement.returning(jobs.c.id)).first() is not None


def _ids(conn: sa.Connection, *where, limit: int = SWEEP_BATCH, order: tuple = ()) -> list[str]:
    """Ids of up to ``limit`` rows matching ``where``, skipping rows another transaction holds (PostgreSQL)."""
    query = sa.select(jobs.c.id).where(*where).order_by(*order).limit(limit).with_for_update(skip_locked=True)
    return list(conn.execute(query).scalars())


def _sweep(conn: sa.Connection, now: datetime) -> tuple[int, list[tuple]]:
    """Expire clinically stale queued jobs, and end every lapsed lease: expired when stale, dead when it was the
    last allowed attempt (the job keeps killing its worker), queued again otherwise, keeping its place (its
    run_after). At most SWEEP_BATCH rows of each, each found through an index. Returns the larger count, and
    the changes made, for ``_log_swept`` to log once they are committed."""
    cleared = {"lease_owner": None, "lease_expires_at": None, "updated_at": now}
    stale = _rows(conn, jobs.c.state == QUEUED, jobs.c.expires_at <= now)
    changes = [(events.EXPIRED, row, QUEUED, EXPIRED) for row in stale]
    if stale:
        conn.execute(jobs.update().where(jobs.c.id.in_([row.id for row in stale])).values(state=EXPIRED, **cleared))
    lapsed = _rows(conn, jobs.c.state == RUNNING, jobs.c.lease_expires_at <= now)
    if not lapsed:
        return len(stale), changes
    still_running = sa.and_(jobs.c.id.in_([row.id for row in lapsed]), jobs.c.state == RUNNING)
    conn.execute(jobs.update().where(still_running, jobs.c.expires_at <= now).values(state=EXPIRED, **cleared))
    conn.execute(
        jobs.update()
        .where(still_running, jobs.c.attempts >= jobs.c.max_attempts)
        .values(state=DEAD, last_error=LEASE_LOST, **cleared)
    )
    conn.execute(jobs.update().where(still_running).values(state=QUEUED, **cleared))
    for row in lapsed:  # the rows are locked (or the database is, on SQLite): these are the changes just made
        if row.expires_at is not None and row.expires_at <= now:
            changes.append((events.EXPIRED, row, RUNNING, EXPIRED))
        elif row.attempts >= row.max_attempts:
            changes.append((events.DEAD, row, RUNNING, DEAD))
        else:
            changes.append((events.LEASE_LAPSED, row, RUNNING, QUEUED))
    return max(len(stale), len(lapsed)), changes


def _rows(conn: sa.Connection, *where) -> list:
    """Up to SWEEP_BATCH rows matching ``where`` (what a sweep needs to know of them), skipping rows another
    transaction holds (PostgreSQL)."""
    query = (
        sa.select(jobs.c.id, jobs.c.kind, jobs.c.attempts, jobs.c.max_attempts, jobs.c.expires_at, jobs.c.lease_owner)
        .where(*where)
        .limit(SWEEP_BATCH)
        .with_for_update(skip_locked=True)
    )
    return list(conn.execute(query))


def _log_swept(changes: list[tuple]) -> None:
    for change, row, source, target in changes:
        error = LEASE_LOST if change == events.DEAD else None
        events.job_changed(change, row.id, row.kind, source, target, row.attempts, worker=row.lease_owner, error=error)


def sweep(engine: sa.Engine, now: datetime | None = None, *, budget_s: float = 0.5) -> None:
    """Expire stale jobs and end lapsed leases (see ``_sweep``), a batch per transaction, again while batches
    come back full, for at most ``budget_s``: a mass expiry (workers down for a day) is cleared in seconds,
    before claims have to step over it at the head of the queue, and no transaction holds a lock for long."""
    give_up = time.monotonic() + budget_s
    while True:
        with _write_transaction(engine) as conn:
            moved, changes = _sweep(conn, utc_now(now))
        _log_swept(changes)
        if moved < SWEEP_BATCH or time.monotonic() > give_up:
            return


def _head(conn: sa.Connection, now: datetime, kind: str | None) -> tuple[datetime, str] | None:
    """(run_after, id) of the first due job (of ``kind``), read from the head of its index."""
    query = (
        sa.select(jobs.c.run_after, jobs.c.id)
        .where(
            jobs.c.state == QUEUED,
            jobs.c.run_after <= now,
            sa.or_(jobs.c.expires_at.is_(None), jobs.c.expires_at > now),
            jobs.c.attempts < jobs.c.max_attempts,
        )
        .order_by(jobs.c.run_after, jobs.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    if kind is not None:
        query = query.where(jobs.c.kind == kind)
    row = conn.execute(query).first()
    return (row.run_after, row.id) if row else None


def claim(
    engine: sa.Engine,
    worker_id: str,
    *,
    lease_seconds: float = 30,
    kinds: Iterable[str] | None = None,
    now: datetime | None = None,
    sweep_first: bool = True,
    priorities: Mapping[str, int] | None = None,
) -> Job | None:
    """Take the oldest due job (of ``kinds``) for ``worker_id``; None when none is due. With ``priorities``
    (kind to number, lower first; 0 when not named), a due job of a lower number is taken before any older
    one of a higher number: population batch parts never hold up a clinician's discharge draft.

    One index lookup per kind (the head of that kind's queue), then one update: the cost does not grow with
    the backlog. Stale jobs and jobs at their last attempt are never claimed. ``sweep_first`` ends lapsed
    leases first (so that their jobs can be claimed now); workers sweep once a second instead."""
    now = utc_now(now)
    swept: list[tuple] = []
    with _write_transaction(engine) as conn:
        if sweep_first:
            swept = _sweep(conn, now)[1]
        rank = priorities or {}
        heads = [
            ((rank.get(kind, 0) if kind else 0), *head)
            for kind in (list(kinds) if kinds is not None else [None])
            if (head := _head(conn, now, kind))
        ]
        row = None
        if heads:
            row = conn.execute(_claim_statement(min(heads)[2], worker_id, now, lease_seconds)).first()
    _log_swept(swept)
    if row is None:
        return None
    job = Job.from_row(row)
    events.job_changed(events.CLAIMED, job.id, job.kind, QUEUED, RUNNING, job.attempts, worker=worker_id)
    return job


def _claim_statement(job_id: str, worker_id: str, now: datetime, lease_seconds: float):
    return (
        jobs.update()
        .where(jobs.c.id == job_id, jobs.c.state == QUEUED)
        .values(
            state=RUNNING,
            attempts=jobs.c.attempts + 1,
            lease_owner=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            updated_at=now,
        )
        .returning(*jobs.c)
    )


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
    with _write_transaction(engine) as conn:
        return _changed(conn, statement)


def complete(engine: sa.Engine, job: Job, result: Any, *, now: datetime | None = None) -> bool:
    """Record success; False (and nothing written) when the lease was taken over."""
    now = utc_now(now)
    statement = (
        jobs.update()
        .where(_fence(job))
        .values(state=SUCCEEDED, result=result, lease_owner=None, lease_expires_at=None, updated_at=now)
    )
    with _write_transaction(engine) as conn:
        done = _changed(conn, statement)
    if done:
        events.job_changed(events.SUCCEEDED, job.id, job.kind, RUNNING, SUCCEEDED, job.attempts, worker=job.lease_owner)
    return done


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
    for a retry after ``retry_in`` seconds (the worker passes the job kind's policy, or the receiver's
    Retry-After; without it the default backoff),
    dead at max_attempts or when ``permanent``, or "fenced" when the lease was taken over."""
    now = utc_now(now)
    if permanent or job.attempts >= job.max_attempts:
        state, run_after, delay = DEAD, now, None
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
    with _write_transaction(engine) as conn:
        if not _changed(conn, statement):
            return FENCED
    change = events.DEAD if state == DEAD else events.RETRY
    events.job_changed(
        change, job.id, job.kind, RUNNING, state, job.attempts, worker=job.lease_owner, error=error, retry_in=delay
    )
    return state


def expire(engine: sa.Engine, job: Job, *, now: datetime | None = None) -> bool:
    """End a running attempt as expired (its result came too late to be used); False when fenced."""
    now = utc_now(now)
    statement = (
        jobs.update().where(_fence(job)).values(state=EXPIRED, lease_owner=None, lease_expires_at=None, updated_at=now)
    )
    with _write_transaction(engine) as conn:
        expired = _changed(conn, statement)
    if expired:
        events.job_changed(events.EXPIRED, job.id, job.kind, RUNNING, EXPIRED, job.attempts, worker=job.lease_owner)
    return expired


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
    with _write_transaction(engine) as conn:
        released = _changed(conn, statement)
    if released:
        events.job_changed(events.RELEASED, job.id, job.kind, RUNNING, QUEUED, job.attempts, worker=job.lease_owner)
    return released


def snooze(engine: sa.Engine, job: Job, seconds: float, note: str, *, now: datetime | None = None) -> bool:
    """Put a running job back to wait ``seconds``, the attempt not counted: it is not failing, just not ready
    (an export still being prepared, a model whose breaker is open). ``note`` (no PHI) is kept as its last
    error so operators see why it waits. False when the lease was already taken over."""
    now = utc_now(now)
    statement = (
        jobs.update()
        .where(_fence(job))
        .values(
            state=QUEUED,
            attempts=jobs.c.attempts - 1,
            run_after=now + timedelta(seconds=max(0.0, seconds)),
            last_error=note,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
        )
    )
    with _write_transaction(engine) as conn:
        snoozed = _changed(conn, statement)
    if snoozed:
        events.job_changed(
            events.RELEASED, job.id, job.kind, RUNNING, QUEUED, job.attempts, worker=job.lease_owner, retry_in=seconds
        )
    return snoozed


def requeue(engine: sa.Engine, job_id: str, *, now: datetime | None = None) -> bool:
    """Send a dead job back to the queue with its attempts reset; False unless it was dead."""
    now = utc_now(now)
    statement = (
        jobs.update()
        .where(jobs.c.id == job_id, jobs.c.state == DEAD)
        .values(state=QUEUED, attempts=0, run_after=now, lease_owner=None, lease_expires_at=None, updated_at=now)
        .returning(jobs.c.kind)
    )
    with _write_transaction(engine) as conn:
        kind = conn.execute(statement).scalar()
    if kind is None:
        return False
    events.job_changed(events.REQUEUED, job_id, kind, DEAD, QUEUED, 0)
    return True


def get(engine: sa.Engine, job_id: str) -> Job | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
    return Job.from_row(row) if row else None


def find(engine: sa.Engine, state: str, *, kind: str | None = None, limit: int = 100) -> list[Job]:
    """Jobs in ``state`` (newest change first), e.g. the dead letter queue."""
    query = (
        sa.select(jobs).where(jobs.c.state == state).order_by(jobs.c.updated_at.desc(), jobs.c.id.desc()).limit(limit)
    )
    if kind is not None:
        query = query.where(jobs.c.kind == kind)
    with engine.connect() as conn:
        return [Job.from_row(row) for row in conn.execute(query)]


def attempts_by_state(engine: sa.Engine) -> dict[tuple[str, str], tuple[int, int]]:
    """(kind, state) -> (jobs, attempts made): the difference is how many retries the ledger has seen.

    The folded counts plus the changes not folded yet, in one statement (one consistent snapshot): its cost
    follows the number of kinds and the changes of the last second, not the table."""
    parts = sa.union_all(
        sa.select(job_counts.c.kind, job_counts.c.state, job_counts.c.jobs, job_counts.c.attempts),
        sa.select(
            job_count_changes.c.kind, job_count_changes.c.state, job_count_changes.c.jobs, job_count_changes.c.attempts
        ),
    ).subquery()
    query = sa.select(parts.c.kind, parts.c.state, sa.func.sum(parts.c.jobs), sa.func.sum(parts.c.attempts))
    with engine.connect() as conn:
        rows = conn.execute(query.group_by(parts.c.kind, parts.c.state)).all()
    return {(kind, state): (int(n), int(attempts)) for kind, state, n, attempts in rows if n}


def counts(engine: sa.Engine) -> dict[str, int]:
    """Jobs per state, every state present."""
    totals = {state: 0 for state in STATES}
    for (_, state), (n, _) in attempts_by_state(engine).items():
        totals[state] = totals.get(state, 0) + n
    return totals


def fold_counts(engine: sa.Engine, limit: int = FOLD_BATCH) -> int:
    """Move up to ``limit`` pending count changes into ``job_counts``; returns how many were folded.

    The changes a folder locks are deleted and summed (DELETE ... RETURNING), so each is counted exactly once
    however many workers fold at the same time; counts are updated in (kind, state) order, so that two folders
    never wait for each other in a circle. On PostgreSQL the locked ids go in as one array
    (``id = ANY(ARRAY(...))``): an IN subquery or list let the planner, which mostly sees this table nearly
    empty, re-run the subquery per pending row or scan the whole table."""
    locked = (
        sa.select(job_count_changes.c.id)
        .order_by(job_count_changes.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if engine.dialect.name == "postgresql":
        taking = job_count_changes.c.id == sa.any_(sa.func.array(locked.scalar_subquery()))
    else:
        taking = job_count_changes.c.id.in_(locked.scalar_subquery())
    with _write_transaction(engine) as conn:
        taken = conn.execute(
            job_count_changes.delete()
            .where(taking)
            .returning(
                job_count_changes.c.kind,
                job_count_changes.c.state,
                job_count_changes.c.jobs,
                job_count_changes.c.attempts,
            )
        ).all()
        sums: dict[tuple[str, str], list[int]] = {}
        for kind, state, n, attempts in taken:
            total = sums.setdefault((kind, state), [0, 0])
            total[0] += n
            total[1] += attempts
        for (kind, state), (n, attempts) in sorted(sums.items()):
            statement = (postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert)(
                job_counts
            ).values(kind=kind, state=state, jobs=n, attempts=attempts)
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["kind", "state"],
                    set_={
                        "jobs": job_counts.c.jobs + statement.excluded.jobs,
                        "attempts": job_counts.c.attempts + statement.excluded.attempts,
                    },
                )
            )
    return len(taken)


def purge(
    engine: sa.Engine,
    *,
    finished_before: datetime | None = None,
    dead_before: datetime | None = None,
    limit: int = PURGE_BATCH,
    budget_s: float = 3.0,
) -> int:
    """Delete finished jobs (succeeded, expired) last changed before ``finished_before`` and dead ones before
    ``dead_before`` (None: not these): they hold PHI (payloads, results, errors). Oldest first, ``limit`` rows
    per transaction, again while batches come back full, each state with its share of ``budget_s`` (so that a
    flood of one never starves the others). Returns how many went."""
    removed = 0
    cutoffs = [(SUCCEEDED, finished_before), (EXPIRED, finished_before), (DEAD, dead_before)]
    cutoffs = [(state, before) for state, before in cutoffs if before is not None]
    for state, before in cutoffs:
        give_up = time.monotonic() + budget_s / len(cutoffs)
        while True:
            with _write_transaction(engine) as conn:
                oldest_first = (jobs.c.updated_at, jobs.c.id)  # the index's order, whatever the planner estimates
                ids = _ids(conn, jobs.c.state == state, jobs.c.updated_at < before, limit=limit, order=oldest_first)
                if ids:
                    removed += conn.execute(jobs.delete().where(jobs.c.id.in_(ids))).rowcount
            if len(ids) < limit or time.monotonic() > give_up:
                break
    return removed


def oldest_queued_age(engine: sa.Engine, now: datetime | None = None) -> float | None:
    """Seconds the longest-waiting due job has waited since it became due (its run_after); None when no
    queued job is due. Jobs held back by retry backoff are not waiting yet."""
    now = utc_now(now)
    query = (
        sa.select(jobs.c.run_after)
        .where(jobs.c.state == QUEUED, jobs.c.run_after <= now)
        .order_by(jobs.c.run_after, jobs.c.id)
        .limit(1)
    )
    with engine.connect() as conn:
        oldest = conn.execute(query).scalar()
    return None if oldest is None else (now - oldest).total_seconds()
