"""gunicorn workers share one breaker and one JWT replay cache, through Redis or, without it, through the host
state file: once open, no worker calls the model, after the open period only the configured number of trial
calls reach it, and a client JWT is accepted once, whichever workers the hooks land on."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import require
from tests.support.fault_server import FaultModelServer
from tests.support.processes import free_port, gunicorn
from tests.support.tokens import clients_document

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "/cds-services/cardiovascular-risk"
REDIS = ("127.0.0.1", 6379)
HALF_OPEN_CALLS = 2
OPEN_SECONDS = 1.0


def redis_unavailable() -> str | None:
    try:
        socket.create_connection(REDIS, timeout=0.5).close()
    except OSError:
        return "no Redis on 127.0.0.1:6379"
    return None


@pytest.fixture
def model_server():
    with FaultModelServer() as server:
        yield server


@pytest.fixture(params=["redis", "no-redis"])
def gateway(request, tmp_path, signing_key, model_server):
    if request.param == "redis":
        require(redis_unavailable())
    port = free_port()
    (tmp_path / "clients.json").write_text(json.dumps(clients_document(signing_key, [])))
    base = f"http://127.0.0.1:{port}"
    env = {
        "WEB_CONCURRENCY": "2",
        "PUBLIC_BASE_URL": base,
        "INSTANCE_PATH": str(tmp_path),
        "CDS_CLIENTS_FILE": str(tmp_path / "clients.json"),
        "AUDIT_LOG": str(tmp_path / "audit.jsonl"),
        "REDIS_URL": "redis://127.0.0.1:6379/0" if request.param == "redis" else "",
        "AI_BACKEND": "kserve",
        "AI_URL": model_server.url,  # a fresh port, so a fresh shared breaker
        "HOOK_BUDGET_MS": "1500",
        "LATE_RESULT_TTL_S": "0",
        "BREAKER_WINDOW": "4",
        "BREAKER_MIN_CALLS": "4",
        "BREAKER_OPEN_SECONDS": str(OPEN_SECONDS),
        "BREAKER_HALF_OPEN_CALLS": str(HALF_OPEN_CALLS),
        "BREAKER_SLOW_CALL_MS": "1200",
    }
    with gunicorn(env, port) as base:
        yield base


def test_open_breaker_and_half_open_trials_are_shared_by_all_workers(gateway, model_server, signing_key, hook_body):
    body = json.dumps(hook_body)

    def hook(_=None) -> str:
        token = signing_key.token(gateway + SERVICE)
        response = requests.post(
            gateway + SERVICE,
            data=body,
            timeout=10,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        assert response.status_code == 200
        return response.json()["cards"][0]["source"]["label"]

    model_server.set_mode("error500")
    for _ in range(12):
        hook()
    time.sleep(0.1)  # other workers notice the shared state within 50 ms
    calls = model_server.calls
    labels = [hook() for _ in range(10)]
    assert model_server.calls == calls, "a worker called the model while the shared breaker was open"
    assert all("AI result unavailable" in label for label in labels)

    model_server.set_mode("slow", delay_ms=400)  # healthy answers, slow enough that trials overlap
    time.sleep(OPEN_SECONDS + 0.3)
    calls = model_server.calls
    with ThreadPoolExecutor(10) as pool:
        labels = list(pool.map(hook, range(10)))
    assert model_server.calls - calls == HALF_OPEN_CALLS, labels
    assert sum("ascvd-pce" in label for label in labels) == HALF_OPEN_CALLS


def test_a_client_jwt_is_accepted_once_whichever_worker_gets_it(gateway, signing_key, hook_body, tmp_path):
    body = json.dumps(hook_body)
    token = signing_key.token(gateway + SERVICE)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    audit = tmp_path / "audit.jsonl"

    def hook(_=None) -> int:
        # A new connection per call, so that calls land on either worker.
        return requests.post(gateway + SERVICE, data=body, timeout=10, headers=headers).status_code

    def hook_records() -> list[dict]:
        return [r for r in map(json.loads, audit.read_text().splitlines()) if r["event"] == "hook"]

    assert hook() == 200
    accepted_by = hook_records()[-1]["pid"]
    replays: list[int] = []
    with ThreadPoolExecutor(8) as pool:
        for _ in range(40):  # until a replay has reached the other worker
            replays += pool.map(hook, range(8))
            if any(r["pid"] != accepted_by for r in hook_records()):
                break
    assert set(replays) == {401}, replays
    refused_elsewhere = [r for r in hook_records() if r["pid"] != accepted_by]
    assert refused_elsewhere, "no replay reached the other worker"
    assert all(r["status"] == 401 for r in refused_elsewhere)


MIN_CALLS = 8


@pytest.fixture(params=["host-file", "scratch-redis"])
def window_gateway(request, tmp_path, signing_key, model_server):
    """Two workers whose breaker opens after MIN_CALLS failures in a window of as many calls."""
    redis_url = ""
    if request.param == "scratch-redis":
        redis_url = request.getfixturevalue("own_redis").url
        remember_for_a_while(redis_url)
    port = free_port()
    (tmp_path / "clients.json").write_text(json.dumps(clients_document(signing_key, [])))
    env = {
        "WEB_CONCURRENCY": "2",
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "INSTANCE_PATH": str(tmp_path),
        "CDS_CLIENTS_FILE": str(tmp_path / "clients.json"),
        "AUDIT_LOG": str(tmp_path / "audit.jsonl"),
        "REDIS_URL": redis_url,
        "AI_BACKEND": "kserve",
        "AI_URL": model_server.url,
        "HOOK_BUDGET_MS": "1500",
        "LATE_RESULT_TTL_S": "0",
        "BREAKER_WINDOW": str(MIN_CALLS),
        "BREAKER_MIN_CALLS": str(MIN_CALLS),
        "BREAKER_OPEN_SECONDS": "60",
    }
    with gunicorn(env, port) as base:
        yield base


def remember_for_a_while(redis_url: str) -> None:
    """Make a fresh Redis's jti memory start a minute ago, so that tokens signed now are not refused as
    issued before it (the replay cache's own tests cover that refusal)."""
    import redis

    from app.cds.replay import RedisReplayCache

    server = redis.Redis.from_url(redis_url)
    run_id = server.info("server")["run_id"]
    server.hset(RedisReplayCache.SINCE_KEY, mapping={"since": f"{time.time() - 60:.6f}", "run_id": run_id})


def sessions_by_worker(base: str, audit: Path, workers: int) -> list[requests.Session]:
    """One keep-alive session held by each worker (an unauthenticated hook tells which worker answered)."""
    body = json.dumps({"hook": "patient-view"})
    headers = {"Authorization": "Bearer x.y.z", "Content-Type": "application/json"}
    held: dict[int, requests.Session] = {}
    for _ in range(20):
        sessions = [requests.Session() for _ in range(8)]
        with ThreadPoolExecutor(len(sessions)) as pool:  # concurrent connections spread over the workers
            list(pool.map(lambda s: s.post(base + SERVICE, data=body, headers=headers, timeout=10), sessions))
        for session in sessions:
            session.post(base + SERVICE, data=body, headers=headers, timeout=10)
            pid = json.loads(audit.read_text().splitlines()[-1])["pid"]
            held.setdefault(pid, session)
        if len(held) == workers:
            return list(held.values())
    raise AssertionError(f"keep-alive connections reached {len(held)} of {workers} workers")


def test_the_failure_window_is_shared_so_the_minimum_holds_whatever_the_worker_count(
    window_gateway, model_server, signing_key, hook_body, tmp_path
):
    sessions = sessions_by_worker(window_gateway, tmp_path / "audit.jsonl", workers=2)
    body = json.dumps(hook_body)
    model_server.set_mode("error500")
    before = model_server.calls
    for _ in range(2 * MIN_CALLS):  # the workers in turn, until a round reaches the model no more
        round_began = model_server.calls
        for session in sessions:
            token = signing_key.token(window_gateway + SERVICE)
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            assert session.post(window_gateway + SERVICE, data=body, headers=headers, timeout=10).status_code == 200
        if model_server.calls == round_began:
            break
    failing = model_server.calls - before
    assert MIN_CALLS <= failing <= MIN_CALLS + 1, f"{failing} failing model calls before every worker stopped"
