"""Retention, declared once (``app.retention.TABLE``) and enforced by a running worker loop on a real database
(SQLite file and PostgreSQL): rows past their retention go, rows within it stay, and each purge that deleted
rows logs one line (counts and names, no PHI) and counts in ``gateway_retention_purged_total``."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from app import results, retention
from app.batch import runs as batch_runs
from app.clock import utc_now
from app.config import load_config
from app.jobs import ledger, presence
from app.jobs.worker import Worker
from app.smart.sessions import SessionStore, load_or_create_key, session_id, smart_sessions
from tests.conftest import require
from tests.support.assertions import wait_for
from tests.support.databases import postgres_database, postgres_unavailable

PATIENT = "patient-Jane-Doe-123"  # stands for PHI in what is purged: it must never reach the log
SETTINGS = {
    "JOB_RETENTION_S": 60,
    "DEAD_JOB_RETENTION_S": 3600,
    "RESULT_TTL_S": 60,
    "BATCH_RETENTION_S": 600,
    "JOB_POLL_S": 0.05,
}


@pytest.fixture(params=["sqlite", "postgresql"])
def app(request, make_app):
    if request.param == "sqlite":
        yield make_app(**SETTINGS)
        return
    require(postgres_unavailable())
    with postgres_database() as url:
        built = make_app(DATABASE_URL=url, **SETTINGS)
        yield built
        built.extensions["db"].dispose()


def purged(what: str) -> float:
    return REGISTRY.get_sample_value("gateway_retention_purged_total", {"what": what}) or 0.0


def seed(app) -> dict[str, set[str]]:
    """Rows of every table in the retention table, some past their retention and some within; the ids of each."""
    engine = app.extensions["db"]
    now = utc_now()
    old: dict[str, set[str]] = {
        "jobs": set(),
        "ai_results": set(),
        "smart_sessions": set(),
        "job_workers": set(),
        "batch_runs": set(),
    }
    kept: dict[str, set[str]] = {key: set() for key in old}
    for job_id, state, age, keep in [
        ("done-old", ledger.SUCCEEDED, 120, False),  # JOB_RETENTION_S is 60
        ("expired-old", ledger.EXPIRED, 120, False),
        ("done-new", ledger.SUCCEEDED, 10, True),
        ("dead-old", ledger.DEAD, 7200, False),  # DEAD_JOB_RETENTION_S is 3600
        ("dead-new", ledger.DEAD, 120, True),  # past the finished jobs' retention, not the dead ones'
    ]:
        ledger.enqueue(engine, job_id, "alpha", {"patient_id": PATIENT})
        with engine.begin() as conn:
            update = ledger.jobs.update().where(ledger.jobs.c.id == job_id)
            conn.execute(update.values(state=state, updated_at=now - timedelta(seconds=age)))
        (kept if keep else old)["jobs"].add(job_id)

    def result(stored_ago: float) -> str:
        return results.save(
            engine,
            "cardiovascular-risk",
            {"patient": PATIENT},
            client_iss=None,
            fhir_server=None,
            patient_id=PATIENT,
            ttl_seconds=60,
            now=now - timedelta(seconds=stored_ago),
        )

    old["ai_results"].add(result(120))
    kept["ai_results"].add(result(5))

    store = SessionStore(engine, load_or_create_key(Path(app.config["KEYS_DIR"])), ttl_s=3600)
    kept["smart_sessions"].add(session_id(store.create({"patient": PATIENT}, now=now).token))
    signed_in_earlier = now - timedelta(hours=2)  # expired an hour ago
    old["smart_sessions"].add(session_id(store.create({"patient": PATIENT}, now=signed_in_earlier).token))

    with engine.begin() as conn:
        for worker_id, quiet_for in (("host:1:gone", timedelta(days=2)), ("host:2:recent", timedelta(hours=1))):
            live_until = now - quiet_for
            conn.execute(
                presence.job_workers.insert().values(
                    id=worker_id,
                    host="host",
                    pid=1,
                    kinds=["alpha"],
                    threads=1,
                    started_at=live_until - timedelta(hours=1),
                    seen_at=live_until,
                    live_until=live_until,
                    stopped_at=live_until,
                    jobs_run=0,
                    jobs_failed=0,
                )
            )
        old["job_workers"].add("host:1:gone")
        kept["job_workers"].add("host:2:recent")
    batch_dir = Path(app.config["BATCH_DIR"])
    for run_id, state, ended_ago, keep in [
        ("run-0000000000000001", batch_runs.SUCCEEDED, 1200, False),  # BATCH_RETENTION_S is 600
        ("run-0000000000000002", batch_runs.FAILED, 60, True),
        ("run-0000000000000003", batch_runs.SCORING, None, True),  # still running, however old
    ]:
        batch_runs.create(
            engine,
            service="s",
            client_iss="i",
            fhir_server="f",
            group_id=None,
            since=None,
            write_back=False,
            run_id=run_id,
            now=now - timedelta(seconds=3600),
        )
        finished = now - timedelta(seconds=ended_ago) if ended_ago else None
        with engine.begin() as conn:
            conn.execute(
                batch_runs.batch_runs.update()
                .where(batch_runs.batch_runs.c.id == run_id)
                .values(state=state, finished_at=finished)
            )
        (batch_dir / run_id).mkdir(parents=True)
        (batch_dir / run_id / "RiskAssessment.ndjson").write_text(PATIENT)
        (kept if keep else old)["batch_runs"].add(run_id)
    return {"old": old, "kept": kept}


def ids(app) -> dict[str, set[str]]:
    tables = {
        "jobs": ledger.jobs.c.id,
        "ai_results": results.ai_results.c.id,
        "smart_sessions": smart_sessions.c.id,
        "job_workers": presence.job_workers.c.id,
        "batch_runs": batch_runs.batch_runs.c.id,
    }
    with app.extensions["db"].connect() as conn:
        found = {name: set(conn.execute(sa.select(column)).scalars()) for name, column in tables.items()}
    found["batch_runs"] &= {p.name for p in Path(app.config["BATCH_DIR"]).glob("run-*")}  # row and outputs both
    return found


def test_a_running_worker_purges_what_is_past_retention_keeps_the_rest_and_says_so(app, caplog):
    caplog.set_level(logging.INFO, logger="app.retention")
    rows = seed(app)
    assert all(rows["old"][table] <= ids(app)[table] for table in rows["old"])
    before = {kept.what: purged(kept.what) for kept in retention.TABLE}

    stop = threading.Event()
    loop = threading.Thread(target=Worker(app, stop=stop).run, daemon=True)
    loop.start()
    try:
        wait_for(
            lambda: not any(rows["old"][table] & ids(app)[table] for table in rows["old"]),
            "the worker did not purge the rows past their retention",
            timeout=30,
        )
    finally:
        stop.set()
        loop.join(timeout=30)
    assert not loop.is_alive()

    remaining = ids(app)
    for table, kept in rows["kept"].items():
        assert kept <= remaining[table], f"{table}: rows within their retention were purged"
    assert {what: purged(what) - before[what] for what in before} == {
        "finished_jobs": 2,
        "dead_jobs": 1,
        "ai_results": 1,
        "smart_sessions": 1,
        "job_workers": 1,
        "batch_runs": 1,
    }
    lines = [r.getMessage() for r in caplog.records if r.name == "app.retention"]
    assert sorted(lines) == [
        "retention: purged 1 ai_results past RESULT_TTL_S",
        "retention: purged 1 batch_runs past BATCH_RETENTION_S",
        "retention: purged 1 dead_jobs past DEAD_JOB_RETENTION_S",
        "retention: purged 1 job_workers past 1 day",
        "retention: purged 1 smart_sessions past SMART_SESSION_TTL_S",
        "retention: purged 2 finished_jobs past JOB_RETENTION_S",
    ]
    assert PATIENT not in caplog.text


def test_the_metric_is_served_at_metrics(app):
    seed(app)
    Worker(app).run_once()  # housekeeping runs first, then the (empty) queue is read
    body = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'gateway_retention_purged_total{what="finished_jobs"}' in body


def test_a_purge_that_deletes_nothing_logs_nothing(app, caplog):
    caplog.set_level(logging.INFO, logger="app.retention")
    assert retention.purge_all(app.extensions["db"], app.config) == 0
    assert not [r for r in caplog.records if r.name == "app.retention"]


def test_a_backlog_goes_in_bounded_batches(app):
    engine = app.extensions["db"]
    now = utc_now()
    for i in range(25):
        ledger.enqueue(engine, f"b-{i}", "alpha", {})
    with engine.begin() as conn:
        conn.execute(ledger.jobs.update().values(state=ledger.SUCCEEDED, updated_at=now - timedelta(hours=1)))
    finished = next(kept for kept in retention.TABLE if kept.what == "finished_jobs")
    assert finished.purge(engine, finished.cutoff(app.config, now), 10, 0.0, app.config) == 10  # one batch, out of time
    assert retention.purge_all(engine, app.config, now=now) == 15


def test_the_table_declares_the_defaults_the_configuration_applies():
    config = load_config({})
    for kept in retention.TABLE:
        if kept.setting:
            assert config[kept.setting] == kept.default_s, kept.setting
        else:
            assert kept.default_s == presence.RETENTION_SECONDS


def test_the_operators_guide_shows_the_declared_table():
    guide = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
    assert retention.markdown_table() in guide.read_text(), "regenerate it with app.retention.markdown_table()"
