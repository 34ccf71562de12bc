"""Workers you can see: each worker process keeps one row in ``job_workers`` alive with a heartbeat.

A process writes its row when it starts and again every ``HEARTBEAT_SECONDS`` (``jobs worker --heartbeat``),
each time promising to be alive until ``LIVE_BEATS`` beats from now (``live_until``). A clean stop marks the
row stopped at once; a killed or hung process stops beating and its row goes stale when the promise lapses.
``/readyz`` and the ``gateway_workers_live`` gauge count the rows whose promise holds, so readers need not
know the workers' interval. Rows are purged ``RETENTION_SECONDS`` after they stopped or went stale.

A beat is one single-row write in a short transaction of its own (on SQLite: ``BEGIN IMMEDIATE`` with the
workers' patient retries, so that a hook's enqueue still gets the write lock first, see ADR 0005). A beat
that fails (the database away) is logged and the next one tries again: the worker keeps working.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from flask import Flask
from sqlalchemy.dialects import postgresql, sqlite

from app.clock import utc_now
from app.db import UTCDateTime, metadata
from app.jobs import ledger
from app.logs import describe

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
LIVE_BEATS = 3  # a worker that missed this many beats in a row counts as lost
RETENTION_SECONDS = 86_400.0
STOP_WAIT_SECONDS = 5.0  # how long a stop waits for a beat in flight before marking the row

job_workers = sa.Table(
    "job_workers",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("kinds", sa.JSON, nullable=False),
    sa.Column("threads", sa.Integer, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("seen_at", UTCDateTime, nullable=False),
    sa.Column("live_until", UTCDateTime, nullable=False),
    sa.Column("stopped_at", UTCDateTime, nullable=True),
    sa.Column("jobs_run", sa.BigInteger, nullable=False),
    sa.Column("jobs_failed", sa.BigInteger, nullable=False),
    sa.Index("ix_job_workers_live_until", "live_until"),
)


def _insert(engine: sa.Engine):
    return (postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert)(job_workers)


class Presence:
    """One worker process's row and the thread that keeps it alive: ``start()``, ``count()`` per job, ``stop()``."""

    def __init__(
        self,
        engine: sa.Engine,
        worker_id: str,
        kinds: list[str],
        *,
        threads: int = 1,
        interval: float = HEARTBEAT_SECONDS,
    ):
        if interval <= 0:
            raise ValueError("the heartbeat interval must be positive")
        self.engine = engine
        self.worker_id = worker_id
        self.kinds = list(kinds)
        self.threads = threads
        self.interval = interval
        self.started_at = utc_now()
        self._counts = {"jobs_run": 0, "jobs_failed": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_app(cls, app: Flask, worker_id: str, kinds: list[str], **options) -> Presence:
        return cls(app.extensions["db"], worker_id, kinds, **options)

    def start(self) -> Presence:
        """Write the row now (a failure is logged, not raised) and beat on a daemon thread until ``stop``."""
        self.beat()
        self._thread = threading.Thread(target=self._beat_until_stopped, name="worker-heartbeat", daemon=True)
        self._thread.start()
        return self

    def count(self, state: str) -> None:
        """Count one job attempt run, by how it ended (a retry or a dead letter counts as failed)."""
        with self._lock:
            self._counts["jobs_run"] += 1
            if state in (ledger.QUEUED, ledger.DEAD):
                self._counts["jobs_failed"] += 1

    def beat(self, now: datetime | None = None) -> bool:
        """Say this worker is alive (recreating the row if it was purged meanwhile); False when it failed."""
        now = utc_now(now)
        with self._lock:
            counts = dict(self._counts)
        alive = {"seen_at": now, "live_until": now + timedelta(seconds=self.interval * LIVE_BEATS), **counts}
        statement = (
            _insert(self.engine)
            .values(
                id=self.worker_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                kinds=self.kinds,
                threads=self.threads,
                started_at=self.started_at,
                stopped_at=None,
                **alive,
            )
            .on_conflict_do_update(index_elements=["id"], set_=alive)
        )
        try:
            with ledger._write_transaction(self.engine) as conn:
                conn.execute(statement)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("worker %s: heartbeat not written: %s", self.worker_id, describe(exc))
            return False
        return True

    def stop(self) -> None:
        """Stop beating and mark the row stopped, so that it stops counting as live at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=STOP_WAIT_SECONDS)
        now = utc_now()
        with self._lock:
            counts = dict(self._counts)
        statement = (
            job_workers.update()
            .where(job_workers.c.id == self.worker_id)
            .values(stopped_at=now, seen_at=now, live_until=now, **counts)
        )
        try:
            with ledger._write_transaction(self.engine) as conn:
                conn.execute(statement)
        except sa.exc.SQLAlchemyError as exc:  # the row goes stale instead, within LIVE_BEATS beats
            log.warning("worker %s: could not record its stop: %s", self.worker_id, describe(exc))

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()


def live_count(engine: sa.Engine, now: datetime | None = None) -> int:
    """Worker processes whose last heartbeat is recent enough (read through ``ix_job_workers_live_until``)."""
    query = (
        sa.select(sa.func.count())
        .select_from(job_workers)
        .where(job_workers.c.live_until > utc_now(now), job_workers.c.stopped_at.is_(None))
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)


def listing(engine: sa.Engine, now: datetime | None = None) -> list[dict[str, Any]]:
    """Every worker row (live, lost, stopped), most recently seen first, for operators."""
    now = utc_now(now)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(job_workers).order_by(job_workers.c.seen_at.desc())).all()
    return [
        {
            "id": row.id,
            "host": row.host,
            "pid": row.pid,
            "state": "stopped" if row.stopped_at else "live" if row.live_until > now else "lost",
            "kinds": row.kinds,
            "threads": row.threads,
            "startedAt": _time(row.started_at),
            "seenAt": _time(row.seen_at),
            "stoppedAt": _time(row.stopped_at),
            "jobsRun": row.jobs_run,
            "jobsFailed": row.jobs_failed,
        }
        for row in rows
    ]


def purge(engine: sa.Engine, before: datetime, *, limit: int = ledger.PURGE_BATCH) -> int:
    """Delete the rows of workers stopped or lost before ``before``, at most ``limit`` (oldest first, through
    the live_until index; the next round takes the rest); returns how many went."""
    gone = sa.select(job_workers.c.id).where(job_workers.c.live_until < before).order_by(job_workers.c.live_until)
    with ledger._write_transaction(engine) as conn:
        ids = list(conn.execute(gone.limit(limit)).scalars())
        return conn.execute(job_workers.delete().where(job_workers.c.id.in_(ids))).rowcount if ids else 0


def _time(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None
