"""The ledger's behaviour that keeps it flat at depth: counts kept by triggers (exact, however many writers and
folders), lapsed leases returned to the queue, claims across kinds, and purge after retention."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from app import results
from app.clock import utc_now
from app.db import make_engine
from app.jobs import ledger
from app.jobs.maintenance import Maintenance
from tests.support.databases import sqlite_database

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def counted_the_slow_way(engine) -> dict[tuple[str, str], tuple[int, int]]:
    """The ground truth: a GROUP BY over the whole table, as the metrics used to do."""
    query = sa.select(ledger.jobs.c.kind, ledger.jobs.c.state, sa.func.count(), sa.func.sum(ledger.jobs.c.attempts))
    with engine.connect() as conn:
        rows = conn.execute(query.group_by(ledger.jobs.c.kind, ledger.jobs.c.state)).all()
    return {(kind, state): (int(n), int(attempts)) for kind, state, n, attempts in rows}


def a_busy_history(engine) -> None:
    """Every kind of write the ledger makes: enqueue, claim, complete, fail (retry and dead), release,
    requeue, expiry, a lapsed lease back to the queue, and a purge."""
    for i in range(12):
        ledger.enqueue(engine, f"a-{i}", "alpha" if i % 2 else "beta", {}, max_attempts=2, now=at(i))
    ledger.enqueue(engine, "stale", "alpha", {}, expires_at=at(5), now=T0)
    done = ledger.claim(engine, "w1", now=at(20))
    ledger.complete(engine, done, {"ok": True}, now=at(21))
    retried = ledger.claim(engine, "w1", now=at(22))
    ledger.fail(engine, retried, "Boom: x", retry_in=0, now=at(23))
    dead = ledger.claim(engine, "w1", now=at(24))
    ledger.fail(engine, dead, "Boom: y", permanent=True, now=at(25))
    ledger.requeue(engine, dead.id, now=at(26))
    released = ledger.claim(engine, "w2", now=at(27))
    ledger.release(engine, released, now=at(28))
    ledger.claim(engine, "w3", lease_seconds=1, now=at(29))  # this worker dies
    ledger.sweep(engine, now=at(40))
    ledger.purge(engine, finished_before=at(100), dead_before=at(100))


def test_counts_kept_by_triggers_equal_a_count_of_the_table_folded_or_not(engine):
    a_busy_history(engine)
    truth = counted_the_slow_way(engine)
    assert ledger.attempts_by_state(engine) == truth, "before folding"
    while ledger.fold_counts(engine, limit=7):
        assert ledger.attempts_by_state(engine) == truth, "part way"
    assert ledger.attempts_by_state(engine) == truth, "after folding"
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(ledger.job_count_changes)).scalar() == 0


def test_counts_stay_exact_with_writers_and_folders_racing(engine):
    def write(worker: int) -> None:
        for i in range(40):
            ledger.enqueue(engine, f"w{worker}-{i}", "alpha", {})
            job = ledger.claim(engine, f"worker-{worker}", kinds=["alpha"])
            if job is not None:
                ledger.complete(engine, job, None)

    def fold(stop: threading.Event) -> None:
        while not stop.is_set():
            ledger.fold_counts(engine, limit=5)

    stop = threading.Event()
    folders = [threading.Thread(target=fold, args=(stop,)) for _ in range(2)]
    writers = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in folders + writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in folders:
        thread.join()
    assert ledger.attempts_by_state(engine) == counted_the_slow_way(engine)
    assert ledger.counts(engine)["succeeded"] + ledger.counts(engine)["queued"] == 160


def test_a_lapsed_lease_goes_back_to_the_queue_in_its_place(engine):
    ledger.enqueue(engine, "first", "alpha", {}, now=T0)
    ledger.enqueue(engine, "second", "alpha", {}, now=at(1))
    lost = ledger.claim(engine, "dies", lease_seconds=5, now=at(2))
    ledger.sweep(engine, now=at(8))
    job = ledger.get(engine, "first")
    assert (job.state, job.attempts, job.lease_owner, job.run_after) == ("queued", 1, None, T0)
    again = ledger.claim(engine, "lives", now=at(9), sweep_first=False)
    assert (again.id, again.attempts) == ("first", 2), "it kept its place at the head of the queue"
    assert ledger.complete(engine, lost, None) is False, "the lost worker is fenced"


def test_a_claim_takes_the_oldest_due_job_across_its_kinds(engine):
    ledger.enqueue(engine, "beta-late", "beta", {}, run_after=at(5), now=T0)
    ledger.enqueue(engine, "alpha-later", "alpha", {}, run_after=at(7), now=T0)
    ledger.enqueue(engine, "gamma-first", "gamma", {}, run_after=at(1), now=T0)
    order = [ledger.claim(engine, "w", kinds=["alpha", "beta"], now=at(10)).id for _ in range(2)]
    assert order == ["beta-late", "alpha-later"]
    assert ledger.claim(engine, "w", kinds=["alpha", "beta"], now=at(10)) is None
    assert ledger.claim(engine, "w", now=at(10)).id == "gamma-first"


def test_purge_removes_finished_and_dead_jobs_after_their_retention_only(engine):
    for i, state in enumerate(["succeeded", "expired", "dead", "succeeded", "queued"]):
        ledger.enqueue(engine, f"j{i}", "alpha", {}, now=T0)
        with engine.begin() as conn:
            conn.execute(ledger.jobs.update().where(ledger.jobs.c.id == f"j{i}").values(state=state, updated_at=at(i)))
    removed = ledger.purge(engine, finished_before=at(2), dead_before=at(1))
    assert removed == 2
    assert {job.id for state in ledger.STATES for job in ledger.find(engine, state)} == {"j2", "j3", "j4"}


def test_purge_works_through_a_backlog_in_bounded_batches_and_no_state_starves_another(engine):
    for i in range(35):
        ledger.enqueue(engine, f"j{i}", "alpha", {}, now=T0)
    with engine.begin() as conn:
        conn.execute(ledger.jobs.update().values(state="succeeded", updated_at=T0))
        conn.execute(ledger.jobs.update().where(ledger.jobs.c.id.in_([f"j{i}" for i in range(5)])).values(state="dead"))
    deletes = []
    sa.event.listen(
        engine,
        "before_cursor_execute",
        lambda *args: deletes.append(args[2]) if args[2].startswith("DELETE FROM jobs") else None,
    )
    assert ledger.purge(engine, finished_before=at(1), dead_before=at(1), limit=10) == 35
    assert len(deletes) == 4, "30 succeeded in 3 batches of 10, then the 5 dead"
    assert sum(ledger.counts(engine).values()) == 0


def test_a_mass_expiry_is_swept_in_one_round_of_short_transactions(engine):
    for i in range(ledger.SWEEP_BATCH * 3 + 7):
        ledger.enqueue(engine, f"stale-{i}", "alpha", {}, expires_at=at(5), now=T0)
    ledger.enqueue(engine, "live", "alpha", {}, now=at(1))
    ledger.sweep(engine, now=at(10))
    assert ledger.counts(engine)["expired"] == ledger.SWEEP_BATCH * 3 + 7
    assert ledger.claim(engine, "w", now=at(10), sweep_first=False).id == "live"


@pytest.mark.parametrize("write", ["complete", "fail", "expire", "release", "heartbeat"])
def test_every_late_write_of_a_worker_whose_lease_lapsed_is_fenced(engine, write):
    ledger.enqueue(engine, "job", "alpha", {}, now=T0)
    lost = ledger.claim(engine, "dies", lease_seconds=5, now=at(1))
    ledger.sweep(engine, now=at(10))
    again = ledger.claim(engine, "lives", now=at(11), sweep_first=False)
    late = {
        "complete": lambda: ledger.complete(engine, lost, {"late": True}),
        "fail": lambda: ledger.fail(engine, lost, "Late: x") != ledger.FENCED,
        "expire": lambda: ledger.expire(engine, lost),
        "release": lambda: ledger.release(engine, lost),
        "heartbeat": lambda: ledger.heartbeat(engine, lost),
    }[write]
    assert late() is False
    job = ledger.get(engine, "job")
    assert (job.state, job.lease_owner, job.attempts, job.result) == ("running", "lives", 2, None)
    assert ledger.complete(engine, again, {"ok": True}) is True


def test_the_migration_counts_the_jobs_that_were_already_there(tmp_path):
    from app.db import upgrade

    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0005")
    engine = make_engine(url)
    with engine.begin() as conn:
        for i, (kind, state, attempts) in enumerate([("a", "queued", 0), ("a", "dead", 3), ("b", "succeeded", 1)] * 4):
            conn.execute(
                sa.text(
                    "INSERT INTO jobs (id, kind, payload, state, attempts, max_attempts, run_after, created_at, "
                    "updated_at) VALUES (:id, :kind, '{}', :state, :attempts, 3, :t, :t, :t)"
                ),
                {"id": f"j{i}", "kind": kind, "state": state, "attempts": attempts, "t": "2026-11-01 00:00:00"},
            )
    upgrade(url)
    assert ledger.attempts_by_state(engine) == {
        ("a", "queued"): (4, 0),
        ("a", "dead"): (4, 12),
        ("b", "succeeded"): (4, 4),
    }
    engine.dispose()


def test_workers_purge_jobs_and_explanation_results_past_their_retention(make_app):
    app = make_app(JOB_RETENTION_S=60, DEAD_JOB_RETENTION_S=3600)
    engine = app.extensions["db"]
    now = utc_now()
    for job_id, state, age in [
        ("old-done", "succeeded", 120),
        ("new-done", "succeeded", 10),
        ("old-dead", "dead", 120),
    ]:
        ledger.enqueue(engine, job_id, "alpha", {})
        with engine.begin() as conn:
            update = ledger.jobs.update().where(ledger.jobs.c.id == job_id)
            conn.execute(update.values(state=state, updated_at=now - timedelta(seconds=age)))
    results.save(
        engine,
        "cardiovascular-risk",
        {},
        client_iss=None,
        fhir_server=None,
        patient_id="p",
        ttl_seconds=60,
        now=now - timedelta(seconds=120),
    )
    kept = results.save(
        engine, "cardiovascular-risk", {}, client_iss=None, fhir_server=None, patient_id="p", ttl_seconds=60
    )
    assert Maintenance(app).purge() == 2
    remaining = {job.id for state in ledger.STATES for job in ledger.find(engine, state)}
    assert remaining == {"new-done", "old-dead"}, "dead jobs are kept longer, for the operators"
    with engine.connect() as conn:
        assert conn.execute(sa.select(results.ai_results.c.id)).scalars().all() == [kept]


def test_on_sqlite_a_writer_waits_out_another_writers_lock_then_gives_up_after_the_limit(tmp_path, monkeypatch):
    import sqlite3

    url = sqlite_database(tmp_path)
    engine = make_engine(url)
    assert ledger.enqueue(engine, "first", "alpha", {})  # the file is in WAL mode from here on
    holder = sqlite3.connect(tmp_path / "jobs.db", timeout=0, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    releaser = threading.Timer(0.05, holder.rollback)
    releaser.start()
    assert ledger.enqueue(engine, "waited", "alpha", {}), "the enqueue waited for the lock instead of failing"
    releaser.join()
    holder.execute("BEGIN IMMEDIATE")
    monkeypatch.setattr(ledger, "SQLITE_LOCK_WAIT_S", 0.05)
    with pytest.raises(sa.exc.OperationalError, match="locked"):
        ledger.enqueue(engine, "gave-up", "alpha", {})
    holder.rollback()
    assert ledger.enqueue(engine, "after", "alpha", {}), "the connection is usable again"
    engine.dispose()
