"""Many worker processes on PostgreSQL: every job runs, and runs once."""

from __future__ import annotations

import signal
import time
from collections import Counter
from datetime import UTC, datetime

import pytest

from app.db import make_engine
from app.jobs import ledger
from app.jobs.canary import CANARY
from tests.conftest import require
from tests.support.databases import postgres_database, postgres_unavailable
from tests.support.processes import start_worker

JOBS = 1000
WORKERS = 4


@pytest.fixture
def database_url():
    require(postgres_unavailable())
    with postgres_database() as url:
        yield url


def test_four_worker_processes_run_a_thousand_jobs_each_once(database_url, clients_file, tmp_path):
    engine = make_engine(database_url)
    now = datetime.now(UTC)
    for i in range(JOBS):
        ledger.enqueue(engine, f"canary-{i:04d}", CANARY, {}, now=now)
    env = {
        "DATABASE_URL": database_url,
        "CDS_CLIENTS_FILE": str(clients_file),
        "INSTANCE_PATH": str(tmp_path),
        "AUDIT_LOG": str(tmp_path / "audit.jsonl"),
        "JOB_POLL_S": "0.05",
    }
    workers = [start_worker(env, "--threads", "1", log_path=tmp_path / f"worker-{n}.log") for n in range(WORKERS)]
    try:
        deadline = time.monotonic() + 90
        while ledger.counts(engine)[ledger.SUCCEEDED] < JOBS:
            died = [n for n, w in enumerate(workers) if w.poll() is not None]
            assert not died, f"worker {died[0]} died: {(tmp_path / f'worker-{died[0]}.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"not done in 90 s: {ledger.counts(engine)}"
            time.sleep(0.2)
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        exit_codes = [w.wait(timeout=30) for w in workers]
    assert exit_codes == [0] * WORKERS  # SIGTERM is a clean shutdown
    done = ledger.find(engine, ledger.SUCCEEDED, kind=CANARY, limit=JOBS + 1)
    assert len(done) == JOBS
    assert Counter(job.attempts for job in done) == {1: JOBS}
    by_worker = Counter(job.result["worker"] for job in done)
    assert len(by_worker) == WORKERS, f"work was not shared: {by_worker}"
