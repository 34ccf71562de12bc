"""Asynchronous jobs: one SQL table (the ledger) that is both the queue and the record of every job."""

from __future__ import annotations


def init_app(app) -> None:
    """The job status endpoint, the operators' admin API and ``flask jobs``."""
    from app.jobs.cli import init_cli
    from app.jobs.routes import admin, bp

    app.register_blueprint(bp)
    app.register_blueprint(admin)
    init_cli(app)
