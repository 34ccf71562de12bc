"""The batch area's registration: job kinds (declared in ``tasks``), the admin API, ``gateway batch``, and the
run gauges read at each scrape."""

from __future__ import annotations

import logging

import sqlalchemy as sa
from flask import Flask
from prometheus_client.core import GaugeMetricFamily

from app.batch import cli, routes, runs, tasks
from app.logs import describe
from app.metrics import collect_at_scrape

log = logging.getLogger(__name__)


class BatchCollector:
    """``gateway_batch_runs{state}`` and ``gateway_batch_runs_paused``, from the runs table (the same in every
    process, on every host)."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine

    def collect(self):
        by_state = GaugeMetricFamily(
            "gateway_batch_runs", "Batch runs by state (ended ones until purged)", labels=["state"]
        )
        paused = GaugeMetricFamily(
            "gateway_batch_runs_paused", "Active batch runs paused while their model is unavailable"
        )
        try:
            counts, waiting = runs.state_counts(self.engine)
        except sa.exc.SQLAlchemyError as exc:
            log.error("metrics: cannot read the batch runs: %s", describe(exc))
            return
        for state in runs.STATES:
            by_state.add_metric([state], counts.get(state, 0))
        paused.add_metric([], waiting)
        yield from (by_state, paused)


def init_app(app: Flask) -> None:
    assert tasks.EXPORT  # importing tasks registered the job kinds
    routes.init_app(app)
    cli.init_cli(app)
    collect_at_scrape(app, "batch.runs", lambda app: BatchCollector(app.extensions["db"]))
