"""Under gunicorn gthread, hooks waiting on a slow remote model run side by side, not one after another."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.support.fault_server import FaultModelServer
from tests.support.processes import free_port, gunicorn
from tests.support.tokens import clients_document

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "/cds-services/cardiovascular-risk"
MODEL_MS = 300


@pytest.fixture(scope="module")
def model_server():
    with FaultModelServer() as server:
        server.set_mode("slow", delay_ms=MODEL_MS)
        yield server


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, signing_key, model_server):
    work = tmp_path_factory.mktemp("gunicorn")
    port = free_port()
    clients = work / "clients.json"
    clients.write_text(json.dumps(clients_document(signing_key, [])))
    base = f"http://127.0.0.1:{port}"
    env = {
        "PUBLIC_BASE_URL": base,
        "INSTANCE_PATH": str(work),
        "CDS_CLIENTS_FILE": str(clients),
        "AUDIT_LOG": str(work / "audit.jsonl"),
        "AI_BACKEND": "kserve",
        "AI_URL": model_server.url,
        "HOOK_BUDGET_MS": "1000",
        # The model takes 300 ms; on a loaded two-core machine a call may exceed the default 400 ms slow-call
        # threshold, and an opened breaker would turn these tests' calls into fallbacks.
        "BREAKER_SLOW_CALL_MS": "5000",
    }
    with gunicorn(env, port) as base:
        yield base


def test_16_concurrent_hooks_on_a_300_ms_model_take_well_under_a_second(gateway, signing_key, hook_body):
    body = json.dumps(hook_body)

    def one(_):
        with requests.Session() as session:
            token = signing_key.token(gateway + SERVICE)
            response = session.post(
                gateway + SERVICE,
                data=body,
                timeout=10,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            return response.status_code, response.json()["cards"][0]["summary"]

    one(0)  # warm both workers' connection pools
    one(1)
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    elapsed = time.monotonic() - started
    assert all(status == 200 and summary.startswith("10-year ASCVD risk") for status, summary in results), results
    serialised = 16 * MODEL_MS / 1000
    assert elapsed < serialised / 2, f"16 hooks on a {MODEL_MS} ms model took {elapsed:.2f} s: calls were serialised"


def test_metrics_add_up_across_gunicorn_workers(gateway, signing_key, hook_body):
    for _ in range(6):
        token = signing_key.token(gateway + SERVICE)
        response = requests.post(
            gateway + SERVICE,
            data=json.dumps(hook_body),
            timeout=10,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        assert "unavailable" not in response.json()["cards"][0]["source"]["label"]  # the model answered
    text = requests.get(gateway + "/metrics", timeout=5).text
    counts = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('gateway_ai_calls_total{model="ascvd-pce",outcome="success"}')
    ]
    assert counts and counts[0] >= 6 + 18  # this test's calls plus the previous test's, from both workers
