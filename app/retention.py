"""What the gateway keeps and for how long, declared once: the job workers' housekeeping enforces this table.

Each entry names what is kept, the setting that says how long (with its default) and how to purge it in
bounded batches. ``purge_all`` runs every entry once (``app.jobs.maintenance`` calls it once a minute from
every worker: each purge is safe to run from many workers at once); an entry that deleted rows logs one line,
``retention: purged 120 ai_results past RESULT_TTL_S``, and counts them in ``gateway_retention_purged_total``.
Counts and names only: a purge never logs what it deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from prometheus_client import Counter

from app import results
from app.batch import runs as batch_runs
from app.clock import utc_now
from app.jobs import ledger, presence
from app.logs import describe
from app.smart import sessions

log = logging.getLogger(__name__)

PURGED = Counter("gateway_retention_purged_total", "Rows deleted past their retention, by what they were", ["what"])

BATCH = ledger.PURGE_BATCH  # rows per delete statement
BUDGET_S = 1.0  # per entry and round: a backlog goes over the next rounds, a minute apart


@dataclass(frozen=True)
class Kept:
    """One kind of record: how long it is kept and how it goes."""

    what: str  # the label of gateway_retention_purged_total and the word of the log line
    table: str
    holds: str  # what it holds (PHI or not), for the operators' documentation
    setting: str | None  # the setting that says how long, in seconds; None: ``default_s``, fixed
    default_s: int
    counted_from: str  # what the period counts from
    # (engine, cutoff, batch, budget_s, config) -> rows deleted
    purge: Callable[[sa.Engine, datetime, int, float, Mapping[str, Any]], int]
    period_is_expiry: bool = False  # the rows carry their own expiry (set at write from the setting): cutoff is now

    def period_s(self, config: Mapping[str, Any]) -> float:
        return float(config[self.setting]) if self.setting else float(self.default_s)

    def cutoff(self, config: Mapping[str, Any], now: datetime) -> datetime:
        return now if self.period_is_expiry else now - timedelta(seconds=self.period_s(config))

    @property
    def rule(self) -> str:
        """How the log line names the limit: the setting, or the fixed period."""
        return self.setting or _duration(self.default_s)


DAY = 86_400
TABLE: tuple[Kept, ...] = (
    Kept(
        "finished_jobs",
        "jobs",
        "succeeded and expired jobs, webhook deliveries included: payload (patient, encounter, user ids; "
        "a full event's body), result (the draft summary); PHI",
        "JOB_RETENTION_S",
        7 * DAY,
        "the job finished",
        lambda engine, cutoff, batch, budget, config: ledger.purge(
            engine, finished_before=cutoff, limit=batch, budget_s=budget
        ),
    ),
    Kept(
        "dead_jobs",
        "jobs",
        "dead-lettered jobs, kept longer for operators to inspect and requeue; PHI",
        "DEAD_JOB_RETENTION_S",
        30 * DAY,
        "the job was dead-lettered",
        lambda engine, cutoff, batch, budget, config: ledger.purge(
            engine, dead_before=cutoff, limit=batch, budget_s=budget
        ),
    ),
    Kept(
        "ai_results",
        "ai_results",
        "what an explanation link shows: inputs with values and dates, the model's output, patient id; PHI",
        "RESULT_TTL_S",
        DAY,
        "the result was stored (its expiry)",
        lambda engine, cutoff, batch, budget, config: results.purge_expired(
            engine, now=cutoff, batch=batch, budget_s=budget
        ),
        period_is_expiry=True,
    ),
    Kept(
        "smart_sessions",
        "smart_sessions",
        "SMART app sessions: OAuth tokens and patient context, encrypted; PHI",
        "SMART_SESSION_TTL_S",
        3600,
        "the user signed in (its expiry)",
        lambda engine, cutoff, batch, budget, config: sessions.purge_expired(
            engine, now=cutoff, batch=batch, budget_s=budget
        ),
        period_is_expiry=True,
    ),
    Kept(
        "job_workers",
        "job_workers",
        "worker heartbeat rows: host, pid, kinds, counts; no PHI",
        None,
        int(presence.RETENTION_SECONDS),
        "the worker stopped or went silent",
        lambda engine, cutoff, batch, budget, config: presence.purge(engine, cutoff, limit=batch),
    ),
    Kept(
        "batch_runs",
        "batch_runs",
        "an ended population run's outputs in `BATCH_DIR/RUN/` (risk and reasons per patient, the worklist; PHI) "
        "and its row (parameters and counts, no PHI)",
        "BATCH_RETENTION_S",
        30 * DAY,
        "the run ended",
        lambda engine, cutoff, batch, budget, config: batch_runs.purge(
            engine, Path(config["BATCH_DIR"]), ended_before=cutoff, limit=batch
        ),
    ),
)


def purge_all(engine: sa.Engine, config: Mapping[str, Any], *, now: datetime | None = None) -> int:
    """Purge every entry of ``TABLE`` past its retention, in bounded batches; returns how many rows went.
    An entry that fails (the database away) is logged and the others still run."""
    now = utc_now(now)
    removed = 0
    for kept in TABLE:
        try:
            purged = kept.purge(engine, kept.cutoff(config, now), BATCH, BUDGET_S, config)
        except Exception as exc:  # the next round tries again
            log.error("retention: purging %s failed: %s", kept.what, describe(exc))
            continue
        if purged:
            PURGED.labels(kept.what).inc(purged)
            log.info("retention: purged %d %s past %s", purged, kept.what, kept.rule)
        removed += purged
    return removed


def markdown_table() -> str:
    """The table for the operators' documentation (docs/operations.md, README), from the declaration."""
    lines = ["| what | table | holds | kept for (default) | counted from |", "| --- | --- | --- | --- | --- |"]
    for kept in TABLE:
        period = f"`{kept.setting}` ({_duration(kept.default_s)})" if kept.setting else _duration(kept.default_s)
        lines.append(f"| `{kept.what}` | `{kept.table}` | {kept.holds} | {period} | {kept.counted_from} |")
    return "\n".join(lines)


def _duration(seconds: int) -> str:
    for unit, size in (("day", DAY), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} s"
