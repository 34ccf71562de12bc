"""Liveness and readiness probes for load balancers and orchestrators."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from flask import Blueprint, current_app, request

from app.db import engine
from app.http import json_response
from app.jobs import ledger, presence

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """Alive: the process answers HTTP."""
    return json_response({"status": "ok"})


@bp.get("/readyz")
def readyz():
    """Ready to answer hooks: the database answers (Redis is optional by design, so it is not checked). The job
    workers are reported too: due jobs with no live worker make the status "degraded" but leave the answer 200,
    because a load balancer acting on it would take every replica out and turn an outage of the asynchronous
    path into one of the hooks as well. Monitors that want the workers judged ask ``/readyz?require=workers``,
    which then answers 503."""
    db = engine(current_app)
    checks: dict[str, str] = {}
    body: dict[str, Any] = {"checks": checks}
    try:
        with db.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        checks["database"] = "ok"
    except sa.exc.SQLAlchemyError as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    status = "ready" if checks["database"] == "ok" else "not ready"
    if status == "ready":
        try:
            body["workers"] = workers = _workers(db)
        except sa.exc.SQLAlchemyError as exc:  # e.g. a schema older than the code: run the migrations
            checks["workers"], status = f"unavailable: {type(exc).__name__}", "not ready"
        else:
            checks["workers"], workers_ok = _judge(workers)
            status = "ready" if workers_ok else "degraded"
    strict = request.args.get("require") == "workers"
    ok = status == "ready" or (status == "degraded" and not strict)
    return json_response({"status": status, **body}, 200 if ok else 503)


def _workers(db: sa.Engine) -> dict[str, Any]:
    """Live worker processes (``app.jobs.presence``), queued jobs, and how long the oldest due one has waited."""
    return {
        "live": presence.live_count(db),
        "queued": ledger.counts(db)[ledger.QUEUED],
        "oldestQueuedSeconds": ledger.oldest_queued_age(db),
    }


def _judge(workers: dict[str, Any]) -> tuple[str, bool]:
    """The workers' check line, and whether it allows ready: not when jobs are due and no worker is live."""
    if workers["live"]:
        return f"{workers['live']} live", True
    if workers["oldestQueuedSeconds"] is None:
        return "none live; no job due", True
    return f"none live; {workers['queued']} jobs queued", False


def init_app(app) -> None:
    app.register_blueprint(bp)
