"""One JSON log line per job state change, from every path that changes one (hooks enqueueing, workers, the
sweep, operators), with ids, states, attempt, worker and an error's class: never payload, result or error text."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest

from app.clock import utc_now
from app.jobs import ledger
from app.jobs.registry import JobExpired, PermanentFailure, RetryLater, job_handler, submit
from app.jobs.retry import ExponentialBackoff, RetryPolicy
from app.jobs.worker import Worker

SECRET = "Jane Doe, MRN 123-45-6789"  # stands for PHI in a payload, a result and an error message
HOW: dict[str, str] = {}
RELEASE = threading.Event()


@job_handler("test.events", retry=RetryPolicy(max_attempts=2, backoff=ExponentialBackoff(base=0)))  # retried at once
def handler(ctx):
    how = HOW.get(ctx.job.id, "ok")
    if how == "crash":
        raise ValueError(SECRET)
    if how == "permanent":
        raise PermanentFailure(SECRET)
    if how == "later":
        raise RetryLater(30, SECRET)
    if how == "expired":
        raise JobExpired(SECRET)
    if how == "slow":
        RELEASE.wait(10)
    return {"note": SECRET}


@pytest.fixture(autouse=True)
def fresh():
    HOW.clear()
    RELEASE.clear()


@pytest.fixture
def app(make_app):
    return make_app(JOB_POLL_S=0.05, LOG_LEVEL="INFO")


def events(capsys) -> list[dict]:
    err = capsys.readouterr().err
    assert SECRET not in err
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def changes(capsys, job_id: str) -> list[tuple]:
    return [(e["event"], e.get("from"), e["to"], e["attempt"]) for e in events(capsys) if e["job"] == job_id]


def test_enqueue_claim_and_success_are_one_line_each(app, capsys):
    submit(app, "test.events", "ok-1", {"patient": SECRET})
    submit(app, "test.events", "ok-1", {"patient": SECRET})  # the same job again: no change, no line
    worker = Worker(app, worker_id="host:1:abc/0")
    worker.run_until_idle()
    lines = [e for e in events(capsys) if e["job"] == "ok-1"]
    assert [(e["event"], e.get("from"), e["to"], e["attempt"]) for e in lines] == [
        ("job.enqueued", None, "queued", 0),
        ("job.claimed", "queued", "running", 1),
        ("job.succeeded", "running", "succeeded", 1),
    ]
    assert {e["kind"] for e in lines} == {"test.events"}
    assert [e.get("worker") for e in lines] == [None, "host:1:abc/0", "host:1:abc/0"]
    assert [e["level"] for e in lines] == ["INFO"] * 3
    assert all(e["ts"].endswith("+00:00") for e in lines)


def test_a_retry_then_a_dead_letter_name_the_error_class_only(app, capsys):
    HOW["crash-1"] = "crash"
    submit(app, "test.events", "crash-1", {})
    Worker(app).run_until_idle()
    Worker(app).run_until_idle()
    lines = [e for e in events(capsys) if e["job"] == "crash-1" and e["event"] in ("job.retry", "job.dead")]
    assert [(e["event"], e["to"], e["attempt"], e["error"], e["level"]) for e in lines] == [
        ("job.retry", "queued", 1, "ValueError", "WARNING"),
        ("job.dead", "dead", 2, "ValueError", "ERROR"),
    ]
    assert lines[0]["retryInSeconds"] >= 0


def test_permanent_failures_retry_later_and_expiry_are_logged(app, capsys):
    for how in ("permanent", "later", "expired"):
        HOW[how] = how
        submit(app, "test.events", how, {})
    Worker(app).run_until_idle()
    found = {e["job"]: e for e in events(capsys) if e["event"] not in ("job.enqueued", "job.claimed")}
    assert (found["permanent"]["event"], found["permanent"]["error"]) == ("job.dead", "PermanentFailure")
    assert (found["later"]["event"], found["later"]["error"], found["later"]["retryInSeconds"]) == (
        "job.retry",
        "RetryLater",
        30,
    )
    assert (found["expired"]["event"], found["expired"]["from"], found["expired"]["to"]) == (
        "job.expired",
        "running",
        "expired",
    )


def test_an_operator_requeue_is_logged(app, capsys):
    HOW["requeued"] = "permanent"
    submit(app, "test.events", "requeued", {})
    Worker(app).run_until_idle()
    capsys.readouterr()
    assert ledger.requeue(app.extensions["db"], "requeued")
    assert changes(capsys, "requeued") == [("job.requeued", "dead", "queued", 0)]


def test_a_lapsed_lease_and_a_stale_job_are_logged_by_the_sweep(app, capsys):
    engine = app.extensions["db"]
    now = utc_now()
    ledger.enqueue(engine, "lapsed", "test.events", {}, now=now)
    ledger.claim(engine, "host:9:gone/0", lease_seconds=1, now=now)
    ledger.enqueue(engine, "stale", "test.events", {}, expires_at=now + timedelta(seconds=1), now=now)
    capsys.readouterr()
    ledger.sweep(engine, now=now + timedelta(seconds=5))
    lines = {e["job"]: e for e in events(capsys)}
    assert (lines["lapsed"]["event"], lines["lapsed"]["to"], lines["lapsed"]["worker"]) == (
        "job.lease-lapsed",
        "queued",
        "host:9:gone/0",
    )
    assert lines["lapsed"]["level"] == "WARNING"
    assert (lines["stale"]["event"], lines["stale"]["from"], lines["stale"]["to"]) == (
        "job.expired",
        "queued",
        "expired",
    )


def test_a_job_on_its_last_attempt_whose_worker_died_is_a_dead_letter(app, capsys):
    engine = app.extensions["db"]
    now = utc_now()
    ledger.enqueue(engine, "killer", "test.events", {}, max_attempts=1, now=now)
    ledger.claim(engine, "host:9:gone/0", lease_seconds=1, now=now)
    capsys.readouterr()
    ledger.sweep(engine, now=now + timedelta(seconds=5))
    (line,) = [e for e in events(capsys) if e["job"] == "killer"]
    assert (line["event"], line["error"], line["worker"]) == ("job.dead", "LeaseExpired", "host:9:gone/0")


def test_a_job_handed_back_at_shutdown_is_logged_released(app, capsys):
    HOW["slow"] = "slow"
    submit(app, "test.events", "slow", {})
    stop = threading.Event()
    worker = Worker(app, stop=stop, grace_seconds=0.1, lease_seconds=1)
    loop = threading.Thread(target=worker.run_until_idle)
    loop.start()
    try:
        ledger_state = lambda: ledger.get(app.extensions["db"], "slow").state  # noqa: E731
        for _ in range(200):
            if ledger_state() == ledger.RUNNING:
                break
            threading.Event().wait(0.02)
        stop.set()
        loop.join(10)
    finally:
        RELEASE.set()
    assert ("job.released", "running", "queued", 1) in changes(capsys, "slow")


def test_warning_level_keeps_only_retries_lapses_and_dead_letters(make_app, capsys):
    app = make_app(LOG_LEVEL="WARNING")
    HOW["quiet-crash"] = "crash"
    submit(app, "test.events", "quiet-ok", {})
    submit(app, "test.events", "quiet-crash", {})
    Worker(app).run_until_idle()
    assert {e["event"] for e in events(capsys)} == {"job.retry", "job.dead"}
