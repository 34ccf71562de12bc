"""Retry policies: declared on the job handler, the one source of a kind's attempts and backoff; jitter drawn from
the generator the worker was given (seeded here), never from patched constants."""

from __future__ import annotations

import random

import pytest

from app.jobs import ledger
from app.jobs.registry import RetryLater, job_handler, job_kind, submit
from app.jobs.retry import DEFAULT_POLICY, ExponentialBackoff, RetryPolicy, ScheduleBackoff
from app.jobs.worker import Worker

SLOW = RetryPolicy(max_attempts=4, backoff=ExponentialBackoff(base=100, cap=1000))
ASKED: dict[str, float | None] = {}


@job_handler("test.retry-policy", retry=SLOW)
def failing(ctx):
    if ctx.job.id in ASKED:
        raise RetryLater(ASKED[ctx.job.id], "receiver busy")
    raise ConnectionError("downstream refused")


class Ceiling(random.Random):
    """Every draw at the top of its range."""

    def random(self) -> float:
        return 1.0 - 1e-12


def test_exponential_backoff_is_capped_with_full_jitter_from_the_given_generator():
    backoff = ExponentialBackoff(base=2, cap=300, jitter="full")
    ceilings = [round(backoff.delay(attempt, {}, Ceiling())) for attempt in range(1, 12)]
    assert ceilings == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    assert backoff.delay(3, {}, random.Random(7)) == random.Random(7).uniform(0, 8)
    assert ExponentialBackoff(base=2, cap=300, jitter="none").delay(4, {}, random.Random(1)) == 16
    assert DEFAULT_POLICY.delay(3, {}, random.Random(7)) == random.Random(7).uniform(0, 8)


def test_a_schedule_sets_the_attempts_and_the_delays_from_a_setting():
    policy = RetryPolicy(max_attempts=None, backoff=ScheduleBackoff(setting="SCHEDULE", jitter=0.2))
    config = {"SCHEDULE": (5.0, 300.0, 1800.0)}
    assert policy.attempts(config) == 4  # the first try plus one per entry
    assert policy.attempts({"SCHEDULE": (1.0,)}) == 2
    for attempt, base in ((1, 5.0), (2, 300.0), (3, 1800.0), (9, 1800.0)):
        rng = random.Random(attempt)
        delays = [policy.delay(attempt, config, rng) for _ in range(50)]
        assert all(0.8 * base <= d <= 1.2 * base for d in delays) and len(set(delays)) > 1
    assert policy.delay(2, config, random.Random(3)) == 300.0 * random.Random(3).uniform(0.8, 1.2)


def test_an_override_setting_is_explicit_and_applies_only_when_set():
    policy = RetryPolicy(max_attempts=5, max_attempts_setting="MY_ATTEMPTS")
    assert policy.attempts({}) == 5
    assert policy.attempts({"MY_ATTEMPTS": None}) == 5
    assert policy.attempts({"MY_ATTEMPTS": 9}) == 9


@pytest.mark.parametrize(
    "build",
    [
        lambda: RetryPolicy(max_attempts=0),
        lambda: RetryPolicy(max_attempts=None),  # no schedule to take the attempts from
        lambda: ExponentialBackoff(base=-1),
        lambda: ExponentialBackoff(jitter="half"),
        lambda: ScheduleBackoff(),
        lambda: ScheduleBackoff(seconds=(1,), setting="X"),
        lambda: ScheduleBackoff(seconds=(1,), jitter=1.5),
    ],
)
def test_impossible_policies_are_refused_at_declaration(build):
    with pytest.raises(ValueError):
        build()


def test_the_services_declare_their_policies_once():
    import cds_services.discharge_summary as discharge
    from app.webhooks import delivery

    summaries = job_kind(discharge.JOB_KIND).retry
    assert summaries.attempts({}) == 5 and summaries.attempts({"JOB_MAX_ATTEMPTS": 3}) == 3
    webhooks = job_kind(delivery.KIND).retry
    assert webhooks.attempts({"WEBHOOK_RETRY_SCHEDULE": (5, 300, 1800, 7200, 18000, 36000, 36000)}) == 8
    assert webhooks.attempts({"WEBHOOK_RETRY_SCHEDULE": (0.05,) * 3}) == 4


def test_submit_stores_the_policys_attempts_and_the_worker_waits_its_backoff(make_app):
    app = make_app()
    engine = app.extensions["db"]
    submit(app, "test.retry-policy", "rp-1", {})
    assert ledger.get(engine, "rp-1").max_attempts == 4

    outcome = Worker(app, rng=random.Random(11)).run_once()
    job = ledger.get(engine, "rp-1")
    waited = (job.run_after - job.updated_at).total_seconds()
    assert outcome.state == ledger.QUEUED and job.attempts == 1
    assert waited == pytest.approx(random.Random(11).uniform(0, 100), abs=1e-3)  # the kind's backoff, seeded


def test_retry_later_without_seconds_takes_the_kinds_backoff_and_with_seconds_the_asked_delay(make_app):
    app = make_app()
    engine = app.extensions["db"]
    ASKED.update({"rp-asked": 7.0, "rp-backoff": None})
    submit(app, "test.retry-policy", "rp-asked", {})
    submit(app, "test.retry-policy", "rp-backoff", {})
    worker = Worker(app, rng=random.Random(5), kinds=["test.retry-policy"])
    worker.run_once()
    worker.run_once()
    asked, backed_off = ledger.get(engine, "rp-asked"), ledger.get(engine, "rp-backoff")
    assert (asked.run_after - asked.updated_at).total_seconds() == pytest.approx(7.0, abs=1e-3)
    assert asked.last_error == "RetryLater: receiver busy"
    waited = (backed_off.run_after - backed_off.updated_at).total_seconds()
    assert waited == pytest.approx(random.Random(5).uniform(0, 100), abs=1e-3)
