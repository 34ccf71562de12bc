"""The worker against a real ledger (SQLite file, and PostgreSQL where it matters): outcomes, retries, the
dead letter queue through the CLI and the admin API, expiry, graceful shutdown, metrics and job status."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from app.clock import app_clock
from app.jobs import ledger
from app.jobs.registry import JobExpired, PermanentFailure, RetryLater, Snooze, job_handler, submit
from app.jobs.retry import ExponentialBackoff, RetryPolicy
from app.jobs.worker import Worker
from tests.conftest import PUBLIC_BASE_URL
from tests.support.assertions import wait_for
from tests.support.clock import FakeClock

CALLS: Counter[str] = Counter()
BEHAVIOUR: dict[str, str] = {}  # job id -> "ok" | "transient" | "permanent" | "retry-later" | "slow"
RELEASE = threading.Event()


# A short backoff, declared with the handler as a real kind declares its own.
@job_handler(
    "test.echo", retry=RetryPolicy(max_attempts=3, backoff=ExponentialBackoff(base=0.01, cap=0.02)), client_visible=True
)
def echo(ctx):
    CALLS[ctx.job.id] += 1
    how = BEHAVIOUR.get(ctx.job.id, "ok")
    if how == "transient":
        raise ConnectionError("downstream refused")
    if how == "permanent":
        raise PermanentFailure("the payload can never work")
    if how == "retry-later":
        raise RetryLater(30, "receiver asked for 30 s")
    if how == "slow":
        RELEASE.wait(10)
    if how == "expired":
        raise JobExpired("too late")
    return {"echo": ctx.payload}


@job_handler("test.internal")
def internal(ctx):
    return {"ok": True}


@job_handler("test.background", priority=10)
def background(ctx):
    CALLS[ctx.job.id] += 1
    if BEHAVIOUR.get(ctx.job.id) == "snooze" and CALLS[ctx.job.id] < 4:
        raise Snooze(60, "export in progress")
    return {"ok": True}


@pytest.fixture(autouse=True)
def fresh_state():
    CALLS.clear()
    BEHAVIOUR.clear()
    RELEASE.clear()


@pytest.fixture
def clock():
    return FakeClock(wall=time.time())


@pytest.fixture
def app(make_app, clock):
    """The workers' ledger times (claims, leases, backoffs) run on ``clock``, which the tests move."""
    return make_app(ADMIN_TOKEN="operator-secret", JOB_POLL_S=0.05, CLOCK=clock)


def due_now(app) -> FakeClock:
    """The app's clock, brought up to the system clock: submit() stamps jobs with the system clock, so jobs
    submitted so far are due to the workers (a jump forward, never a wait)."""
    clock = app_clock(app)
    clock.advance(max(0.0, time.time() - clock.now()))
    return clock


def drain(app, rounds: int = 50) -> list:
    """Run due jobs until a round finds none due, moving the clock past test.echo's backoff (at most 0.02 s)
    between rounds; bounded (50 rounds: 1.5 s of the clock)."""
    outcomes = []
    worker = Worker(app, poll_seconds=0.05)
    clock = due_now(app)
    for _ in range(rounds):
        done = worker.run_until_idle()
        outcomes += done
        if not done and not _waiting(app):
            break
        clock.advance(0.03)
    return outcomes


def _waiting(app) -> bool:
    counts = ledger.counts(app.extensions["db"])
    return counts[ledger.QUEUED] > 0


def test_a_job_runs_once_and_keeps_its_result(app):
    assert submit(app, "test.echo", "job-1", {"n": 1})
    outcomes = drain(app)
    job = ledger.get(app.extensions["db"], "job-1")
    assert [o.state for o in outcomes] == ["succeeded"]
    assert (job.state, job.attempts, job.result) == ("succeeded", 1, {"echo": {"n": 1}})
    assert CALLS["job-1"] == 1


def test_concurrent_duplicate_submissions_make_one_job(app):
    with ThreadPoolExecutor(16) as pool:
        created = list(pool.map(lambda _: submit(app, "test.echo", "dup", {"same": True}), range(100)))
    assert created.count(True) == 1
    drain(app)
    assert CALLS["dup"] == 1


def test_a_poison_job_dead_letters_and_the_others_keep_flowing(app):
    BEHAVIOUR["poison"] = "transient"
    submit(app, "test.echo", "poison", {})
    for i in range(5):
        submit(app, "test.echo", f"good-{i}", {"i": i})
    drain(app)
    engine = app.extensions["db"]
    poison = ledger.get(engine, "poison")
    assert (poison.state, poison.attempts, CALLS["poison"]) == ("dead", 3, 3)
    assert poison.last_error.startswith("ConnectionError")
    assert all(ledger.get(engine, f"good-{i}").state == "succeeded" for i in range(5))


def test_a_permanent_failure_dead_letters_at_once_and_requeue_runs_it_again(app):
    BEHAVIOUR["perm"] = "permanent"
    submit(app, "test.echo", "perm", {})
    drain(app)
    engine = app.extensions["db"]
    assert (ledger.get(engine, "perm").state, CALLS["perm"]) == ("dead", 1)
    BEHAVIOUR["perm"] = "ok"
    runner = app.test_cli_runner()
    listed = runner.invoke(args=["jobs", "dlq", "list"])
    assert "perm\ttest.echo\t1/3" in listed.output and "PermanentFailure: the payload can never work" in listed.output
    shown = json.loads(runner.invoke(args=["jobs", "dlq", "show", "perm"]).output)
    assert shown["status"] == "dead" and shown["payload"] == {}
    result = runner.invoke(args=["jobs", "dlq", "requeue", "perm"])
    assert result.exit_code == 0 and "1 job(s) requeued" in result.output
    drain(app)
    assert (ledger.get(engine, "perm").state, CALLS["perm"]) == ("succeeded", 2)


def test_requeue_refuses_jobs_that_are_not_dead(app):
    submit(app, "test.echo", "fine", {})
    drain(app)
    result = app.test_cli_runner().invoke(args=["jobs", "dlq", "requeue", "fine", "nope"])
    assert result.exit_code != 0 and "left alone: fine, nope" in result.output


def test_retry_later_waits_as_long_as_asked_on_the_workers_clock(app):
    BEHAVIOUR["later"] = "retry-later"
    submit(app, "test.echo", "later", {})
    clock, worker = due_now(app), Worker(app)
    assert [o.state for o in worker.run_until_idle()] == ["queued"]
    job = ledger.get(app.extensions["db"], "later")
    assert (job.state, job.attempts) == ("queued", 1)
    assert job.run_after == datetime.fromtimestamp(clock.now(), UTC) + timedelta(seconds=30)
    clock.advance(29.9)
    assert worker.run_until_idle() == []
    clock.advance(0.1)
    BEHAVIOUR["later"] = "ok"
    assert [o.state for o in worker.run_until_idle()] == ["succeeded"]
    assert CALLS["later"] == 2


def test_an_expired_job_is_never_run(app):
    submit(app, "test.echo", "stale", {}, expires_in=60)
    ledger.sweep(app.extensions["db"], now=datetime.now(UTC) + timedelta(seconds=61))  # a minute later
    drain(app)
    assert ledger.get(app.extensions["db"], "stale").state == "expired"
    assert CALLS["stale"] == 0


def test_the_lease_is_kept_alive_while_a_long_job_works(app):
    BEHAVIOUR["long"] = "slow"
    submit(app, "test.echo", "long", {})
    engine = app.extensions["db"]
    clock = due_now(app)
    first = Worker(app, lease_seconds=0.6)
    runner = threading.Thread(target=first.run_once)
    runner.start()
    wait_for(lambda: CALLS["long"] > 0, "the long job never started")
    first_lease = ledger.get(engine, "long").lease_expires_at
    clock.advance(1.2)  # two lease lengths: the first lease has lapsed unless the heartbeat (every 0.2 s) renews it
    wait_for(
        lambda: ledger.get(engine, "long").lease_expires_at >= first_lease + timedelta(seconds=1.2),
        "the lease was not renewed",
        timeout=10,
    )
    taken_over = Worker(app, lease_seconds=0.6).run_once()
    RELEASE.set()  # before asserting, so that a wrongful takeover fails instead of hanging
    assert taken_over is None  # nobody could take it over
    runner.join(5)
    job = ledger.get(engine, "long")
    assert (job.state, job.attempts, CALLS["long"]) == ("succeeded", 1, 1)


def test_shutdown_hands_an_unfinished_job_back(app):
    BEHAVIOUR["slow"] = "slow"
    submit(app, "test.echo", "slow", {})
    stop = threading.Event()
    worker = Worker(app, lease_seconds=0.3, grace_seconds=0.3, stop=stop)
    due_now(app)
    loop = threading.Thread(target=worker.run)
    loop.start()
    wait_for(lambda: CALLS["slow"] > 0)
    stop.set()
    loop.join(5)
    assert not loop.is_alive()
    job = ledger.get(app.extensions["db"], "slow")
    assert (job.state, job.attempts, job.lease_owner) == ("queued", 0, None)
    RELEASE.set()
    BEHAVIOUR["slow"] = "ok"
    drain(app)
    assert ledger.get(app.extensions["db"], "slow").state == "succeeded"


def test_shutdown_lets_a_job_that_finishes_in_time_complete(app):
    BEHAVIOUR["quick"] = "slow"
    submit(app, "test.echo", "quick", {})
    stop = threading.Event()
    due_now(app)
    loop = threading.Thread(target=Worker(app, lease_seconds=0.3, grace_seconds=5, stop=stop).run)
    loop.start()
    wait_for(lambda: CALLS["quick"] > 0)
    stop.set()
    threading.Timer(0.3, RELEASE.set).start()
    loop.join(5)
    assert ledger.get(app.extensions["db"], "quick").state == "succeeded"


# --- the admin API -------------------------------------------------------------------------------------------


def admin(app, method: str, path: str, token: str | None = "operator-secret"):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return app.test_client().open(path, method=method, headers=headers)


def test_admin_api_needs_the_operator_token(app, make_app):
    assert admin(app, "GET", "/admin/jobs/dead", token=None).status_code == 401
    wrong = admin(app, "GET", "/admin/jobs/dead", token="guess")
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    disabled = admin(make_app(), "GET", "/admin/jobs/dead")
    assert disabled.status_code == 403
    assert "ADMIN_TOKEN" in disabled.get_json()["issue"][0]["diagnostics"]


def test_admin_api_lists_shows_and_requeues_dead_jobs(app):
    BEHAVIOUR["bad"] = "permanent"
    submit(app, "test.echo", "bad", {"x": 1})
    submit(app, "test.echo", "good", {})
    drain(app)
    listed = admin(app, "GET", "/admin/jobs/dead").get_json()["jobs"]
    assert [j["id"] for j in listed] == ["bad"]
    assert listed[0]["lastError"] == "PermanentFailure: the payload can never work" and "payload" not in listed[0]
    assert admin(app, "GET", "/admin/jobs/bad").get_json()["payload"] == {"x": 1}
    stats = admin(app, "GET", "/admin/jobs").get_json()
    assert stats["jobs"]["dead"] == 1 and stats["jobs"]["succeeded"] == 1
    assert admin(app, "POST", "/admin/jobs/good/requeue").status_code == 409
    assert admin(app, "POST", "/admin/jobs/missing/requeue").status_code == 404
    assert admin(app, "GET", "/admin/jobs/dead?limit=0").status_code == 400
    BEHAVIOUR["bad"] = "ok"
    requeued = admin(app, "POST", "/admin/jobs/bad/requeue")
    assert requeued.status_code == 200 and requeued.get_json()["status"] == "queued"
    drain(app)
    assert admin(app, "GET", "/admin/jobs/dead").get_json()["jobs"] == []


# --- job status for the client, and metrics ------------------------------------------------------------------


def status(app, job_id: str, signing_key, iss: str | None = None):
    path = f"/jobs/{job_id}"
    claims = {"iss": iss} if iss else {}
    token = signing_key.token(PUBLIC_BASE_URL + path, **claims)
    return app.test_client().get(path, headers={"Authorization": f"Bearer {token}"})


def test_the_client_that_asked_reads_status_and_result(app, signing_key):
    from tests.support.tokens import TEST_ISSUER

    submit(app, "test.echo", "mine", {"client_iss": TEST_ISSUER})
    queued = status(app, "mine", signing_key).get_json()
    assert queued["status"] == "queued" and "result" not in queued
    drain(app)
    done = status(app, "mine", signing_key).get_json()
    assert done["status"] == "succeeded" and done["result"] == {"echo": {"client_iss": TEST_ISSUER}}
    assert app.test_client().get("/jobs/mine").status_code == 401


def test_other_clients_jobs_and_internal_jobs_are_not_found(app, signing_key):
    submit(app, "test.echo", "theirs", {"client_iss": "https://other-ehr.test"})
    submit(app, "test.internal", "internal", {})
    assert status(app, "theirs", signing_key).status_code == 404
    assert status(app, "internal", signing_key).status_code == 404
    assert status(app, "nothing-here", signing_key).status_code == 404


def test_metrics_show_the_ledger(app):
    BEHAVIOUR["bad"] = "transient"
    submit(app, "test.echo", "bad", {})
    submit(app, "test.echo", "waiting", {}, delay=0)
    due_now(app)
    Worker(
        app
    ).run_once()  # "bad" fails once and waits out its backoff (the clock stands still); "waiting" stays queued
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'gateway_jobs{kind="test.echo",state="queued"} 2.0' in text
    assert 'gateway_job_attempts{kind="test.echo",state="queued"} 1.0' in text
    assert "gateway_jobs_oldest_queued_age_seconds" in text
    assert "gateway_jobs_ledger_up 1.0" in text


def test_a_job_that_expires_while_it_runs_ends_expired(app):
    BEHAVIOUR["late"] = "expired"
    submit(app, "test.echo", "late", {})
    assert [o.state for o in drain(app)] == ["expired"]
    job = ledger.get(app.extensions["db"], "late")
    assert (job.state, job.result, job.lease_owner) == ("expired", None, None)


def test_a_database_hiccup_at_completion_is_retried_not_lost(app, monkeypatch):
    import sqlalchemy as sa

    real_complete, failures = ledger.complete, []

    def flaky_complete(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise sa.exc.OperationalError("UPDATE jobs", {}, Exception("database is locked"))
        return real_complete(*args, **kwargs)

    monkeypatch.setattr(ledger, "complete", flaky_complete)
    submit(app, "test.echo", "hiccup", {})
    assert [o.state for o in drain(app)] == ["succeeded"]
    assert failures == [1] and ledger.get(app.extensions["db"], "hiccup").state == "succeeded"


def test_a_stopped_burst_worker_claims_nothing_more(app):
    for i in range(3):
        submit(app, "test.echo", f"b-{i}", {})
    stop = threading.Event()
    stop.set()
    assert Worker(app, stop=stop).run_until_idle() == []
    assert ledger.counts(app.extensions["db"])["queued"] == 3


def test_a_due_clinical_job_is_claimed_before_older_background_work(app, clock):
    for n in range(3):
        assert submit(app, "test.background", f"part-{n}", {})
    clock.advance(5)
    assert submit(app, "test.echo", "draft", {})
    due_now(app)
    order = [o.job_id for o in Worker(app).run_until_idle()]
    assert order == ["draft", "part-0", "part-1", "part-2"]


def test_a_snoozed_job_waits_as_asked_without_spending_its_attempts(app, clock):
    BEHAVIOUR["poll"] = "snooze"
    assert submit(app, "test.background", "poll", {})
    due_now(app)
    worker, engine = Worker(app), app.extensions["db"]
    for _ in range(3):
        (outcome,) = worker.run_until_idle()
        assert outcome.state == "snoozed"
        job = ledger.get(engine, "poll")
        assert (job.state, job.attempts, job.last_error) == ("queued", 0, "Snooze: export in progress")
        clock.advance(59.9)
        assert worker.run_until_idle() == []  # not before the time it asked for
        clock.advance(0.2)
    assert [o.state for o in worker.run_until_idle()] == ["succeeded"]
    assert CALLS["poll"] == 4 and ledger.get(engine, "poll").attempts == 1
