"""The AI results that cards link to: stored under an opaque random id (a SMART link's ``appContext``), with expiry.

The id carries no PHI and cannot be guessed; the row holds what the explanation page needs. A result past its
``expires_at`` is treated as unknown, so the page can say "expired or unknown" without telling the two apart.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from app.cds.cards import Link
from app.db import metadata
from app.jobs.ledger import UTCDateTime, utc_now
from app.logs import describe

log = logging.getLogger(__name__)

SMART_LAUNCH_PATH = "/smart/launch"
RISK = "cardiovascular-risk"
JOB = "job"
KINDS = (RISK, JOB)

ai_results = sa.Table(
    "ai_results",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("client_iss", sa.Text, nullable=True),
    sa.Column("fhir_server", sa.Text, nullable=True),
    sa.Column("patient_id", sa.Text, nullable=True),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Index("ix_ai_results_expires_at", "expires_at"),
)


@dataclass(frozen=True)
class StoredResult:
    """One stored result, as the explanation page reads it."""

    id: str
    kind: str
    client_iss: str | None
    fhir_server: str | None
    patient_id: str | None
    data: Any
    created_at: datetime
    expires_at: datetime


def new_id() -> str:
    """128 random bits, URL-safe: nothing about the patient or the result can be read from it."""
    return secrets.token_urlsafe(16)


def _row(kind, data, client_iss, fhir_server, patient_id, ttl_seconds, now) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"unknown result kind {kind!r}")
    created = utc_now(now)
    return {
        "id": new_id(),
        "kind": kind,
        "client_iss": client_iss,
        "fhir_server": fhir_server,
        "patient_id": patient_id,
        "data": data,
        "created_at": created,
        "expires_at": created + timedelta(seconds=ttl_seconds),
    }


def save(
    engine: sa.Engine,
    kind: str,
    data: Any,
    *,
    client_iss: str | None,
    fhir_server: str | None,
    patient_id: str | None,
    ttl_seconds: float,
    now: datetime | None = None,
) -> str:
    """Store ``data`` for ``ttl_seconds`` now and return its new id (off the hook path: see ResultWriter)."""
    row = _row(kind, data, client_iss, fhir_server, patient_id, ttl_seconds, now)
    with engine.begin() as conn:
        conn.execute(ai_results.insert(), [row])
    return row["id"]


class ResultWriter:
    """Writes hook results in the background, in batches, so a hook never waits for the database's write lock.

    Measured: one INSERT per patient-view hook on SQLite, under 16 concurrent hooks, cut throughput by half and
    put p99 at 900 ms (writers queue on SQLite's single write lock). The id is made here, so the card's link
    is ready at once; the row follows within milliseconds, long before a clinician can click it. A full queue
    (the database down for long) costs the link, never the card.
    """

    def __init__(self, engine: sa.Engine, max_queued: int = 10_000, batch: int = 200):
        self.engine = engine
        self.batch = batch
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(max_queued)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, kind: str, data: Any, *, client_iss, fhir_server, patient_id, ttl_seconds) -> str | None:
        """The new result's id, or None when the queue is full."""
        row = _row(kind, data, client_iss, fhir_server, patient_id, ttl_seconds, None)
        self._start()
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            log.error("results queue full: a card goes out without its explanation link")
            return None
        return row["id"]

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything submitted so far is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():  # also after a fork: threads do not survive it
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="result-writer", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            rows = [self._queue.get()]
            while len(rows) < self.batch:
                try:
                    rows.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._write(rows)
            for _ in rows:
                self._queue.task_done()

    def _write(self, rows: list[dict[str, Any]]) -> None:
        for attempt in range(3):
            try:
                with self.engine.begin() as conn:
                    conn.execute(ai_results.insert(), rows)
                return
            except sa.exc.SQLAlchemyError as exc:
                log.warning("results not written (attempt %d): %s", attempt + 1, describe(exc))
                time.sleep(0.2 * (attempt + 1))
        log.error("%d results dropped after 3 attempts: their cards' links will say 'no longer available'", len(rows))


def load(engine: sa.Engine, result_id: str, *, now: datetime | None = None) -> StoredResult | None:
    """The result stored under ``result_id``, or None when it is unknown or has expired."""
    if not isinstance(result_id, str) or not result_id or len(result_id) > 200:
        return None
    query = sa.select(ai_results).where(ai_results.c.id == result_id, ai_results.c.expires_at > utc_now(now))
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return StoredResult(**row._mapping) if row is not None else None


def purge_expired(engine: sa.Engine, *, now: datetime | None = None) -> int:
    """Delete expired results; returns how many went."""
    with engine.begin() as conn:
        return conn.execute(ai_results.delete().where(ai_results.c.expires_at <= utc_now(now))).rowcount


def save_for_call(call, kind: str, data: Any) -> str | None:
    """Store a hook's result for its card's explanation link; None when it cannot be stored (a database outage
    must not cost the clinician the card, which then goes out without the link)."""
    from flask import current_app, has_app_context

    if not has_app_context() or "results_writer" not in current_app.extensions:
        return None
    try:
        return current_app.extensions["results_writer"].submit(
            kind,
            data,
            client_iss=call.client.iss if call.client is not None else None,
            fhir_server=call.request.fhir_server,
            patient_id=call.request.patient_id,
            ttl_seconds=int(current_app.config["RESULT_TTL_S"]),
        )
    except Exception as exc:
        log.warning("%s result not stored for its card link: %s", kind, describe(exc))
        return None


def smart_link(label: str, result_id: str) -> Link:
    """The card link that launches our SMART app on this result (appContext: its opaque id, no PHI)."""
    from flask import current_app

    url = current_app.config["PUBLIC_BASE_URL"].rstrip("/") + SMART_LAUNCH_PATH
    return Link(label=label, url=url, type="smart", appContext=result_id)


def init_app(app) -> None:
    """One background writer per application (per process)."""
    app.extensions["results_writer"] = ResultWriter(app.extensions["db"])
