"""How long the guarded paths take, each against a baseline measured in the same run (the tests assert behaviour).

- breaker: 16 threads x N allow()+record(), against the same threads taking a bare lock N times;
- permits: 16 concurrent 100 ms "calls" under one breaker, against one 100 ms call alone;
- hook fallback: a hook call per model fault (budget 300 ms) and with the breaker open, through the test client,
  against the same hook answered by a healthy model;
- prefetch: two 300 ms fetches resolved together, against one; and a 2 s fetch cut off at a 300 ms deadline.

    .venv/bin/python -m bench.fallback_timing [--calls 1000] [--hooks 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.hook_throughput import FIXTURE

BUDGET_MS = 300
FAULTS = [("slow", {"delay_ms": 2 * BUDGET_MS}), ("hang", {}), ("refuse", {}), ("error500", {}), ("malformed", {})]


def in_threads(work: Callable[[], None], threads: int = 16) -> float:
    """Seconds for ``threads`` threads to each run ``work`` once, started together."""
    start = threading.Barrier(threads + 1)

    def run() -> None:
        start.wait()
        work()

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for thread in pool:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in pool:
        thread.join()
    return time.perf_counter() - began


def breaker_rows(calls: int) -> None:
    from app.ai.breaker import CircuitBreaker

    lock = threading.Lock()

    def bare() -> None:
        for _ in range(calls):
            with lock:
                pass

    breaker = CircuitBreaker("bench", window_size=20, minimum_calls=10)

    def guarded() -> None:
        for i in range(calls):
            permit = breaker.allow()
            breaker.record(permit, "failure" if i % 10 == 0 else "success", 0.01)

    row("breaker: 16 x allow+record", in_threads(guarded), "16 x bare lock", in_threads(bare))

    slow = CircuitBreaker("bench-permits")

    def one_call() -> None:
        permit = slow.allow()
        time.sleep(0.1)  # the model call under a permit
        slow.record(permit, "success", 0.1)

    began = time.perf_counter()
    one_call()
    alone = time.perf_counter() - began
    row("permits: 16 concurrent 100 ms", in_threads(one_call), "one 100 ms call", alone)


def hook_rows(hooks: int) -> None:
    from app import create_app
    from app.db import upgrade
    from tests.support.fault_server import FaultModelServer
    from tests.support.tokens import SigningKey, clients_document

    body = FIXTURE.read_text()
    work = Path(tempfile.mkdtemp(prefix="bench-fallback-"))
    key = SigningKey.generate()
    (work / "clients.json").write_text(json.dumps(clients_document(key, [])))
    base, service = "http://gateway.bench", "/cds-services/cardiovascular-risk"

    def make(model_url: str, **extra):
        config = {
            "INSTANCE_PATH": str(work / "instance"),
            "DATABASE_URL": f"sqlite:///{work / 'gateway.db'}",
            "AUDIT_LOG": str(work / "audit.jsonl"),
            "CDS_CLIENTS_FILE": str(work / "clients.json"),
            "PUBLIC_BASE_URL": base,
            "LOG_LEVEL": "ERROR",
            "AI_BACKEND": "kserve",
            "AI_URL": model_url,
            "HOOK_BUDGET_MS": BUDGET_MS,
            "LATE_RESULT_TTL_S": 0,
            **extra,
        }
        upgrade(config["DATABASE_URL"])
        return create_app(config)

    def median_ms(app) -> float:
        client, durations = app.test_client(), []
        for _ in range(hooks):
            headers = {"Authorization": f"Bearer {key.token(base + service)}", "Content-Type": "application/json"}
            began = time.perf_counter()
            client.post(service, data=body, headers=headers)
            durations.append(time.perf_counter() - began)
        return statistics.median(durations)

    with FaultModelServer() as model:
        never_opens = {"BREAKER_WINDOW": 10_000, "BREAKER_MIN_CALLS": 10_000}
        healthy = median_ms(make(model.url, **never_opens))
        for mode, options in FAULTS:
            model.set_mode(mode, **options)
            row(
                f"hook, model {mode} (budget {BUDGET_MS} ms)",
                median_ms(make(model.url, **never_opens)),
                "healthy",
                healthy,
            )
        model.set_mode("error500")
        app = make(model.url, BREAKER_WINDOW=4, BREAKER_MIN_CALLS=4, BREAKER_OPEN_SECONDS=3600)
        median_ms(app)  # opens it
        row("hook, breaker open", median_ms(app), "healthy", healthy)


def prefetch_rows() -> None:
    from pytest_httpserver import HTTPServer

    from app.cds.prefetch import PrefetchResolver, fhir_access
    from app.cds.request import parse_hook_request
    from app.cds.service import PrefetchKey
    from app.fhir.client import pooled_session

    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    release = threading.Event()

    def answer(path: str, delay: float) -> None:
        def handler(_request):
            from werkzeug import Response

            release.wait(delay)
            return Response(json.dumps({"resourceType": "Patient", "id": "123"}), content_type="application/fhir+json")

        server.expect_request(f"/fhir/{path}").respond_with_handler(handler)

    answer("Patient/123", 0.3)
    answer("Patient/456", 0.3)
    answer("Patient/789", 2.0)
    request = parse_hook_request(
        json.dumps(
            {
                "hook": "patient-view",
                "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
                "context": {"userId": "Practitioner/a", "patientId": "123"},
                "fhirServer": server.url_for("/fhir"),
                "fhirAuthorization": {
                    "access_token": "t",
                    "token_type": "Bearer",
                    "expires_in": 300,
                    "scope": "x",
                    "subject": "bench",
                },
            }
        ).encode(),
        "patient-view",
    )
    session = pooled_session()
    access = fhir_access(request, lambda _url: True, False, session, 5.0)
    resolver = PrefetchResolver(ThreadPoolExecutor(max_workers=8))

    def resolve(paths: dict[str, str], budget: float) -> float:
        keys = {k: PrefetchKey(v, required=False) for k, v in paths.items()}
        began = time.perf_counter()
        resolver.resolve(keys, request, access, time.monotonic() + budget, lambda _record: None)
        return time.perf_counter() - began

    one = resolve({"a": "Patient/123"}, 3.0)
    row("prefetch: two 300 ms fetches", resolve({"a": "Patient/123", "b": "Patient/456"}, 3.0), "one", one)
    row("prefetch: 2 s fetch, 300 ms deadline", resolve({"a": "Patient/789"}, 0.3), "the deadline", 0.3)
    release.set()
    server.stop()
    session.close()


def row(label: str, seconds: float, baseline_label: str, baseline: float) -> None:
    ratio = seconds / baseline if baseline else float("inf")
    print(
        f"{label:44} {seconds * 1000:9.1f} ms   {baseline_label:16} {baseline * 1000:9.1f} ms   x{ratio:6.2f}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="allow()+record() per thread")
    parser.add_argument("--hooks", type=int, default=10, help="hook calls per row (median)")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the local FHIR server's request lines
    breaker_rows(args.calls)
    prefetch_rows()
    hook_rows(args.hooks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
