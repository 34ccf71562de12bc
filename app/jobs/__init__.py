"""Asynchronous jobs: one SQL table (the ledger) that is both the queue and the record of every job."""

from __future__ import annotations


def init_app(app) -> None:
    """The job status endpoint, the operators' admin API and ``flask jobs``."""
    # Imported here, not at the top, on purpose: every area imports ``app.jobs.ledger`` or ``app.jobs.registry``
    # (which runs this package first), and none of them should drag in the endpoints and the CLI.
    from app.jobs import cli, monitor, routes

    routes.init_app(app)
    monitor.init_app(app)
    cli.init_cli(app)
