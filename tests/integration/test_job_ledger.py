"""The job ledger on SQLite (a file, migrated with Alembic) and on a throwaway PostgreSQL database."""

from __future__ import annotations

import multiprocessing
import random
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from app.db import make_engine
from app.jobs import ledger

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_transitions_are_written_down_for_every_state():
    assert set(ledger.TRANSITIONS) == set(ledger.STATES)
    assert ledger.TRANSITIONS[ledger.SUCCEEDED] == ledger.TRANSITIONS[ledger.EXPIRED] == frozenset()
    assert ledger.can_transition(ledger.DEAD, ledger.QUEUED)
    assert not ledger.can_transition(ledger.SUCCEEDED, ledger.QUEUED)


def test_enqueue_twice_makes_one_job(engine):
    assert ledger.enqueue(engine, "svc:v1:hook-1", "score", {"patient": "p-1"}, now=T0) is True
    assert ledger.enqueue(engine, "svc:v1:hook-1", "score", {"patient": "other"}, now=at(1)) is False
    job = ledger.get(engine, "svc:v1:hook-1")
    assert (job.state, job.attempts, job.payload, job.created_at) == ("queued", 0, {"patient": "p-1"}, T0)
    assert ledger.counts(engine)["queued"] == 1
    assert ledger.get(engine, "absent") is None


def test_claim_takes_the_oldest_due_job(engine):
    ledger.enqueue(engine, "later", "score", {}, run_after=at(10), now=T0)
    ledger.enqueue(engine, "first", "score", {}, now=at(1))
    ledger.enqueue(engine, "other-kind", "webhook", {}, now=at(1.5))
    ledger.enqueue(engine, "second", "score", {}, now=at(2))
    assert ledger.claim(engine, "w", kinds=["score"], now=at(5)).id == "first"
    job = ledger.claim(engine, "w", kinds=["score"], lease_seconds=60, now=at(5))
    assert (job.id, job.state, job.attempts, job.lease_owner, job.lease_expires_at) == (
        "second",
        "running",
        1,
        "w",
        at(65),
    )
    assert ledger.claim(engine, "w", kinds=["score"], now=at(9)) is None
    assert ledger.claim(engine, "w", kinds=["score"], now=at(10)).id == "later"
    assert ledger.claim(engine, "w", now=at(10)).id == "other-kind"
    assert ledger.claim(engine, "w", now=at(10)) is None


def _drain(url: str, worker_id: str, start=None) -> list[str]:
    """A worker: claim and complete until nothing is left. Module level so that spawned processes can run it;
    they all pass the ``start`` barrier together so that they really race."""
    engine = make_engine(url)
    with engine.connect():  # connect (and set SQLite's pragmas) before the race, not during it
        pass
    if start is not None:
        start.wait(timeout=60)
    claimed = []
    try:
        while (job := ledger.claim(engine, worker_id)) is not None:
            claimed.append(job.id)
            assert ledger.complete(engine, job, {"by": worker_id})
    finally:
        engine.dispose()
    return claimed


def _assert_each_completed_once(engine, claims: list[str], expected: set[str]) -> None:
    assert len(claims) == len(expected)
    assert Counter(claims).most_common(1)[0][1] == 1
    assert set(claims) == expected
    with engine.connect() as conn:
        rows = conn.execute(sa.select(ledger.jobs.c.state, ledger.jobs.c.attempts)).all()
    assert {(state, attempts) for state, attempts in rows} == {("succeeded", 1)}


def test_racing_threads_never_claim_the_same_job(engine, database_url):
    ids = {f"job-{i}" for i in range(200)}
    for job_id in sorted(ids):
        ledger.enqueue(engine, job_id, "score", {"n": job_id})
    results: dict[str, list[str]] = {}
    start = threading.Barrier(4)

    def worker(name: str) -> None:
        results[name] = _drain(database_url, name, start)

    threads = [threading.Thread(target=worker, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 4
    assert sum(1 for claims in results.values() if claims) > 1, "the workers did not overlap"
    _assert_each_completed_once(engine, [job for claims in results.values() for job in claims], ids)


def test_racing_processes_never_claim_the_same_job(engine, database_url):
    ids = {f"job-{i}" for i in range(50)}
    for job_id in sorted(ids):
        ledger.enqueue(engine, job_id, "score", {"n": job_id})
    spawn = multiprocessing.get_context("spawn")
    with spawn.Manager() as manager, spawn.Pool(4) as pool:
        start = manager.Barrier(4)
        per_worker = pool.starmap(_drain, [(database_url, f"p{i}", start) for i in range(4)])
    assert sum(1 for claims in per_worker if claims) > 1, "the workers did not overlap"
    _assert_each_completed_once(engine, [job for claims in per_worker for job in claims], ids)


def test_lapsed_lease_is_taken_over_and_the_old_worker_is_fenced(engine):
    ledger.enqueue(engine, "j", "score", {}, now=T0)
    old = ledger.claim(engine, "w1", lease_seconds=30, now=T0)
    assert ledger.claim(engine, "w2", now=at(29)) is None
    new = ledger.claim(engine, "w2", lease_seconds=30, now=at(31))
    assert (new.id, new.lease_owner, new.attempts) == ("j", "w2", 2)
    assert ledger.heartbeat(engine, old, now=at(32)) is False
    assert ledger.complete(engine, old, {"by": "w1"}, now=at(32)) is False
    assert ledger.fail(engine, old, "TimeoutError at app.ai.client", now=at(32)) == "fenced"
    assert ledger.get(engine, "j").state == "running"
    assert ledger.complete(engine, new, {"by": "w2"}, now=at(33)) is True
    assert ledger.complete(engine, old, {"by": "w1"}, now=at(34)) is False
    job = ledger.get(engine, "j")
    assert (job.state, job.result, job.attempts, job.lease_owner) == ("succeeded", {"by": "w2"}, 2, None)


def test_same_worker_id_is_fenced_on_the_attempt(engine):
    ledger.enqueue(engine, "j", "score", {}, now=T0)
    first = ledger.claim(engine, "w", lease_seconds=30, now=T0)
    second = ledger.claim(engine, "w", lease_seconds=30, now=at(31))
    assert ledger.complete(engine, first, "stale", now=at(32)) is False
    assert ledger.complete(engine, second, "fresh", now=at(32)) is True
    assert ledger.get(engine, "j").result == "fresh"


def test_heartbeat_keeps_the_lease_until_it_lapses(engine):
    ledger.enqueue(engine, "j", "score", {}, now=T0)
    job = ledger.claim(engine, "w1", lease_seconds=30, now=T0)
    assert ledger.heartbeat(engine, job, lease_seconds=30, now=at(20)) is True
    assert ledger.get(engine, "j").lease_expires_at == at(50)
    assert ledger.claim(engine, "w2", now=at(40)) is None
    assert ledger.claim(engine, "w2", now=at(51)).lease_owner == "w2"
    assert ledger.heartbeat(engine, job, now=at(52)) is False


class Ceiling(random.Random):
    """Jitter that always picks the top of the range, to read the backoff ceiling."""

    def uniform(self, a, b):
        return b


def test_backoff_is_capped_exponential_with_full_jitter():
    ceilings = [ledger.backoff_seconds(attempt, Ceiling()) for attempt in range(1, 12)]
    assert ceilings == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    rng = random.Random(7)
    draws = [ledger.backoff_seconds(attempt, rng) for attempt in range(1, 12) for _ in range(20)]
    assert all(0 <= d <= 300 for d in draws)
    expected = random.Random(7)
    assert ledger.backoff_seconds(3, random.Random(7)) == expected.uniform(0, 8)


def test_fail_retries_with_backoff_then_dead_letters(engine):
    ledger.enqueue(engine, "j", "score", {}, max_attempts=3, now=T0)
    now = T0
    for attempt in (1, 2):
        job = ledger.claim(engine, "w", now=now)
        assert job.attempts == attempt
        seed = 100 + attempt
        assert ledger.fail(engine, job, "ValueError at app.ai.model:42", now=now, rng=random.Random(seed)) == "queued"
        row = ledger.get(engine, "j")
        delay = (row.run_after - now).total_seconds()
        assert delay == pytest.approx(random.Random(seed).uniform(0, 2 * 2 ** (attempt - 1)), abs=1e-5)
        assert (row.state, row.lease_owner, row.last_error) == ("queued", None, "ValueError at app.ai.model:42")
        if delay > 0.001:
            assert ledger.claim(engine, "w", now=now) is None
        now = row.run_after
    job = ledger.claim(engine, "w", now=now)
    assert job.attempts == 3
    assert ledger.fail(engine, job, "ValueError at app.ai.model:42", now=now) == "dead"
    assert ledger.claim(engine, "w", now=at(10_000)) is None
    assert ledger.counts(engine)["dead"] == 1


def test_requeue_brings_a_dead_job_back(engine):
    ledger.enqueue(engine, "j", "score", {"x": 1}, max_attempts=1, now=T0)
    assert ledger.requeue(engine, "j", now=T0) is False
    assert ledger.fail(engine, ledger.claim(engine, "w", now=T0), "KeyError at app.jobs", now=T0) == "dead"
    assert ledger.requeue(engine, "j", now=at(60)) is True
    job = ledger.get(engine, "j")
    assert (job.state, job.attempts, job.run_after) == ("queued", 0, at(60))
    again = ledger.claim(engine, "w", now=at(61))
    assert (again.id, again.attempts) == ("j", 1)
    assert ledger.complete(engine, again, {"ok": True}, now=at(62)) is True
    assert ledger.requeue(engine, "j") is False
    assert ledger.requeue(engine, "absent") is False


def test_a_job_that_keeps_killing_its_worker_goes_dead_without_running_again(engine):
    ledger.enqueue(engine, "poison", "score", {}, max_attempts=2, now=T0)
    assert ledger.claim(engine, "w1", lease_seconds=30, now=T0).attempts == 1
    second = ledger.claim(engine, "w2", lease_seconds=30, now=at(31))
    assert (second.id, second.attempts) == ("poison", 2)
    assert ledger.claim(engine, "w3", now=at(62)) is None
    job = ledger.get(engine, "poison")
    assert (job.state, job.attempts, job.lease_owner) == ("dead", 2, None)
    assert "LeaseExpired" in job.last_error
    assert ledger.complete(engine, second, {"late": True}, now=at(63)) is False


def test_a_stale_job_expires_instead_of_being_claimed(engine):
    ledger.enqueue(engine, "stale", "score", {}, expires_at=at(5), now=T0)
    ledger.enqueue(engine, "fresh", "score", {}, expires_at=at(100), now=at(1))
    assert ledger.claim(engine, "w1", lease_seconds=30, now=at(6)).id == "fresh"
    assert ledger.get(engine, "stale").state == "expired"
    ledger.enqueue(engine, "lapsed", "score", {}, expires_at=at(50), now=at(7))
    lapsed = ledger.claim(engine, "w1", lease_seconds=30, now=at(8))
    assert lapsed.id == "lapsed"
    taken_over = ledger.claim(engine, "w2", now=at(60))
    assert (taken_over.id, taken_over.attempts) == ("fresh", 2)
    assert ledger.claim(engine, "w2", now=at(61)) is None
    states = {job_id: ledger.get(engine, job_id).state for job_id in ("stale", "fresh", "lapsed")}
    assert states == {"stale": "expired", "fresh": "running", "lapsed": "expired"}
    assert ledger.complete(engine, lapsed, {"late": True}, now=at(62)) is False
    assert ledger.counts(engine)["expired"] == 2


def test_counts_and_oldest_queued_age(engine):
    assert ledger.counts(engine) == dict.fromkeys(ledger.STATES, 0)
    assert ledger.oldest_queued_age(engine, now=T0) is None
    ledger.enqueue(engine, "a", "score", {}, now=T0)
    ledger.enqueue(engine, "b", "score", {}, now=at(5))
    ledger.enqueue(engine, "c", "score", {}, now=at(6))
    ledger.enqueue(engine, "held", "score", {}, run_after=at(1000), now=at(1))
    ledger.complete(engine, ledger.claim(engine, "w", now=at(7)), None, now=at(8))
    ledger.claim(engine, "w", now=at(9))
    assert ledger.counts(engine) == {"queued": 2, "running": 1, "succeeded": 1, "dead": 0, "expired": 0}
    assert ledger.oldest_queued_age(engine, now=at(10)) == pytest.approx(4)
    assert ledger.get(engine, "a").result is None
