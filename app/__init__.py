"""The clinical AI gateway: a CDS Hooks 2.0 service in front of AI models."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask

from app.clock import SystemClock
from app.config import load_config


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the application: settings from the environment (overridden by ``test_config``), then each area."""
    from app import (
        ai,
        audit,
        batch,
        cds,
        db,
        development,
        devtools,
        health,
        host_state,
        jobs,
        limits,
        logs,
        metrics,
        results,
        smart,
        webhooks,
    )

    settings = load_config(overrides=test_config)
    app = Flask(__name__, instance_path=settings["INSTANCE_PATH"])
    app.config.update(settings)
    app.extensions["clock"] = (test_config or {}).get("CLOCK") or SystemClock()  # tests pass a FakeClock
    logs.configure(settings["LOG_LEVEL"])

    limits.init_app(app)
    development.init_app(app)
    db.init_app(app)
    host_state.init_app(app)
    audit.init_app(app)
    results.init_app(app)
    ai.init_app(app)
    cds.init_app(app)
    jobs.init_app(app)
    smart.init_app(app)
    webhooks.init_app(app)
    batch.init_app(app)
    health.init_app(app)
    metrics.init_app(app)
    devtools.init_cli(app)
    return app
