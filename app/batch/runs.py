"""Batch runs: one row per population run, the state every worker and command reads.

A run moves ``exporting -> splitting -> scoring -> finishing -> succeeded``, or ends ``failed`` or ``cancelled``.
What a stage has finished is on disk (``app.batch.parts``); the row holds what must survive a restart before
anything else: the export's status URL (stored the moment the server gives it), its manifest, the plan of parts,
and why the run waits (``note``: an export in progress, a paused model). No patient data is kept here.
"""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from app.clock import utc_now
from app.db import UTCDateTime, metadata

EXPORTING, SPLITTING, SCORING, FINISHING = "exporting", "splitting", "scoring", "finishing"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
ACTIVE = (EXPORTING, SPLITTING, SCORING, FINISHING)
ENDED = (SUCCEEDED, FAILED, CANCELLED)
STATES = ACTIVE + ENDED

batch_runs = sa.Table(
    "batch_runs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("service", sa.Text, nullable=False),
    sa.Column("client_iss", sa.Text, nullable=False),
    sa.Column("fhir_server", sa.Text, nullable=False),
    sa.Column("group_id", sa.Text, nullable=True),
    sa.Column("since", sa.Text, nullable=True),
    sa.Column("write_back", sa.Boolean, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("note", sa.Text, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("exports", sa.Integer, nullable=False),  # kick-offs so far (a new one when files expired)
    sa.Column("status_url", sa.Text, nullable=True),
    sa.Column("type_filtered", sa.Boolean, nullable=True),  # whether the server took our _typeFilter
    sa.Column("manifest", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("transaction_time", sa.Text, nullable=True),
    sa.Column("plan", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("summary", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("times", sa.JSON, nullable=False),  # when each stage began and ended (ISO 8601)
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.Index("ix_batch_runs_created", "created_at"),
)


@dataclass(frozen=True)
class Run:
    id: str
    service: str
    client_iss: str
    fhir_server: str
    group_id: str | None
    since: str | None
    write_back: bool
    state: str
    note: str | None
    error: str | None
    exports: int
    status_url: str | None
    type_filtered: bool | None
    manifest: dict[str, Any] | None
    transaction_time: str | None
    plan: dict[str, Any] | None
    summary: dict[str, Any] | None
    times: dict[str, str]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row) -> Run:
        return cls(**row._mapping)

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def parameters(self) -> dict[str, Any]:
        """What the run was asked to do (the manifest's and the report's ``parameters``)."""
        return {
            "service": self.service,
            "client": self.client_iss,
            "fhirServer": self.fhir_server,
            "group": self.group_id,
            "since": self.since,
            "writeBack": self.write_back,
        }


def new_run_id() -> str:
    """Opaque, unguessable, safe in paths and URLs."""
    return f"run-{secrets.token_hex(8)}"


def create(
    engine: sa.Engine,
    *,
    service: str,
    client_iss: str,
    fhir_server: str,
    group_id: str | None,
    since: str | None,
    write_back: bool,
    run_id: str | None = None,
    now: datetime | None = None,
) -> Run:
    now = utc_now(now)
    values = {
        "id": run_id or new_run_id(),
        "service": service,
        "client_iss": client_iss,
        "fhir_server": fhir_server,
        "group_id": group_id,
        "since": since,
        "write_back": write_back,
        "state": EXPORTING,
        "exports": 0,
        "times": {"created": now.isoformat()},
        "created_at": now,
        "updated_at": now,
    }
    with engine.begin() as conn:
        conn.execute(batch_runs.insert().values(**values))
    return get(engine, values["id"])  # type: ignore[return-value]


def get(engine: sa.Engine, run_id: str) -> Run | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(batch_runs).where(batch_runs.c.id == run_id)).first()
    return Run.from_row(row) if row else None


def recent(engine: sa.Engine, limit: int = 50) -> list[Run]:
    """The newest runs first."""
    query = sa.select(batch_runs).order_by(batch_runs.c.created_at.desc(), batch_runs.c.id).limit(limit)
    with engine.connect() as conn:
        return [Run.from_row(row) for row in conn.execute(query)]


def update(
    engine: sa.Engine,
    run_id: str,
    *,
    when: tuple[str, ...] = ACTIVE,
    stamp: str | None = None,
    now: datetime | None = None,
    **values: Any,
) -> bool:
    """Set ``values`` on the run if its state is one of ``when`` (default: still active), so that a cancelled or
    ended run is never moved on by a worker that was late; ``stamp`` records the moment under ``times``. True
    when the row changed."""
    now = utc_now(now)
    if values.get("state") in ENDED:
        values.setdefault("finished_at", now)
    where = sa.and_(batch_runs.c.id == run_id, batch_runs.c.state.in_(when))
    with engine.begin() as conn:  # the UPDATE first: on SQLite it takes the write lock before the read below
        changed = conn.execute(
            batch_runs.update().where(where).values(updated_at=now, **values).returning(batch_runs.c.id)
        ).first()
        if changed is not None and stamp:
            times = conn.execute(sa.select(batch_runs.c.times).where(batch_runs.c.id == run_id)).scalar_one()
            times = {**(times or {}), stamp: now.isoformat()}
            conn.execute(batch_runs.update().where(batch_runs.c.id == run_id).values(times=times))
    return changed is not None


def purge(engine: sa.Engine, batch_dir: Path, *, ended_before: datetime, limit: int = 1000) -> int:
    """Delete runs that ended before ``ended_before``: their directory under ``batch_dir`` first (the PHI), then
    their row; how many runs went."""
    query = (
        sa.select(batch_runs.c.id)
        .where(batch_runs.c.state.in_(ENDED), batch_runs.c.finished_at < ended_before)
        .order_by(batch_runs.c.finished_at)
        .limit(limit)
    )
    with engine.connect() as conn:
        ids = list(conn.execute(query).scalars())
    for run_id in ids:
        shutil.rmtree(batch_dir / run_id, ignore_errors=True)
    if ids:
        with engine.begin() as conn:
            conn.execute(batch_runs.delete().where(batch_runs.c.id.in_(ids)))
    return len(ids)


def state_counts(engine: sa.Engine) -> tuple[dict[str, int], int]:
    """Runs per state (ended runs until purged), and how many active runs are paused (a model unavailable)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(batch_runs.c.state, sa.func.count()).group_by(batch_runs.c.state)).all()
        paused = conn.execute(
            sa.select(sa.func.count()).where(batch_runs.c.state.in_(ACTIVE), batch_runs.c.note.like("paused%"))
        ).scalar_one()
    return {state: count for state, count in rows}, paused
