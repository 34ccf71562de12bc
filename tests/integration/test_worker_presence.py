"""Worker heartbeats on a real ledger (SQLite file, and PostgreSQL): a row per worker process, live while it beats,
stopped at once on a clean stop, lost when the beats stop, purged a day later; seen at /readyz, /metrics and
``jobs workers``."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa

from app.clock import utc_now
from app.jobs import ledger, presence
from app.jobs.canary import CANARY
from app.jobs.maintenance import Maintenance
from app.jobs.presence import LIVE_BEATS, Presence, job_workers, live_count
from app.jobs.registry import submit
from app.jobs.worker import Worker
from tests.conftest import require
from tests.support.assertions import wait_for
from tests.support.databases import postgres_database, postgres_unavailable


@pytest.fixture(params=["sqlite", "postgresql"])
def app(request, make_app):
    if request.param == "sqlite":
        yield make_app(JOB_POLL_S=0.05)
        return
    require(postgres_unavailable())
    with postgres_database() as url:
        built = make_app(DATABASE_URL=url, JOB_POLL_S=0.05)
        yield built
        built.extensions["db"].dispose()


def rows(app) -> list:
    with app.extensions["db"].connect() as conn:
        return conn.execute(sa.select(job_workers)).all()


def test_a_started_worker_is_live_and_a_clean_stop_ends_it_at_once(app):
    engine = app.extensions["db"]
    beating = Presence(engine, "host:1:abc", ["jobs.canary"], threads=2, interval=60).start()
    try:
        assert live_count(engine) == 1
        (row,) = rows(app)
        assert (row.id, row.pid > 0, row.kinds, row.threads, row.stopped_at) == (
            "host:1:abc",
            True,
            ["jobs.canary"],
            2,
            None,
        )
        assert row.live_until - row.seen_at == timedelta(seconds=60 * LIVE_BEATS)
    finally:
        beating.stop()
    assert live_count(engine) == 0  # not after the staleness limit: now
    assert rows(app)[0].stopped_at is not None


def test_a_worker_whose_beats_stop_is_lost_after_three_intervals(app):
    engine = app.extensions["db"]
    beating = Presence(engine, "host:2:abc", ["k"], interval=5)
    assert beating.beat()
    seen = rows(app)[0].seen_at
    assert live_count(engine, now=seen + timedelta(seconds=5 * LIVE_BEATS - 0.5)) == 1
    assert live_count(engine, now=seen + timedelta(seconds=5 * LIVE_BEATS + 0.5)) == 0


def test_beats_keep_a_worker_live_and_carry_its_counts(app):
    engine = app.extensions["db"]
    beating = Presence(engine, "host:3:abc", ["k"], interval=0.05).start()
    try:
        beating.count(ledger.SUCCEEDED)
        beating.count(ledger.DEAD)
        wait_for(lambda: rows(app)[0].jobs_run == 2, "the counts never reached the row")
        first = rows(app)[0].seen_at
        wait_for(lambda: rows(app)[0].seen_at > first, "no second beat")
        assert rows(app)[0].jobs_failed == 1
    finally:
        beating.stop()


def test_a_row_purged_while_the_worker_ran_comes_back_with_the_next_beat(app):
    engine = app.extensions["db"]
    beating = Presence(engine, "host:4:abc", ["k"], interval=60)
    beating.beat()
    with engine.begin() as conn:
        conn.execute(job_workers.delete())
    assert beating.beat()
    assert live_count(engine) == 1


def test_a_beat_without_a_database_is_logged_not_raised(make_app):
    app = make_app()
    dead = sa.create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 1})
    beating = Presence(dead, "host:5:abc", ["k"], interval=60)
    assert beating.beat() is False
    beating.stop()  # nor is a stop
    assert live_count(app.extensions["db"]) == 0


def test_housekeeping_purges_rows_a_day_after_they_went_quiet(app):
    engine = app.extensions["db"]
    old = Presence(engine, "host:6:old", ["k"], interval=5)
    old.beat(now=utc_now() - timedelta(seconds=presence.RETENTION_SECONDS + 60))
    current = Presence(engine, "host:6:new", ["k"], interval=5)
    current.beat()
    assert Maintenance(app).purge() == 1
    assert [row.id for row in rows(app)] == ["host:6:new"]


def test_a_worker_loop_of_its_own_keeps_a_row_while_it_runs(app):
    stop = threading.Event()
    worker = Worker(app, stop=stop, poll_seconds=0.05)
    loop = threading.Thread(target=worker.run)
    loop.start()
    try:
        wait_for(lambda: live_count(app.extensions["db"]) == 1, "the worker loop wrote no heartbeat")
        submit(app, CANARY, "presence-canary", {})
        wait_for(lambda: ledger.get(app.extensions["db"], "presence-canary").state == ledger.SUCCEEDED, "not run")
    finally:
        stop.set()
        loop.join(10)
    (row,) = rows(app)
    assert row.id == worker.worker_id and row.stopped_at is not None and row.jobs_run == 1
    assert live_count(app.extensions["db"]) == 0


def test_metrics_say_how_many_workers_are_live(app):
    beating = Presence(app.extensions["db"], "host:7:abc", ["k"], interval=60).start()
    try:
        body = app.test_client().get("/metrics").get_data(as_text=True)
        assert "gateway_workers_live 1.0" in body
    finally:
        beating.stop()
    assert "gateway_workers_live 0.0" in app.test_client().get("/metrics").get_data(as_text=True)


def test_jobs_workers_lists_live_lost_and_stopped_workers(app):
    engine = app.extensions["db"]
    live = Presence(engine, "host:8:live", ["k"], interval=60).start()
    Presence(engine, "host:8:lost", ["k"], interval=0.1).beat(now=utc_now() - timedelta(seconds=10))
    stopped = Presence(engine, "host:8:stopped", ["k"], interval=60).start()
    stopped.stop()
    try:
        result = app.test_cli_runner().invoke(args=["jobs", "workers", "--json"])
    finally:
        live.stop()
    assert result.exit_code == 0, result.output
    states = {entry["id"]: entry["state"] for entry in map(json.loads, result.output.splitlines())}
    assert states == {"host:8:live": "live", "host:8:lost": "lost", "host:8:stopped": "stopped"}
