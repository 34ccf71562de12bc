"""A ``gateway jobs worker`` process is safe by default: its --metrics-port asks for METRICS_TOKEN as the gateway's
/metrics does, and a burst of stop signals (``timeout -s TERM``, a supervisor and make all sending theirs) stops it
cleanly instead of deadlocking it inside its own signal handler."""

from __future__ import annotations

import os
import signal

import pytest
import requests

from app.db import make_engine
from app.jobs import ledger
from app.jobs.canary import CANARY
from tests.support.assertions import wait_for
from tests.support.processes import free_port, migrate, start_worker

TOKEN = "worker-scrape-secret-42"


@pytest.fixture
def worker_env(clients_file, tmp_path):
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}",
        "CDS_CLIENTS_FILE": str(clients_file),
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "AUDIT_LOG": str(tmp_path / "audit.jsonl"),
        "JOB_POLL_S": "0.05",
        "HOST": "127.0.0.1",
        "METRICS_TOKEN": TOKEN,
    }
    migrate(env)
    return env


@pytest.fixture
def running_worker(worker_env, tmp_path):
    """A worker with --metrics-port that has run a canary job (its loops and signal handling are in place)."""
    port = free_port()
    process = start_worker(worker_env, "--threads", "4", "--metrics-port", str(port), log_path=tmp_path / "w.log")
    engine = make_engine(worker_env["DATABASE_URL"])
    try:
        ledger.enqueue(engine, "canary-up", CANARY, {})
        wait_for(lambda: ledger.get(engine, "canary-up").state == ledger.SUCCEEDED, "the worker ran no job", 60)
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        engine.dispose()


def test_the_worker_metrics_port_asks_for_the_metrics_token(running_worker):
    _process, port = running_worker
    url = f"http://127.0.0.1:{port}/metrics"
    bare = requests.get(url, timeout=5)
    assert bare.status_code == 401 and bare.headers["WWW-Authenticate"] == "Bearer"
    assert "gateway_job_runs_total" not in bare.text
    assert requests.get(url, headers={"Authorization": f"Bearer {TOKEN[:-1]}"}, timeout=5).status_code == 401
    right = requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert right.status_code == 200 and "gateway_job_runs_total" in right.text


def test_a_burst_of_stop_signals_stops_the_worker_cleanly(running_worker):
    process, _port = running_worker
    for _ in range(2000):
        os.kill(process.pid, signal.SIGTERM)
    assert process.wait(30) == 0
