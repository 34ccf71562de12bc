"""Watching the ledger: Prometheus gauges read from the database at scrape time (jobs, live workers), run
counters, and the DLQ alert."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

import sqlalchemy as sa
from flask import Flask
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from app.jobs import ledger, presence
from app.logs import describe
from app.metrics import collect_at_scrape

log = logging.getLogger(__name__)

DLQ_ALERT_EVENT = "jobs.dead-letter-alert"
_ALERT_LISTENERS = "jobs.dead_letter_alert_listeners"  # app.extensions: name -> listener(app, event_id, data)

JOB_RUNS = Counter(
    "gateway_job_runs_total", "Job attempts run by workers, by kind and how they ended", ["kind", "outcome"]
)
JOB_RUN_SECONDS = Histogram(
    "gateway_job_run_seconds",
    "Duration of job attempts",
    ["kind"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


def record_run(kind: str, outcome: str, seconds: float) -> None:
    JOB_RUNS.labels(kind, outcome).inc()
    JOB_RUN_SECONDS.labels(kind).observe(seconds)


class LedgerCollector:
    """Gauges read when /metrics is scraped (the trigger-kept counts, the head of the queue), so every process
    reports the same truth at a cost that does not grow with the backlog or the history."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine

    def collect(self):
        jobs = GaugeMetricFamily("gateway_jobs", "Jobs in the ledger, by kind and state", labels=["kind", "state"])
        attempts = GaugeMetricFamily(
            "gateway_job_attempts",
            "Attempts made by the jobs now in each state (attempts - jobs = retries)",
            labels=["kind", "state"],
        )
        oldest = GaugeMetricFamily(
            "gateway_jobs_oldest_queued_age_seconds", "How long the longest-waiting due job has waited (0: none)"
        )
        workers = GaugeMetricFamily(
            "gateway_workers_live",
            "Job worker processes whose heartbeat is recent (within 3 of their heartbeat intervals), on every host",
        )
        up = GaugeMetricFamily("gateway_jobs_ledger_up", "1 when the ledger could be read for this scrape")
        try:
            by_state = ledger.attempts_by_state(self.engine)
            age = ledger.oldest_queued_age(self.engine)
            live = presence.live_count(self.engine)
        except sa.exc.SQLAlchemyError as exc:
            log.error("metrics: cannot read the job ledger: %s", describe(exc))
            up.add_metric([], 0)
            yield up
            return
        kinds = {kind for kind, _ in by_state}
        for kind in sorted(kinds):
            for state in ledger.STATES:
                n, made = by_state.get((kind, state), (0, 0))
                jobs.add_metric([kind, state], n)
                attempts.add_metric([kind, state], made)
        oldest.add_metric([], age or 0.0)
        workers.add_metric([], live)
        up.add_metric([], 1)
        yield from (jobs, attempts, oldest, workers, up)


def check_dead_letters(app: Flask, now: datetime | None = None) -> int | None:
    """Alert when the dead letter queue holds ``DLQ_ALERT_THRESHOLD`` jobs or more: an ERROR log event every
    check, and a webhook event to subscribers of ``jobs.dead-letter-alert`` once per threshold level per day
    (its event id repeats within the day, so every worker checking deduplicates to one delivery).
    Returns the level alerted (dead // threshold), or None when below the threshold. The webhook is sent by the
    listeners that areas add with ``on_dead_letter_alert`` (the webhooks area does)."""
    threshold = app.config["DLQ_ALERT_THRESHOLD"]
    dead = ledger.counts(app.extensions["db"])[ledger.DEAD]
    if dead < threshold:
        return None
    level = dead // threshold
    log.error(
        "dead letter queue holds %d jobs (alert threshold %d): inspect with `flask --app app jobs dlq list`",
        dead,
        threshold,
    )
    day = (now or datetime.now(UTC)).strftime("%Y-%m-%d")
    event_id = f"dlq-alert-{day}-{level * threshold}"
    data = {"dead": dead, "threshold": threshold, "level": level * threshold}
    for listener in app.extensions.get(_ALERT_LISTENERS, {}).values():
        listener(app, event_id, data)
    return level


def on_dead_letter_alert(app: Flask, name: str, listener: Callable[[Flask, str, dict], object]) -> None:
    """Call ``listener(app, event_id, data)`` whenever ``check_dead_letters`` alerts (``name`` makes adding it
    again a no-op). The event id repeats within a day and level, so listeners can deduplicate on it."""
    app.extensions.setdefault(_ALERT_LISTENERS, {})[name] = listener


def init_app(app: Flask) -> None:
    """Report the ledger's gauges on every scrape of /metrics."""
    collect_at_scrape(app, "jobs.ledger", lambda app: LedgerCollector(app.extensions["db"]))
