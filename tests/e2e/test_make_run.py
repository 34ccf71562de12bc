"""End to end: the service started exactly as `make run` starts it, called over HTTP like the CDS Hooks Sandbox.

The Sandbox preflights every call (CORS), sends a JWT on discovery, service call and feedback, and posts
feedback with the card's uuid when the clinician accepts a suggestion.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.support.processes import free_port, healthy
from tests.support.tokens import clients_document

ROOT = Path(__file__).resolve().parents[2]
SANDBOX_ORIGIN = "https://sandbox.cds-hooks.org"


@pytest.fixture(scope="module")
def service(tmp_path_factory, signing_key):
    work = tmp_path_factory.mktemp("make-run")
    port = free_port()
    clients = work / "clients.json"
    clients.write_text(json.dumps(clients_document(signing_key, ["http://127.0.0.1:*"])))
    env = {
        **os.environ,
        "PORT": str(port),
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "INSTANCE_PATH": str(work),
        "CDS_CLIENTS_FILE": str(clients),
        "AUDIT_LOG": str(work / "audit.jsonl"),
    }
    env.pop("DATABASE_URL", None)
    log = (work / "make-run.log").open("w")
    proc = subprocess.Popen(
        ["make", "run"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not healthy(base):
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"make run did not become healthy:\n{(work / 'make-run.log').read_text()[-3000:]}")
        time.sleep(0.3)
    yield base, work, env
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()


def preflight(base: str, path: str) -> requests.Response:
    return requests.options(
        base + path,
        headers={
            "Origin": SANDBOX_ORIGIN,
            "Access-Control-Request-Method": "POST" if path != "/cds-services" else "GET",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
        timeout=5,
    )


def sandbox_headers(signing_key, base: str, path: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {signing_key.token(base + path)}",
        "Content-Type": "application/json",
        "Origin": SANDBOX_ORIGIN,
    }


def test_sandbox_flow_discovery_call_and_feedback(service, signing_key, hook_body):
    base, work, _ = service
    service_path = "/cds-services/cardiovascular-risk"

    assert preflight(base, "/cds-services").headers["Access-Control-Allow-Origin"] == "*"
    discovery = requests.get(
        base + "/cds-services", headers=sandbox_headers(signing_key, base, "/cds-services"), timeout=5
    )
    assert discovery.status_code == 200
    assert "cardiovascular-risk" in {s["id"] for s in discovery.json()["services"]}

    assert "Authorization" in preflight(base, service_path).headers["Access-Control-Allow-Headers"]
    answer = requests.post(
        base + service_path,
        data=json.dumps(hook_body),
        headers=sandbox_headers(signing_key, base, service_path),
        timeout=5,
    )
    assert answer.status_code == 200
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    (card,) = answer.json()["cards"]
    (suggestion,) = card["suggestions"]
    assert card["selectionBehavior"] == "at-most-one"

    feedback_path = service_path + "/feedback"
    assert preflight(base, feedback_path).status_code == 200
    feedback = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": suggestion["uuid"]}],
                "outcomeTimestamp": "2026-11-28T12:00:00Z",
            }
        ]
    }
    stored = requests.post(
        base + feedback_path,
        data=json.dumps(feedback),
        headers=sandbox_headers(signing_key, base, feedback_path),
        timeout=5,
    )
    assert stored.status_code == 200
    with sqlite3.connect(work / "gateway.db") as db:
        rows = db.execute("SELECT card_uuid, outcome FROM feedback").fetchall()
    assert rows == [(card["uuid"], "accepted")]

    events = [json.loads(line)["event"] for line in (work / "audit.jsonl").read_text().splitlines()]
    assert events == ["discovery", "hook", "feedback"]


def test_errors_reach_the_browser_with_cors_headers(service):
    base, _, _ = service
    response = requests.post(
        base + "/cds-services/cardiovascular-risk",
        data="{}",
        timeout=5,
        headers={"Origin": SANDBOX_ORIGIN, "Content-Type": "application/json"},
    )
    assert response.status_code == 401
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.json()["resourceType"] == "OperationOutcome"


def test_a_job_worker_runs_alongside_and_our_keys_are_published(service):
    base, work, env = service
    canary = subprocess.run(
        [str(ROOT / ".venv/bin/gateway"), "jobs", "canary", "--timeout", "20"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert canary.returncode == 0, canary.stderr
    assert canary.stdout.startswith("canary run by ")
    keys = requests.get(base + "/.well-known/jwks.json", timeout=5).json()["keys"]
    assert sorted(k["alg"] for k in keys) == ["ES384", "RS384"]
    assert (work / "keys").stat().st_mode & 0o777 == 0o700
