"""`make run` stops as a developer expects: both processes gone within 5 s of Ctrl-C or SIGTERM, and every
request already in flight answered in full (no fallback card caused by the shutdown)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.support.fault_server import FaultModelServer
from tests.support.processes import ROOT, alive, descendants, free_port, healthy
from tests.support.tokens import clients_document

MODEL_DELAY_MS = 400  # every hook call is still in flight this long after it started
STOP_WITHIN_S = 5.0


@pytest.fixture
def make_run(tmp_path, signing_key):
    """`make run` with a model that takes MODEL_DELAY_MS per call; yields (process, base URL, log path)."""
    started: list[subprocess.Popen] = []
    port = free_port()
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps(clients_document(signing_key, ["http://127.0.0.1:*"])))
    with FaultModelServer() as model:
        model.set_mode("slow", delay_ms=MODEL_DELAY_MS)
        env = {
            **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "GUNICORN_CMD_ARGS")},
            "PORT": str(port),
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
            "INSTANCE_PATH": str(tmp_path / "instance"),
            "CDS_CLIENTS_FILE": str(clients),
            "AUDIT_LOG": str(tmp_path / "audit.jsonl"),
            "AI_BACKEND": "kserve",
            "AI_URL": model.url,
            "HOOK_BUDGET_MS": "5000",
            "BREAKER_SLOW_CALL_MS": "5000",
        }
        log_path = tmp_path / "make-run.log"

        def start() -> tuple[subprocess.Popen, str]:
            with log_path.open("ab") as log:
                proc = subprocess.Popen(
                    ["make", "run"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            started.append(proc)
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while not healthy(base):
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.2)
            return proc, base

        try:
            yield start, log_path
        finally:
            for proc in started:
                for pid in descendants(proc.pid) | {proc.pid}:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait(timeout=10)


def call_until_refused(base: str, signing_key, hook_body, answers: list, stop: threading.Event) -> None:
    url = base + "/cds-services/cardiovascular-risk"
    while not stop.is_set():
        try:
            response = requests.post(
                url, json=hook_body, headers={"Authorization": f"Bearer {signing_key.token(url)}"}, timeout=30
            )
        except requests.ConnectionError:
            return  # the server has closed its socket: no more requests reach it
        answers.append(response)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to make", "Ctrl-C at the terminal"])
def test_make_run_stops_within_5_s_and_answers_what_was_in_flight(make_run, signing_key, hook_body, how):
    start, log_path = make_run
    proc, base = start()
    processes = descendants(proc.pid)
    assert len(processes) >= 4, processes  # the supervisor, gunicorn's master and workers, the job worker

    answers: list[requests.Response] = []
    stop = threading.Event()
    callers = [
        threading.Thread(target=call_until_refused, args=(base, signing_key, hook_body, answers, stop))
        for _ in range(4)
    ]
    for caller in callers:
        caller.start()
    time.sleep(MODEL_DELAY_MS / 1000 * 2.5)  # several rounds answered, four calls in flight
    in_flight_from = len(answers)
    signalled_at = time.monotonic()
    if how == "SIGTERM to make":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)  # the terminal signals its foreground process group
    proc.wait(timeout=30)
    took = time.monotonic() - signalled_at
    stop.set()
    for caller in callers:
        caller.join(timeout=30)

    assert took < STOP_WITHIN_S, f"make run took {took:.1f} s to stop"
    assert not [pid for pid in processes if alive(pid)], log_path.read_text()[-3000:]
    assert len(answers) > in_flight_from, "no request was in flight when the stop signal came"
    assert [r.status_code for r in answers] == [200] * len(answers)
    sources = [card["source"]["label"] for r in answers for card in r.json()["cards"]]
    assert sources and not [label for label in sources if "unavailable" in label]
    assert b"SIGKILL" not in log_path.read_bytes()


@pytest.mark.slow
def test_when_the_job_worker_dies_make_run_stops_the_web_server_and_says_so(make_run):
    start, log_path = make_run
    proc, base = start()
    workers = [pid for pid in descendants(proc.pid) if b"jobs\0worker" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    assert proc.wait(timeout=30) != 0
    assert not healthy(base)
    assert "the job worker exited (status -9); stopping the others" in log_path.read_text()
