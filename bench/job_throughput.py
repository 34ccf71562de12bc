"""The job ledger under load, on SQLite and on PostgreSQL, in one run.

Enqueue latency: ``ledger.enqueue`` (INSERT ... ON CONFLICT DO NOTHING RETURNING, its own transaction) one job
at a time, against a baseline of a plain INSERT of the same row in its own transaction.
Throughput: canary jobs (no work) through ``flask --app app jobs worker`` processes, against a baseline of the
bare ledger loop (claim + complete in one process, no worker machinery, no sweeps). Workers are started and warmed
before the jobs are inserted, so process start-up is not counted.

    .venv/bin/python -m bench.job_throughput [--enqueues 2000] [--jobs 2000] [--workers 1,4]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from app.db import make_engine
from app.jobs import ledger
from app.jobs.canary import CANARY
from tests.support.databases import postgres_database, postgres_unavailable, sqlite_database
from tests.support.processes import start_worker

CLIENTS = Path(__file__).resolve().parents[1] / "app" / "cds" / "dev_clients.json"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def enqueue_latency(engine: sa.Engine, n: int) -> dict[str, float]:
    baseline, measured = [], []
    now = datetime.now(UTC)
    row = {"kind": CANARY, "payload": {}, "state": ledger.QUEUED, "attempts": 0, "max_attempts": 3}
    for i in range(n):
        started = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(
                ledger.jobs.insert().values(id=f"plain-{i}", run_after=now, created_at=now, updated_at=now, **row)
            )
        baseline.append(time.perf_counter() - started)
        started = time.perf_counter()
        ledger.enqueue(engine, f"enq-{i}", CANARY, {})
        measured.append(time.perf_counter() - started)
    with engine.begin() as conn:
        conn.execute(ledger.jobs.delete())
    return {
        "insert_p50": statistics.median(baseline) * 1000,
        "enqueue_p50": statistics.median(measured) * 1000,
        "enqueue_p99": percentile(measured, 0.99) * 1000,
        "ratio": statistics.median(measured) / statistics.median(baseline),
    }


def bulk_insert(engine: sa.Engine, n: int, prefix: str) -> None:
    now = datetime.now(UTC)
    rows = [
        {
            "id": f"{prefix}-{i}",
            "kind": CANARY,
            "payload": {},
            "state": ledger.QUEUED,
            "attempts": 0,
            "max_attempts": 3,
            "run_after": now,
            "created_at": now,
            "updated_at": now,
        }
        for i in range(n)
    ]
    with engine.begin() as conn:
        conn.execute(ledger.jobs.insert(), rows)


def wait_done(engine: sa.Engine, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while ledger.counts(engine)[ledger.SUCCEEDED] < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"jobs not done in {timeout} s: {ledger.counts(engine)}")
        time.sleep(0.02)


def bare_loop(engine: sa.Engine, n: int) -> float:
    bulk_insert(engine, n, "bare")
    started = time.perf_counter()
    while (job := ledger.claim(engine, "bench", sweep_first=False)) is not None:
        ledger.complete(engine, job, {"worker": "bench"})
    rate = n / (time.perf_counter() - started)
    with engine.begin() as conn:
        conn.execute(ledger.jobs.delete())
    return rate


def through_workers(engine: sa.Engine, url: str, work: Path, n: int, processes: int) -> float:
    env = {
        "DATABASE_URL": url,
        "CDS_CLIENTS_FILE": str(CLIENTS),
        "INSTANCE_PATH": str(work),
        "AUDIT_LOG": str(work / "audit.jsonl"),
        "JOB_POLL_S": "0.01",
        "LOG_LEVEL": "WARNING",
    }
    workers = [start_worker(env, "--threads", "1") for _ in range(processes)]
    try:
        bulk_insert(engine, processes, "warm")  # one job each, to know they are up
        wait_done(engine, processes, timeout=60)
        with engine.begin() as conn:
            conn.execute(ledger.jobs.delete())
        bulk_insert(engine, n, "job")
        started = time.perf_counter()
        wait_done(engine, n)
        rate = n / (time.perf_counter() - started)
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(timeout=30)
    with engine.begin() as conn:
        conn.execute(ledger.jobs.delete())
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--enqueues", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", default="1,4")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    print("| database | insert p50 ms | enqueue p50 ms | enqueue p99 ms | enqueue/insert |")
    print("| --- | --- | --- | --- | --- |")
    throughput_rows = []
    for name, url in _each_database(work):
        engine = make_engine(url)
        e = enqueue_latency(engine, args.enqueues)
        print(
            f"| {name} | {e['insert_p50']:.2f} | {e['enqueue_p50']:.2f} | {e['enqueue_p99']:.2f} | {e['ratio']:.2f} |"
        )
        bare = bare_loop(engine, args.jobs)
        throughput_rows.append((name, "bare ledger loop (baseline)", bare, 1.0))
        for processes in counts:
            rate = through_workers(engine, url, work, args.jobs, processes)
            throughput_rows.append((name, f"{processes} worker process(es)", rate, rate / bare))
        engine.dispose()
    print()
    print("| database | runner | jobs/s | ratio to bare loop |")
    print("| --- | --- | --- | --- |")
    for name, runner, rate, ratio in throughput_rows:
        print(f"| {name} | {runner} | {rate:.0f} | {ratio:.2f} |")
    return 0


def _each_database(work: Path):
    """SQLite, then a throwaway PostgreSQL database when the server is there (dropped afterwards)."""
    yield "sqlite", sqlite_database(work)
    reason = postgres_unavailable()
    if reason:
        print(f"PostgreSQL skipped: {reason}")
        return
    with postgres_database() as url:
        yield "postgresql", url


if __name__ == "__main__":
    raise SystemExit(main())
