"""The AI results that cards link to: stored under an opaque random id (a SMART link's ``appContext``), with expiry.

The id carries no PHI and cannot be guessed; the row holds what the explanation page needs. A result past its
``expires_at`` is treated as unknown, so the page can say "expired or unknown" without telling the two apart.
A result's ``kind`` is the id of the declared service whose explanation page shows it.
"""

from __future__ import annotations

import atexit
import logging
import queue
import re
import secrets
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from flask import current_app, has_app_context

from app.cds.cards import Link
from app.cds.service import CdsService, ServiceCall, get_service, load_services
from app.clock import utc_now
from app.db import UTCDateTime, metadata
from app.logs import describe
from app.metrics import RESULTS_NOT_STORED

log = logging.getLogger(__name__)

SMART_LAUNCH_PATH = "/smart/launch"

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


ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{22}")  # what new_id makes; nothing else can name a result
MAX_TEXT = 2048


class UnstorableResult(ValueError):
    """A result that no database could store as it is (says which member, never its value)."""


def _text(name: str, value: Any) -> str | None:
    """A text column's value as every database takes it: no NUL (PostgreSQL refuses it), valid UTF-8, bounded."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise UnstorableResult(f"{name} is not text")
    if len(value) > MAX_TEXT or "\x00" in value or not _utf8(value):
        raise UnstorableResult(f"{name} holds NUL, invalid Unicode or more than {MAX_TEXT} characters")
    return value


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _json(data: Any) -> Any:
    """``data`` as plain JSON (str keys, finite numbers, no surrogates), so the INSERT cannot fail on it."""
    try:
        return orjson.loads(orjson.dumps(data))
    except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
        raise UnstorableResult("data is not JSON") from None


def _explained(kind: Any) -> bool:
    """Whether ``kind`` names a declared service with an explanation page (services are loaded if need be)."""
    if not isinstance(kind, str):
        return False
    service = get_service(kind)
    if service is None:
        load_services()
        service = get_service(kind)
    return service is not None and service.explanation is not None


def _row(kind, data, client_iss, fhir_server, patient_id, ttl_seconds, now) -> dict[str, Any]:
    """A row that can be stored by construction, or UnstorableResult."""
    if not _explained(kind):
        raise ValueError(f"result kind {kind!r} is not a declared service with an explanation")
    created = utc_now(now)
    return {
        "id": new_id(),
        "kind": kind,
        "client_iss": _text("client_iss", client_iss),
        "fhir_server": _text("fhir_server", fhir_server),
        "patient_id": _text("patient_id", patient_id),
        "data": _json(data),
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


# SQLSTATE classes of errors about the rows themselves, which PostgreSQL may raise as OperationalError: data
# exception (22), integrity (23), program limit exceeded (54: e.g. a value too large for an index row).
_ROW_ERROR_CLASSES = ("22", "23", "54")


def _cannot_connect(exc: Exception) -> bool:
    """The database could not be reached or used at all, or was busy (a lock), as opposed to refusing these rows."""
    if getattr(exc, "connection_invalidated", False):
        return True
    if not isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)):
        return False
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None) or ""
    return sqlstate[:2] not in _ROW_ERROR_CLASSES


class ResultWriter:
    """Writes hook results in the background, in batches, so a hook never waits for the database's write lock.

    Measured: one INSERT per patient-view hook on SQLite, under 16 concurrent hooks, cut throughput by half and
    put p99 at 900 ms (writers queue on SQLite's single write lock). The id is made here, so the card's link
    is ready at once; the row follows within milliseconds, long before a clinician can click it.

    A card links only to a result that will be stored: rows that no database could store are refused at
    ``submit`` (no link), as are all rows while the database cannot be reached. A refused batch is written again
    row by row, so a bad row costs only its own link (logged and counted); accepted rows wait out an outage.
    """

    RETRY_FIRST_S = 0.2
    RETRY_MAX_S = 5.0
    ROW_TRIES = 5  # a row that keeps failing as if the database were busy (a lock) while it answers

    def __init__(self, engine: sa.Engine, max_queued: int = 10_000, batch: int = 200):
        self.engine = engine
        self.batch = batch
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(max_queued)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._unreachable = threading.Event()  # set while the database cannot be reached: no new links
        self._tries: dict[str, int] = {}  # writer thread only

    def submit(self, kind: str, data: Any, *, client_iss, fhir_server, patient_id, ttl_seconds) -> str | None:
        """The new result's id, or None when its card must go without a link (see the class)."""
        self._start()
        if self._unreachable.is_set():
            RESULTS_NOT_STORED.labels("database-unreachable").inc()
            return None
        try:
            row = _row(kind, data, client_iss, fhir_server, patient_id, ttl_seconds, None)
        except UnstorableResult as exc:
            RESULTS_NOT_STORED.labels("unstorable").inc()
            log.error("%s result not stored, its card goes without the explanation link: %s", kind, exc)
            return None
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            RESULTS_NOT_STORED.labels("queue-full").inc()
            log.error("results queue full: a card goes out without its explanation link")
            return None
        return row["id"]

    @property
    def reachable(self) -> bool:
        """False while the last attempt to reach the database failed (cards then go without links)."""
        return not self._unreachable.is_set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted so far is written or dropped (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._queue.unfinished_tasks

    def close(self, timeout: float = 5.0) -> None:
        """At process exit: write what is queued, for at most ``timeout``; what remains is counted as lost (its
        cards carry links that will say "no longer available")."""
        if self._thread is None or self.flush(timeout):
            return
        lost = self._queue.unfinished_tasks
        RESULTS_NOT_STORED.labels("lost-at-exit").inc(lost)
        log.error("%d results not written before the process exited: their cards' links point at nothing", lost)

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():  # also after a fork: threads do not survive it
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="result-writer", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        rows: list[dict[str, Any]] = []
        delay = self.RETRY_FIRST_S
        while True:
            if not rows:
                self._tries.clear()
                if self._unreachable.is_set() and not self._ping():
                    delay = self._back_off(delay)
                    continue
                self._set_reachable(True)
                delay = self.RETRY_FIRST_S
                rows = self._next_batch()
            rows = self._write(rows)
            if rows:
                self._set_reachable(False)
                delay = self._back_off(delay)
                rows = self._drop_expired(rows)

    def _back_off(self, delay: float) -> float:
        time.sleep(delay)
        return min(delay * 2, self.RETRY_MAX_S)

    def _next_batch(self) -> list[dict[str, Any]]:
        rows = [self._queue.get()]
        while len(rows) < self.batch:
            try:
                rows.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return rows

    def _write(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write ``rows``, one by one if the batch is refused; returns those left when the database is unreachable."""
        try:
            self._insert(rows)
            self._done(len(rows))
            return []
        except Exception as exc:
            if self._unreachable_after(exc):
                log.warning("%d results wait for the database: %s", len(rows), describe(exc))
                return rows
            log.warning("a batch of %d results was refused (%s): writing them one by one", len(rows), describe(exc))
        for i, row in enumerate(rows):
            try:
                self._insert([row])
            except Exception as exc:
                if self._unreachable_after(exc) or self._busy(row, exc):
                    return rows[i:]
                self._drop(row, "rejected", describe(exc))
            else:
                self._done(1)
        return []

    def _unreachable_after(self, exc: Exception) -> bool:
        """Whether ``exc`` means the database cannot be reached (rather than that it refused these rows)."""
        return _cannot_connect(exc) and not self._ping()

    def _busy(self, row: dict[str, Any], exc: Exception) -> bool:
        """An operational error while the database answers (a lock held too long): worth a few more tries."""
        tries = self._tries[row["id"]] = self._tries.get(row["id"], 0) + 1
        return _cannot_connect(exc) and tries < self.ROW_TRIES

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        with self.engine.begin() as conn:
            conn.execute(ai_results.insert(), rows)

    def _ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except Exception:
            return False

    def _drop_expired(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        now = utc_now()
        for row in rows:
            if row["expires_at"] <= now:
                self._drop(row, "expired", "the database was unreachable for longer than the result lives")
        return [row for row in rows if row["expires_at"] > now]

    def _drop(self, row: dict[str, Any], reason: str, why: str) -> None:
        RESULTS_NOT_STORED.labels(reason).inc()
        log.error("%s result not stored (%s): its card's link will say 'no longer available'", row["kind"], why)
        self._done(1)

    def _done(self, count: int) -> None:
        for _ in range(count):
            self._queue.task_done()

    def _set_reachable(self, reachable: bool) -> None:
        if reachable and self._unreachable.is_set():
            self._unreachable.clear()
            log.warning("results database reachable again: cards carry explanation links again")
        elif not reachable and not self._unreachable.is_set():
            self._unreachable.set()
            log.error("results database unreachable: cards go out without explanation links until it answers")


def load(engine: sa.Engine, result_id: str, *, now: datetime | None = None) -> StoredResult | None:
    """The result stored under ``result_id``, or None when it is unknown or has expired."""
    if not isinstance(result_id, str) or not ID_PATTERN.fullmatch(result_id):
        return None
    query = sa.select(ai_results).where(ai_results.c.id == result_id, ai_results.c.expires_at > utc_now(now))
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return StoredResult(**row._mapping) if row is not None else None


def purge_expired(engine: sa.Engine, *, now: datetime | None = None, batch: int = 1000, budget_s: float = 1.0) -> int:
    """Delete expired results, oldest first through the expiry index, ``batch`` rows per transaction and again
    while batches come back full, for at most ``budget_s``; returns how many went."""
    expired = (
        sa.select(ai_results.c.id)
        .where(ai_results.c.expires_at <= utc_now(now))
        .order_by(ai_results.c.expires_at)
        .limit(batch)
    )
    removed, give_up = 0, time.monotonic() + budget_s
    while True:
        with engine.begin() as conn:
            deleted = conn.execute(ai_results.delete().where(ai_results.c.id.in_(expired.scalar_subquery()))).rowcount
        removed += deleted
        if deleted < batch or time.monotonic() > give_up:
            return removed


def save_for_call(call: ServiceCall, kind: str, data: Any) -> str | None:
    """Store a hook's result for its card's explanation link; None when it cannot be stored (a database outage
    must not cost the clinician the card, which then goes out without the link)."""
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
    url = current_app.config["PUBLIC_BASE_URL"].rstrip("/") + SMART_LAUNCH_PATH
    return Link(label=label, url=url, type="smart", appContext=result_id)


def explanation_link(service: CdsService, call: ServiceCall, data: Any) -> Link | None:
    """``ServiceCall.explain``: store ``data`` under the service's id and return the link to its explanation page,
    labelled as the service declared; None when it cannot be stored now."""
    if service.explanation is None:
        raise ValueError(f"service {service.id!r} declares no explanation")
    result_id = save_for_call(call, service.id, data)
    return smart_link(service.explanation.label, result_id) if result_id is not None else None


def init_app(app) -> None:
    """One background writer per application (per process), drained when the process exits."""
    writer = app.extensions["results_writer"] = ResultWriter(app.extensions["db"])
    atexit.register(_close, weakref.ref(writer))  # weak: an application dropped before exit is not kept alive


def _close(writer_ref: weakref.ref) -> None:
    writer = writer_ref()
    if writer is not None:
        writer.close()
