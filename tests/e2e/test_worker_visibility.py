"""Workers you can see, with real processes on PostgreSQL: gunicorn under app/gunicorn_conf.py and
``jobs worker`` processes sharing an INSTANCE_PATH. A worker's job counts reach the gateway's /metrics; a
SIGKILLed worker turns /readyz?require=workers to 503 within the staleness limit while jobs are queued (plain
/readyz says "degraded" and stays 200); a SIGTERMed one leaves at once; each state change is a JSON log line
naming the worker's heartbeat row."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import pytest
import requests
import sqlalchemy as sa

from app.db import make_engine
from app.jobs import ledger
from app.jobs.canary import CANARY
from app.jobs.presence import LIVE_BEATS, job_workers
from tests.conftest import require
from tests.support.assertions import wait_for
from tests.support.databases import postgres_database, postgres_unavailable
from tests.support.processes import free_port, gunicorn, migrate, start_worker

HEARTBEAT = 0.5
STALE_AFTER = HEARTBEAT * LIVE_BEATS
SUCCEEDED_ONCE = 'gateway_job_runs_total{kind="jobs.canary",outcome="succeeded"} 1.0'


@pytest.fixture
def database_url():
    require(postgres_unavailable())
    with postgres_database() as url:
        yield url


@pytest.fixture
def env(database_url, clients_file, tmp_path):
    return {
        "DATABASE_URL": database_url,
        "CDS_CLIENTS_FILE": str(clients_file),
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "AUDIT_LOG": str(tmp_path / "audit.jsonl"),
        "JOB_POLL_S": "0.05",
        "WEB_CONCURRENCY": "2",
    }


def readyz(base: str) -> tuple[int, dict]:
    response = requests.get(f"{base}/readyz?require=workers", timeout=5)  # as a monitor asks
    return response.status_code, response.json()


def worker(env, tmp_path, name: str) -> subprocess.Popen:
    args = ("--threads", "1", "--heartbeat", str(HEARTBEAT), "--nice", "0")
    return start_worker(env, *args, log_path=tmp_path / f"{name}.log")


def job_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith('{"ts"')]


def test_a_killed_worker_shows_in_readyz_and_a_workers_counts_reach_the_gateways_metrics(env, tmp_path):
    engine = make_engine(env["DATABASE_URL"])
    metrics_dir = tmp_path / "instance" / "metrics"
    with gunicorn(env, free_port()) as base:
        first = worker(env, tmp_path, "first")
        try:
            wait_for(lambda: readyz(base)[1]["workers"]["live"] == 1, "the worker never showed as live", timeout=60)
            ledger.enqueue(engine, "canary-1", CANARY, {})
            wait_for(lambda: ledger.get(engine, "canary-1").state == ledger.SUCCEEDED, "canary-1 not run", 30)
            metrics = requests.get(f"{base}/metrics", timeout=5).text
            assert SUCCEEDED_ONCE in metrics  # counted in the worker process, summed by a gunicorn worker
            assert "gateway_workers_live 1.0" in metrics

            first.kill()
            first.wait(10)
            killed_at = time.monotonic()
            ledger.enqueue(engine, "canary-2", CANARY, {})
            wait_for(lambda: readyz(base)[0] == 503, "readyz stayed ready", timeout=STALE_AFTER + 10)
            assert time.monotonic() - killed_at < STALE_AFTER + 5
            status, body = readyz(base)
            assert body["checks"] == {"database": "ok", "workers": "none live; 1 jobs queued"}
            plain = requests.get(f"{base}/readyz", timeout=5)  # as a load balancer asks: keep serving hooks
            assert (plain.status_code, plain.json()["status"]) == (200, "degraded")
            assert "gateway_workers_live 0.0" in requests.get(f"{base}/metrics", timeout=5).text
            assert any(p.name.endswith(f"_{first.pid}.db") for p in metrics_dir.rglob("*.db"))
        finally:
            if first.poll() is None:
                first.kill()

        second = worker(env, tmp_path, "second")
        try:
            wait_for(lambda: ledger.get(engine, "canary-2").state == ledger.SUCCEEDED, "canary-2 not run", 60)
            wait_for(lambda: readyz(base)[0] == 200, "a live worker did not make it ready", timeout=10)
            # The killed worker's files went when the second started: its count is not summed in forever.
            assert not any(p.name.endswith(f"_{first.pid}.db") for p in metrics_dir.rglob("*.db"))
            assert SUCCEEDED_ONCE in requests.get(f"{base}/metrics", timeout=5).text

            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0
            status, body = readyz(base)  # at once: a clean stop does not wait out the staleness limit
            assert (status, body["checks"]["workers"], body["workers"]["live"]) == (200, "none live; no job due", 0)
            ledger.enqueue(engine, "canary-3", CANARY, {})
            assert readyz(base)[0] == 503
        finally:
            if second.poll() is None:
                second.kill()

    with engine.connect() as conn:
        rows = {row.pid: row for row in conn.execute(sa.select(job_workers))}
    assert rows[first.pid].stopped_at is None and rows[second.pid].stopped_at is not None
    assert rows[second.pid].jobs_run == 1
    claimed = [line for line in job_lines(tmp_path / "first.log") if line["event"] == "job.claimed"]
    assert [(line["job"], line["worker"]) for line in claimed] == [("canary-1", f"{rows[first.pid].id}/0")]
    engine.dispose()


def test_a_worker_apart_from_the_web_server_serves_its_own_metrics(clients_file, tmp_path):
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}",
        "CDS_CLIENTS_FILE": str(clients_file),
        "INSTANCE_PATH": str(tmp_path / "worker-instance"),
        "AUDIT_LOG": str(tmp_path / "audit.jsonl"),
        "JOB_POLL_S": "0.05",
        "HOST": "127.0.0.1",
    }
    migrate(env)
    engine = make_engine(env["DATABASE_URL"])
    port = free_port()
    process = start_worker(env, "--metrics-port", str(port), log_path=tmp_path / "worker.log")
    try:
        ledger.enqueue(engine, "canary-apart", CANARY, {})
        wait_for(lambda: ledger.get(engine, "canary-apart").state == ledger.SUCCEEDED, "not run", 60)

        def scraped() -> str:
            try:
                return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except requests.RequestException:
                return ""

        wait_for(lambda: SUCCEEDED_ONCE in scraped(), "the worker's metrics port does not show its run", 10)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    engine.dispose()


def test_a_metrics_port_in_use_is_a_clear_error(clients_file, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            "DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}",
            "CDS_CLIENTS_FILE": str(clients_file),
            "INSTANCE_PATH": str(tmp_path / "instance"),
            "AUDIT_LOG": str(tmp_path / "audit.jsonl"),
        }
        process = start_worker(env, "--burst", "--metrics-port", str(port), log_path=tmp_path / "worker.log")
        assert process.wait(60) != 0
    assert f"cannot serve metrics on 127.0.0.1:{port}" in (tmp_path / "worker.log").read_text()
