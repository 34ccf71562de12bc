"""Liveness and readiness probes for load balancers and orchestrators."""

from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, current_app

from app.cds.responses import json_response
from app.db import engine

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """Alive: the process answers HTTP."""
    return json_response({"status": "ok"})


@bp.get("/readyz")
def readyz():
    """Ready: the database answers (Redis is optional by design, so it is reported, not required)."""
    checks = {}
    try:
        with engine(current_app).connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        checks["database"] = "ok"
    except sa.exc.SQLAlchemyError as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    ready = checks["database"] == "ok"
    return json_response({"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503)


def init_app(app) -> None:
    app.register_blueprint(bp)
