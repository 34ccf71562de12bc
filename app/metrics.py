"""Prometheus metrics at /metrics, aggregated across gunicorn workers when PROMETHEUS_MULTIPROC_DIR is set."""

from __future__ import annotations

import hmac
import os

from flask import Blueprint, Response, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)

AI_CALLS = Counter("gateway_ai_calls_total", "Model calls through the guard, by outcome", ["model", "outcome"])
AI_CALL_SECONDS = Histogram(
    "gateway_ai_call_seconds", "Duration of model calls that reached the backend", ["model"], buckets=LATENCY_BUCKETS
)
FALLBACKS = Counter("gateway_fallbacks_total", "Fallback cards served, by service and reason", ["service", "reason"])
BREAKER_STATE = Gauge(
    "gateway_breaker_state",
    "Circuit breaker state seen by this process: 0 closed, 1 half-open, 2 open",
    ["breaker"],
    multiprocess_mode="max",
)
BREAKER_TRANSITIONS = Counter(
    "gateway_breaker_transitions_total", "Circuit breaker state changes", ["breaker", "from_state", "to_state"]
)
HOOK_SECONDS = Histogram(
    "gateway_hook_seconds",
    "Hook call duration, end to end in the service",
    ["service", "outcome"],
    buckets=LATENCY_BUCKETS,
)
RESULTS_NOT_STORED = Counter(
    "gateway_results_not_stored_total",
    "Explanation results not stored, by reason. The card went out without its link for unstorable, queue-full "
    "and database-unreachable; its link points at nothing for rejected and lost-at-exit (and says 'expired' for "
    "expired)",
    ["reason"],
)

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics():
    """The Prometheus text format; with several workers, the sum over all of them; job gauges from the ledger."""
    from app.jobs.monitor import LedgerCollector

    token = current_app.config["METRICS_TOKEN"]
    if token and not _bearer_matches(request.headers.get("Authorization"), token):
        return Response("metrics need Authorization: Bearer $METRICS_TOKEN\n", 401, {"WWW-Authenticate": "Bearer"})

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest()
    ledger_registry = CollectorRegistry()
    ledger_registry.register(LedgerCollector(current_app.extensions["db"]))
    return Response(body + generate_latest(ledger_registry), content_type=CONTENT_TYPE_LATEST)


def _bearer_matches(header: str | None, token: str) -> bool:
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def init_app(app) -> None:
    app.register_blueprint(bp)
