"""Every hot query of the job ledger stays on its indexes at a deep backlog (issue 10), on SQLite and PostgreSQL.

The SQL is not written down here: each public ledger function (and the metrics scrape) runs once against a
backlog of 100,000 queued jobs plus leases, dead letters and history, the statements it sends are recorded with
their parameters, and each is EXPLAINed (after ANALYZE) with those parameters. No statement may read all of the
jobs table (a sequential scan, or a walk of a whole index that no LIMIT stops) or sort its rows
(tests/support/query_plans.py has the rules). The same plans came out at 1,000,000 queued on PostgreSQL.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from app.db import make_engine
from app.jobs import ledger
from app.jobs.monitor import LedgerCollector
from tests.conftest import require
from tests.support.databases import postgres_database, postgres_unavailable, sqlite_database
from tests.support.query_plans import StatementLog, explain

DEPTH = 100_000  # queued jobs: the depth for SQLite
COPIES = 100  # of each template row: the database writes the bulk of the backlog itself
BULK, WEBHOOK, RARE = "discharge-summary.draft", "webhook.deliver", "jobs.canary"
WORKER = "plan-worker"
DEAD_ID = "backlog-dead-0"


def backlog_templates(now: datetime) -> list[dict[str, Any]]:
    """One row in COPIES of the deep ledger: the queue (mostly due over the last hour, a tenth held back by retry
    backoff, a few already clinically stale; one kind rare), leases live and lapsed (some on their last
    attempt), a dead letter queue, and a history of finished jobs from the last 30 days."""
    rng = random.Random(10)
    rows = []
    for n in range(DEPTH // COPIES):
        backing_off, stale = n % 10 == 0, n % 31 == 0
        run_after = (
            now + timedelta(seconds=rng.uniform(1, 300))
            if backing_off
            else now - timedelta(seconds=rng.uniform(0, 3600))
        )
        expires_at = (
            now - timedelta(seconds=rng.uniform(1, 600))
            if stale
            else None
            if n % 5 < 2
            else now + timedelta(hours=rng.uniform(1, 24))
        )
        kind = RARE if n == 7 else WEBHOOK if n % 10 < 3 else BULK
        rows.append(
            _row(
                f"backlog-queued-{n}", kind, ledger.QUEUED, run_after, attempts=int(backing_off), expires_at=expires_at
            )
        )
    for n in range(20):  # half of them lapsed: more than one sweep batch
        lease = now + timedelta(seconds=rng.uniform(5, 30)) if n % 2 else now - timedelta(seconds=rng.uniform(1, 600))
        rows.append(
            _row(
                f"backlog-running-{n}",
                BULK if n % 3 else WEBHOOK,
                ledger.RUNNING,
                now - timedelta(minutes=1),
                attempts=1 + n % 5,
                lease_owner=f"worker-{n % 4}",
                lease_expires_at=lease,
                expires_at=now - timedelta(seconds=1) if n % 6 == 0 else None,
            )
        )
    for n in range(20):
        when = now - timedelta(days=rng.uniform(0, 45))
        rows.append(
            _row(
                f"backlog-dead-{n}",
                WEBHOOK if n % 4 else BULK,
                ledger.DEAD,
                when,
                attempts=5,
                last_error="HTTPError: 503",
            )
        )
    for n in range(550):
        when = now - timedelta(days=rng.uniform(0, 30))
        state = ledger.EXPIRED if n % 11 == 0 else ledger.SUCCEEDED
        rows.append(_row(f"backlog-done-{n}", BULK if n % 3 else WEBHOOK, state, when, attempts=1, result={"ok": True}))
    return rows


def _row(job_id: str, kind: str, state: str, when: datetime, **values) -> dict[str, Any]:
    row = {"payload": {"encounter": job_id}, "attempts": 0, "max_attempts": 5, "lease_owner": None}
    row |= {"lease_expires_at": None, "expires_at": None, "last_error": None, "result": None}
    return (
        row
        | {"id": job_id, "kind": kind, "state": state, "run_after": when, "created_at": when, "updated_at": when}
        | values
    )


def fill(engine: sa.Engine) -> None:
    """Write the templates, let the database copy each COPIES - 1 more times (ids suffixed), then ANALYZE, and
    fold the count changes the copies made if the ledger keeps them, as its workers would within a second."""
    copies = sa.select(sa.literal(2).label("n")).cte("copies", recursive=True)
    copies = copies.union_all(sa.select(copies.c.n + 1).where(copies.c.n < COPIES))
    columns = [column.key for column in ledger.jobs.c]
    suffixed = (ledger.jobs.c.id + "-" + sa.cast(copies.c.n, sa.Text)).label("id")
    copied = [suffixed if column.key == "id" else column for column in ledger.jobs.c]
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":  # the index updates of the copy fit in memory: twice as fast
            conn.exec_driver_sql("PRAGMA cache_size = -262144")
        conn.execute(ledger.jobs.insert(), backlog_templates(datetime.now(UTC)))
        conn.execute(
            ledger.jobs.insert().from_select(
                columns, sa.select(*copied).select_from(ledger.jobs.join(copies, sa.true()))
            )
        )
    if hasattr(ledger, "fold_counts"):
        while ledger.fold_counts(engine):
            pass
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA cache_size = -2000")  # back to the default for the exercises


class Held:
    """Jobs the exercises claim, for the ones that act on a running job."""

    def __init__(self):
        self.jobs: list[ledger.Job] = []

    def claimed(self, job: ledger.Job | None) -> ledger.Job:
        assert job is not None, "the backlog has due jobs, yet the claim returned none"
        self.jobs.append(job)
        return job


# (label, the ledger function it exercises, the call): every hot path, in an order that leaves each one
# something to act on. The metrics scrape goes through the collector, whatever ledger functions it uses;
# `jobs stats` and GET /jobs use counts and oldest_queued_age.
Exercise = tuple[str, str | None, Callable[[sa.Engine, Held], Any]]
EXERCISES: list[Exercise] = [
    ("enqueue", "enqueue", lambda e, h: ledger.enqueue(e, "plan-new-job", BULK, {"encounter": "e-1"})),
    ("claim any kind", "claim", lambda e, h: h.claimed(_claim(e, None))),
    ("claim one kind", "claim", lambda e, h: h.claimed(_claim(e, [WEBHOOK]))),
    ("claim a rare kind", "claim", lambda e, h: h.claimed(_claim(e, [RARE]))),
    ("claim several kinds", "claim", lambda e, h: h.claimed(_claim(e, [BULK, RARE, WEBHOOK]))),
    ("heartbeat", "heartbeat", lambda e, h: ledger.heartbeat(e, h.jobs[0])),
    ("complete", "complete", lambda e, h: ledger.complete(e, h.jobs[0], {"ok": True})),
    ("fail", "fail", lambda e, h: ledger.fail(e, h.jobs[1], "HTTPError: 503")),
    ("expire", "expire", lambda e, h: ledger.expire(e, h.jobs[2])),
    ("release", "release", lambda e, h: ledger.release(e, h.jobs[3])),
    (
        "claim several kinds by priority",
        "claim",
        lambda e, h: h.claimed(
            ledger.claim(e, "plan-worker", kinds=[BULK, WEBHOOK], priorities={BULK: 10}, sweep_first=False)
        ),
    ),
    ("snooze", "snooze", lambda e, h: ledger.snooze(e, h.jobs[4], 30.0, "Snooze: export in progress")),
    ("sweep", "sweep", lambda e, h: ledger.sweep(e)),
    ("requeue", "requeue", lambda e, h: ledger.requeue(e, DEAD_ID)),
    ("get", "get", lambda e, h: ledger.get(e, DEAD_ID)),
    ("dead letter list", "find", lambda e, h: ledger.find(e, ledger.DEAD)),
    ("dead letter list of a kind", "find", lambda e, h: ledger.find(e, ledger.DEAD, kind=WEBHOOK)),
    ("counts", "counts", lambda e, h: ledger.counts(e)),
    ("attempts by state", "attempts_by_state", lambda e, h: ledger.attempts_by_state(e)),
    ("oldest queued age", "oldest_queued_age", lambda e, h: ledger.oldest_queued_age(e)),
    ("metrics scrape", None, lambda e, h: list(LedgerCollector(e).collect())),
    ("fold counts", "fold_counts", lambda e, h: ledger.fold_counts(e)),
    # A few jobs past their retention (every state's batch is read), then a backlog of them (the first batch fills).
    (
        "purge a few",
        "purge",
        lambda e, h: ledger.purge(e, finished_before=_ago(days=29.8), dead_before=_ago(days=44.8)),
    ),
    ("purge a backlog", "purge", lambda e, h: ledger.purge(e, finished_before=_ago(days=7), dead_before=_ago(days=30))),
]


# A maintenance step that drains a queue table of its own must read that table like a claim reads the jobs.
DRAINS = {"fold counts": ("job_count_changes",)}
# Sorts that are not of the queue: the purge takes the oldest rows past retention, in the index's order; when
# the planner expects a few thousand or fewer (PostgreSQL), it sorts those instead, and only those.
BOUNDED_SORTS = {"purge a few", "purge a backlog"}


def _claim(engine: sa.Engine, kinds: list[str] | None) -> ledger.Job | None:
    """A claim as workers make it: they sweep on a timer instead (the sweep has its own exercise)."""
    return ledger.claim(engine, WORKER, kinds=kinds, sweep_first=False)


def _ago(**delta) -> datetime:
    return datetime.now(UTC) - timedelta(**delta)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def recorded(request, tmp_path_factory):
    """A database holding the deep backlog, and the statements each exercise sent to it."""
    with _database(request.param, tmp_path_factory) as url:
        engine = make_engine(url)
        fill(engine)
        log = StatementLog(engine)
        held = Held()
        for label, function, call in EXERCISES:
            if function is None or hasattr(ledger, function):  # an older ledger may lack a maintenance step
                with log.labelled(label):
                    call(engine, held)
        log.close()
        yield engine, log
        engine.dispose()


def _database(kind: str, tmp_path_factory):
    if kind == "sqlite":
        return nullcontext(sqlite_database(tmp_path_factory.mktemp("plans")))
    require(postgres_unavailable())
    return postgres_database()


@pytest.mark.parametrize("label", [label for label, _, _ in EXERCISES])
def test_hot_query_reads_no_whole_table_and_sorts_no_queue(recorded, label):
    engine, log = recorded
    if label not in log.by_label:
        pytest.skip(f"this ledger has no {label}")
    statements = log.by_label[label]
    assert statements, f"{label} sent no statement to the database"
    failures = []
    for statement in statements:
        plan = explain(engine, statement, ("jobs", *DRAINS.get(label, ())))
        offences = [o for o in plan.offences if not (label in BOUNDED_SORTS and o.startswith("sort:"))]
        if offences:
            failures.append(
                f"{'; '.join(offences)}\n  statement: {statement.describe()}\n  plan:\n    "
                + plan.text.replace("\n", "\n    ")
            )
    if failures:
        pytest.fail(f"{label} at {DEPTH:,} queued on {engine.dialect.name}:\n" + "\n".join(failures), pytrace=False)


def test_every_database_function_of_the_ledger_is_exercised():
    """A new ledger function that reads or writes the table (a purge, say) must join the exercises."""
    touches_database = {
        name
        for name, function in inspect.getmembers(ledger, inspect.isfunction)
        if function.__module__ == ledger.__name__
        and not name.startswith("_")
        and next(iter(inspect.signature(function).parameters), None) == "engine"
    }
    assert touches_database - {name for _, name, _ in EXERCISES} == set()
