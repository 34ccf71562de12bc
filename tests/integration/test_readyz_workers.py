"""/readyz and the job workers: degraded while jobs are due and no worker is live (503 only for monitors that ask
``?require=workers``: a load balancer must keep replicas that can answer hooks), ready otherwise."""

from __future__ import annotations

from datetime import timedelta

from app.clock import utc_now
from app.jobs.canary import CANARY
from app.jobs.presence import Presence
from app.jobs.registry import submit


def readyz(app, strict: bool = False):
    response = app.test_client().get("/readyz?require=workers" if strict else "/readyz")
    return response.status_code, response.get_json()


def test_no_worker_and_no_job_is_ready(make_app):
    status, body = readyz(make_app())
    assert status == 200
    assert body == {
        "status": "ready",
        "checks": {"database": "ok", "workers": "none live; no job due"},
        "workers": {"live": 0, "queued": 0, "oldestQueuedSeconds": None},
    }


def test_due_jobs_without_a_live_worker_are_degraded_and_not_ready_for_monitors_that_ask(make_app):
    app = make_app()
    for n in range(3):
        submit(app, CANARY, f"waiting-{n}", {})
    status, body = readyz(app)
    assert (status, body["status"], body["checks"]["workers"]) == (200, "degraded", "none live; 3 jobs queued")
    status, body = readyz(app, strict=True)  # the same report; only the status code differs
    assert status == 503
    assert body["status"] == "degraded"
    assert body["checks"] == {"database": "ok", "workers": "none live; 3 jobs queued"}
    assert body["workers"]["live"] == 0 and body["workers"]["queued"] == 3
    assert body["workers"]["oldestQueuedSeconds"] >= 0


def test_a_live_worker_makes_due_jobs_ready(make_app):
    app = make_app()
    submit(app, CANARY, "waiting", {})
    beating = Presence(app.extensions["db"], "host:1:abc", [CANARY], interval=60).start()
    try:
        status, body = readyz(app)
    finally:
        beating.stop()
    assert (status, body["checks"]["workers"], body["workers"]["live"]) == (200, "1 live", 1)
    assert readyz(app, strict=True)[0] == 503  # stopped: at once, not after the staleness limit


def test_a_lost_worker_counts_as_none(make_app):
    app = make_app()
    submit(app, CANARY, "waiting", {})
    Presence(app.extensions["db"], "host:2:abc", [CANARY], interval=1).beat(now=utc_now() - timedelta(seconds=10))
    status, body = readyz(app, strict=True)
    assert (status, body["status"], body["checks"]["workers"]) == (503, "degraded", "none live; 1 jobs queued")


def test_jobs_held_back_for_later_do_not_need_a_worker_yet(make_app):
    app = make_app()
    submit(app, CANARY, "later", {}, delay=600)
    status, body = readyz(app)
    assert (status, body["checks"]["workers"], body["workers"]["queued"]) == (200, "none live; no job due", 1)


def test_a_schema_without_the_workers_table_is_not_ready(make_app):
    app = make_app()
    with app.extensions["db"].begin() as conn:
        conn.exec_driver_sql("DROP TABLE job_workers")
    status, body = readyz(app)
    assert (status, body["status"], body["checks"]["workers"]) == (503, "not ready", "unavailable: OperationalError")


def test_without_the_database_it_is_not_ready(make_app, tmp_path):
    app = make_app()
    (tmp_path / "gateway.db").unlink()
    (tmp_path / "gateway.db").mkdir()  # the database file is gone, and cannot be made again
    app.extensions["db"].dispose()
    status, body = readyz(app)
    assert (status, body["status"], body["checks"]["database"]) == (503, "not ready", "unavailable: OperationalError")
