"""A population run pauses while its model is down instead of filling its outputs with fallbacks, and goes on when
the model is back: the real FHIR test server's Bulk Data export, a real KServe v2 server (the embedded model behind a
fault-injecting front that refuses connections or answers 500), the ledger and the worker on a FakeClock, so the
breaker's open periods and the parts' snoozes are moved through instead of waited for."""

from __future__ import annotations

import json
import time
from pathlib import Path

import orjson
import pytest

from app.batch import runs, tasks
from app.batch.parts import SUBJECT_EXTENSION
from app.batch.routes import run_view
from app.clock import app_clock
from app.jobs import ledger
from app.jobs.worker import Worker
from app.smart.keys import KeyStore
from tests.support.clock import FakeClock
from tests.support.fault_server import FaultModelServer
from tests.support.population import patient_id, seed_population
from tests.support.tokens import TEST_ISSUER, clients_document

SERVICE = "cardiovascular-risk"
PATIENTS = 80
PREFIX = "pause"
OPEN_SECONDS = 30.0
PAUSED = "paused: model unavailable"


@pytest.fixture
def model_server():
    with FaultModelServer() as server:
        yield server


@pytest.fixture
def pause_app(make_app, tmp_path, signing_key, make_httpserver, model_server):
    """The gateway with AI_BACKEND=kserve in front of ``model_server``, on a FakeClock; several buckets."""
    scope = "system/Patient.rs system/Observation.rs system/Condition.rs system/MedicationRequest.rs"
    body = {"access_token": "pause-token", "token_type": "Bearer", "expires_in": 300, "scope": scope}
    make_httpserver.expect_request("/pause-token", method="POST").respond_with_json(body)
    document = clients_document(signing_key, ["http://127.0.0.1:*"])
    document["clients"][0]["smart_backend"] = {
        "token_url": make_httpserver.url_for("/pause-token"),
        "client_id": "gateway-batch",
        "scope": scope,
    }
    clients = tmp_path / "pause-clients.json"
    clients.write_text(json.dumps(document))
    app = make_app(
        CDS_CLIENTS_FILE=str(clients),
        BATCH_PART_BYTES=96 * 1024,  # a few buckets, each with patients to score: fewer than BREAKER_MIN_CALLS
        CLOCK=FakeClock(wall=time.time()),
        AI_BACKEND="kserve",
        AI_URL=model_server.url,
        BREAKER_OPEN_SECONDS=OPEN_SECONDS,
    )
    KeyStore(Path(app.config["KEYS_DIR"])).generate()
    yield app
    make_httpserver.clear()


def work(app, run_id: str, until, rounds: int = 100, step: float = 2.0) -> runs.Run:
    """Run due jobs, moving the worker's clock on by ``step`` after each round, until ``until(run)`` (bounded)."""
    clock, worker, engine = app_clock(app), Worker(app), app.extensions["db"]
    clock.advance(max(0.0, time.time() - clock.now()))
    for _ in range(rounds):
        worker.run_until_idle()
        run = runs.get(engine, run_id)
        if until(run):
            return run
        assert not run.ended, f"run {run_id} ended {run.state}: {run.error}"
        clock.advance(step)
    raise AssertionError(f"run {run_id}: condition not met after {rounds} rounds: {runs.get(engine, run_id)}")


def outcomes(directory: Path) -> dict[str, object]:
    """Each patient's outcome: the RiskAssessment's probability, or the not-scored reason's code."""
    found: dict[str, object] = {}
    for line in (directory / "RiskAssessment.ndjson").read_bytes().splitlines():
        assessment = orjson.loads(line)
        prediction = assessment["prediction"][0]
        found[assessment["subject"]["reference"]] = (prediction["probabilityDecimal"], prediction["qualitativeRisk"])
    for line in (directory / "OperationOutcome.ndjson").read_bytes().splitlines():
        issue = orjson.loads(line)["issue"][0]
        subject = next(e["valueReference"]["reference"] for e in issue["extension"] if e["url"] == SUBJECT_EXTENSION)
        assert subject not in found, f"{subject} twice in the outputs"
        found[subject] = issue["details"]["coding"][0]["code"]
    return found


def start(app, fhir_server, group: str) -> runs.Run:
    return tasks.start(app, service_id=SERVICE, client_iss=TEST_ISSUER, fhir_server=fhir_server.base_url, group=group)


@pytest.mark.parametrize("outage", ["refuse", "error500"])  # the server stopped; the server up, answering errors
def test_a_run_pauses_while_the_model_is_down_and_scores_everyone_when_it_is_back(
    pause_app, bulk, model_server, outage
):
    seed_population(bulk, PATIENTS, seed=23, group_id="pause", prefix=PREFIX)
    engine, clock = pause_app.extensions["db"], app_clock(pause_app)
    model_server.set_mode(outage)

    run = start(pause_app, bulk, "pause")
    paused = work(pause_app, run.id, lambda r: (r.note or "").startswith(PAUSED))
    assert paused.state == runs.SCORING and paused.note == f"{PAUSED} (unavailable)"
    directory = tasks.run_dir(pause_app, run.id)
    buckets = paused.plan["buckets"]
    assert 3 <= buckets < pause_app.config["BREAKER_MIN_CALLS"]
    # Down for a while: the breaker opens, and from then on a part that comes up is refused without calling.
    opened = work(pause_app, run.id, lambda r: r.note == f"{PAUSED} (circuit-open)", step=OPEN_SECONDS + 1)
    calls = model_server.calls
    for _ in range(4):  # four more open periods: each time the parts come up, find the model down and wait again
        clock.advance(OPEN_SECONDS + 1)
        Worker(pause_app).run_until_idle()
    assert model_server.calls - calls <= 4  # at most one half-open trial call per open period
    still = runs.get(engine, run.id)
    assert (still.state, still.note, still.error) == (runs.SCORING, opened.note, None)
    assert run_view(pause_app, still)["note"] == f"{PAUSED} (circuit-open)"  # what `gateway batch status` shows
    assert not (directory / "RiskAssessment.ndjson").exists()
    assert list(directory.glob("parts/b*")) == []  # no bucket was written with fallbacks, none half-written
    assert run_view(pause_app, still)["counts"]["scored"] == 0
    score_jobs = [ledger.get(engine, tasks.job_id(run.id, "score", b)) for b in range(buckets)]
    assert all(job.state == ledger.QUEUED and job.attempts == 0 for job in score_jobs)  # waiting spends no attempts

    model_server.set_mode("healthy")
    before = model_server.calls
    done = work(pause_app, run.id, lambda r: r.ended, step=OPEN_SECONDS + 1)
    assert (done.state, done.note, done.error) == (runs.SUCCEEDED, None, None)
    counts = done.summary["counts"]
    assert counts["patients"] == PATIENTS and counts["scored"] > PATIENTS // 4
    assert model_server.calls - before >= counts["scored"]  # every score came from the model server, after the outage
    assert "model" not in done.summary["notScoredReasons"]
    resumed = outcomes(directory)
    assert set(resumed) == {f"Patient/{patient_id(i, PREFIX)}" for i in range(1, PATIENTS + 1)}

    # The same population with the model up all along gives the same outcome for every patient.
    straight = work(pause_app, start(pause_app, bulk, "pause").id, lambda r: r.ended)
    assert straight.state == runs.SUCCEEDED, straight.error
    assert outcomes(tasks.run_dir(pause_app, straight.id)) == resumed
