"""Population runs end to end in one process: the real FHIR test server's Bulk Data export, a real token endpoint,
the ledger and the worker, the service's own scoring. The worker runs on a FakeClock, so polls and pauses are
moved through instead of waited for (the server's own Retry-After is checked in real time in one test)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import stat
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from werkzeug import Request, Response

from app.batch import runs, tasks, writeback
from app.batch.scoring import PatientResources, Scored
from app.cds.service import get_service
from app.clock import app_clock
from app.fhir.codes import CONDITION_CLINICAL
from app.jobs import ledger
from app.jobs.worker import Worker
from app.smart.keys import KeyStore
from tests.conftest import PUBLIC_BASE_URL, require
from tests.support.clock import FakeClock
from tests.support.databases import postgres_database, postgres_unavailable
from tests.support.population import patient_id as population_id
from tests.support.population import patient_resources, seed_population, write_population
from tests.support.tokens import TEST_ISSUER, clients_document

SERVICE = "cardiovascular-risk"
RISK = re.compile(r"10-year ASCVD risk (\d+\.\d) %")


class TokenEndpoint:
    """A SMART Backend Services token endpoint: a token for any well-formed client_credentials request."""

    def __init__(self):
        self.issued: list[str] = []

    def __call__(self, request: Request) -> Response:
        form = request.form
        if form.get("grant_type") != "client_credentials" or not form.get("client_assertion"):
            return Response('{"error": "invalid_request"}', 400, content_type="application/json")
        self.issued.append(f"batch-token-{len(self.issued) + 1}")
        body = {"access_token": self.issued[-1], "token_type": "Bearer", "expires_in": 300, "scope": form["scope"]}
        return Response(json.dumps(body), 200, content_type="application/json")


@pytest.fixture
def token_endpoint(make_httpserver):
    endpoint = TokenEndpoint()
    make_httpserver.expect_request("/batch-token", method="POST").respond_with_handler(endpoint)
    yield endpoint
    make_httpserver.clear()


@pytest.fixture
def clock():
    return FakeClock(wall=time.time())


@pytest.fixture
def batch_app(make_app, tmp_path, signing_key, make_httpserver, token_endpoint, clock):
    document = clients_document(signing_key, ["http://127.0.0.1:*", "http://localhost:*"])
    document["clients"][0]["smart_backend"] = {
        "token_url": make_httpserver.url_for("/batch-token"),
        "client_id": "gateway-batch",
        "scope": "system/Patient.rs system/Observation.rs system/Condition.rs system/MedicationRequest.rs",
    }
    clients = tmp_path / "batch-clients.json"
    clients.write_text(json.dumps(document))
    app = make_app(CDS_CLIENTS_FILE=str(clients), BATCH_PART_BYTES=64 * 1024, CLOCK=clock, ADMIN_TOKEN="operator")
    KeyStore(Path(app.config["KEYS_DIR"])).generate()
    return app


def drive(app, run_id: str, rounds: int = 200, step: float = 2.0) -> runs.Run:
    """Run due jobs, moving the worker's clock past each wait, until the run ends (bounded)."""
    clock, worker, engine = app_clock(app), Worker(app), app.extensions["db"]
    clock.advance(max(0.0, time.time() - clock.now()))
    for _ in range(rounds):
        worker.run_until_idle()
        run = runs.get(engine, run_id)
        if run.ended:
            return run
        clock.advance(step)
    raise AssertionError(f"run {run_id} did not end: {runs.get(engine, run_id)}")


def start(app, fhir_server, **options) -> runs.Run:
    return tasks.start(app, service_id=SERVICE, client_iss=TEST_ISSUER, fhir_server=fhir_server.base_url, **options)


def ndjson(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.open("rb")]


@pytest.fixture(scope="module")
def synthea(fhir_server, synthea_dir):
    """The 67 Synthea patients in the FHIR server, and a Group of all of them."""
    fhir_server.post_bundle_files(sorted((synthea_dir / "bundles").glob("*.json")))
    patients = [json.loads(line)["id"] for line in (synthea_dir / "ndjson" / "Patient.ndjson").open()]
    group = {
        "resourceType": "Group",
        "id": "synthea-all",
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": f"Patient/{p}"}} for p in patients],
    }
    fhir_server.put([group])
    with (synthea_dir / "pce_patients.csv").open() as handle:
        return patients, list(csv.DictReader(handle))


def hook_risk(app, fhir_server, signing_key, patient_id: str) -> str | None:
    """The risk the patient-view hook shows for a patient, as its card words it (None: not calculated, a group
    that needs no risk, or no card because no statin benefit group applies)."""
    service = f"/cds-services/{SERVICE}"
    body = {
        "hook": "patient-view",
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "fhirServer": fhir_server.base_url,
        "fhirAuthorization": {
            "access_token": "t",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "x",
            "subject": "c",
        },
        "context": {"userId": "Practitioner/p", "patientId": patient_id},
    }
    response = app.test_client().post(
        service,
        data=json.dumps(body),
        headers={"Authorization": f"Bearer {signing_key.token(PUBLIC_BASE_URL + service)}"},
        content_type="application/json",
    )
    assert response.status_code == 200
    cards = response.get_json()["cards"]
    found = RISK.search(cards[0]["summary"]) if cards else None
    action = next((s["label"] for c in cards for s in c.get("suggestions", ())), None)
    return (found.group(1) if found else None), action


@pytest.mark.slow
def test_a_group_of_synthea_patients_is_scored_as_the_hook_scores_them(batch_app, bulk, synthea, signing_key):
    patients, pce = synthea
    run = drive(batch_app, start(batch_app, bulk, group="synthea-all").id)
    assert (run.state, run.error) == (runs.SUCCEEDED, None)
    directory = tasks.run_dir(batch_app, run.id)
    assessments = {
        a["subject"]["reference"].removeprefix("Patient/"): a for a in ndjson(directory / "RiskAssessment.ndjson")
    }
    outcomes = ndjson(directory / "OperationOutcome.ndjson")
    assert len(assessments) + len(outcomes) == len(patients) == run.summary["counts"]["patients"]
    with (directory / "worklist.csv").open() as handle:
        proposed = {row["patient"]: row for row in csv.DictReader(handle)}
    for patient_id in patients:  # one source of clinical truth: the number and the proposal the hook shows
        assessment = assessments.get(patient_id)
        shown = f"{assessment['prediction'][0]['probabilityDecimal'] * 100:.1f}" if assessment else None
        action = proposed[patient_id]["action"] if patient_id in proposed else None
        assert hook_risk(batch_app, bulk, signing_key, patient_id) == (shown, action), patient_id
        if assessment:
            assert assessment["identifier"][0]["value"] == f"{run.id}/{patient_id}"
            assert assessment["basis"][0] == {"reference": f"Patient/{patient_id}"}
    complete = {row["patient_id"] for row in pce}
    # most PCE-complete patients are still 40-79 today; two have clinical ASCVD (no risk: secondary prevention)
    assert len(complete & set(assessments)) >= 35
    reasons = {c.get("code") for o in outcomes for i in o["issue"] for c in i.get("details", {}).get("coding", ())}
    assert {"ascvd", "age"} <= reasons
    with (directory / "worklist.csv").open() as handle:
        worklist = list(csv.DictReader(handle))
    assert len(worklist) == run.summary["counts"]["worklist"] > 0
    without_risk = [r for r in worklist if not r["risk_percent"]]  # treated whatever the risk (clinical ASCVD)
    assert worklist[: len(without_risk)] == without_risk
    risks = [float(r["risk_percent"]) for r in worklist[len(without_risk) :]]
    assert risks == sorted(risks, reverse=True)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["transactionTime"] == run.transaction_time and manifest["parameters"]["group"] == "synthea-all"
    for entry in manifest["files"]:
        data = (directory / entry["name"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["lines"] == data.count(b"\n")
    assert {f["name"] for f in manifest["files"]} >= {"RiskAssessment.ndjson", "worklist.csv", "report.html"}
    assert sorted(p.name for p in directory.iterdir()) == [
        "OperationOutcome.ndjson",
        "RiskAssessment.ndjson",
        "manifest.json",
        "report.html",
        "worklist.csv",
    ]  # the export, splits and parts (PHI) are gone
    log = bulk.bulk_log()
    kickoffs = [e for e in log if e["path"].endswith("/$export")]
    assert len(kickoffs) == 1 and "_typeFilter" in kickoffs[0]["query"]
    assert any(e["method"] == "DELETE" for e in log)
    assert all(e["auth"] for e in log)  # every request carried the Backend Services token


def test_a_population_survives_the_export_servers_faults(batch_app, bulk):
    seed_population(bulk, 120, seed=3, group_id="faults", prefix="faults")
    bulk.bulk_configure(max_lines_per_file=150, type_filter=False)
    bulk.bulk_faults(kickoff_429=1, status_503=2, file_cut=1, error_file=1)
    run = drive(batch_app, start(batch_app, bulk, group="faults").id)
    assert run.state == runs.SUCCEEDED, run.error
    assert run.summary["counts"]["patients"] == 120
    assert run.type_filtered is False  # refused: exported without, and what was read is filtered by the reader
    assert run.summary["errors"]  # the export's error file became the run's errors
    kickoffs = [e for e in bulk.bulk_log() if e["path"].endswith("/$export")]
    assert [e["status"] for e in kickoffs] == [429, 400, 202]


def test_files_that_expire_are_exported_again(batch_app, bulk):
    seed_population(bulk, 30, seed=4, group_id="expiring", prefix="expiring")
    bulk.bulk_faults(files_expire=1)
    run = drive(batch_app, start(batch_app, bulk, group="expiring").id)
    assert run.state == runs.SUCCEEDED, run.error
    assert run.exports == 2 and run.summary["counts"]["patients"] == 30


def test_polls_wait_for_the_servers_retry_after_in_real_time(make_app, batch_app, bulk):
    app = make_app(
        CDS_CLIENTS_FILE=batch_app.config["CDS_CLIENTS_FILE"], KEYS_DIR=batch_app.config["KEYS_DIR"], CLOCK=None
    )
    seed_population(bulk, 5, seed=5, group_id="patient", prefix="patient")
    bulk.bulk_configure(in_progress_polls=3, retry_after=1)
    run = start(app, bulk, group="patient")
    worker = Worker(app)
    deadline = time.monotonic() + 30
    while not runs.get(app.extensions["db"], run.id).ended and time.monotonic() < deadline:
        if not worker.run_until_idle():
            time.sleep(0.05)  # a poll loop on the real clock: the server's Retry-After is real time
    assert runs.get(app.extensions["db"], run.id).state == runs.SUCCEEDED
    statuses = [e for e in bulk.bulk_log() if "/bulkstatus/" in e["path"] and e["method"] == "GET"]
    assert len(statuses) == 4
    gaps = [(b["time"] - a["time"]) / 1000 for a, b in zip(statuses, statuses[1:], strict=False)]
    assert min(gaps) >= 1.0, gaps


def test_a_cancelled_run_does_nothing_more_and_deletes_its_export(batch_app, bulk):
    seed_population(bulk, 10, seed=6, group_id="cancel", prefix="cancel")
    bulk.bulk_configure(in_progress_polls=50)
    run = start(batch_app, bulk, group="cancel")
    worker = Worker(batch_app)
    clock = app_clock(batch_app)
    clock.advance(max(0.0, time.time() - clock.now()))
    for _ in range(3):
        worker.run_until_idle()
        clock.advance(2)
    assert runs.get(batch_app.extensions["db"], run.id).status_url
    assert tasks.cancel(batch_app, run.id)
    assert not tasks.cancel(batch_app, run.id)
    clock.advance(5)
    worker.run_until_idle()
    assert runs.get(batch_app.extensions["db"], run.id).state == runs.CANCELLED
    assert any(e["method"] == "DELETE" for e in bulk.bulk_log())
    export_job = ledger.get(batch_app.extensions["db"], tasks.job_id(run.id, "export"))
    assert export_job.state == ledger.SUCCEEDED and export_job.result == {"skipped": True}


def test_write_back_creates_one_risk_assessment_per_patient_however_often_a_bucket_runs(batch_app, bulk):
    seed_population(bulk, 40, seed=7, group_id="write-back", prefix="writeback")
    batch_app.config["BATCH_PART_BYTES"] = 1 << 20  # one bucket: Bundles larger than the server takes (8)
    run = drive(batch_app, start(batch_app, bulk, group="write-back", write_back=True).id)
    assert run.state == runs.SUCCEEDED, run.error
    scored = run.summary["counts"]["scored"]
    assert run.summary["counts"]["writtenBack"] == scored > 0
    stored = _risk_assessments(bulk, run.id)
    assert len(stored) == scored and len({r["subject"]["reference"] for r in stored}) == scored
    assert writeback._LEARNED[bulk.base_url + "/"] <= 8  # refused Bundles were halved to what the server takes
    # The same Bundle sent again (a worker killed between the Bundle and its marker) creates nothing.
    bundle = writeback.transaction([{k: v for k, v in r.items() if k not in ("id", "meta")} for r in stored[:8]])
    response = bulk.session.post(bulk.base_url, json=bundle, timeout=30)
    assert response.status_code == 200, response.text
    assert len(_risk_assessments(bulk, run.id)) == scored


def _risk_assessments(server, run_id: str) -> list[dict]:
    found, url = [], f"{server.base_url}/RiskAssessment?_count=1000"
    while url:
        bundle = server.session.get(url, timeout=30).json()
        found += [e["resource"] for e in bundle.get("entry", ())]
        url = next((link["url"] for link in bundle.get("link", ()) if link["relation"] == "next"), None)
    return [r for r in found if r["identifier"][0]["value"].startswith(f"{run_id}/")]


def test_the_admin_api_starts_shows_reports_and_cancels_runs(batch_app, bulk):
    client = batch_app.test_client()
    auth = {"Authorization": "Bearer operator"}
    assert client.post("/admin/batch", json={}).status_code == 401
    bad = client.post("/admin/batch", json={"service": SERVICE, "client": TEST_ISSUER}, headers=auth)
    assert bad.status_code == 400 and bad.get_json()["issue"][0]["expression"] == ["fhirServer"]
    wrong = client.post(
        "/admin/batch",
        json={"service": "discharge-summary", "client": TEST_ISSUER, "fhirServer": bulk.base_url},
        headers=auth,
    )
    assert wrong.status_code == 422 and "cannot score a population" in wrong.get_json()["issue"][0]["diagnostics"]
    seed_population(bulk, 8, seed=8, group_id="admin", prefix="admin")
    body = {"service": SERVICE, "client": TEST_ISSUER, "fhirServer": bulk.base_url, "group": "admin"}
    started = client.post("/admin/batch", json=body, headers=auth)
    assert started.status_code == 202
    run_id = started.get_json()["id"]
    assert started.headers["Location"] == f"/admin/batch/{run_id}"
    report = client.get(f"/admin/batch/{run_id}/report", headers=auth)
    assert report.status_code == 200 and "partial" in report.get_data(as_text=True)
    drive(batch_app, run_id)
    shown = client.get(f"/admin/batch/{run_id}", headers=auth).get_json()
    assert shown["state"] == "succeeded" and shown["counts"]["patients"] == 8
    assert "syn-" not in json.dumps(shown)  # counts, never patients
    report = client.get(f"/admin/batch/{run_id}/report", headers=auth)
    assert "default-src 'none'" in report.headers["Content-Security-Policy"]
    assert client.post(f"/admin/batch/{run_id}/cancel", headers=auth).status_code == 409
    assert client.get("/admin/batch/run-0000000000000000", headers=auth).status_code == 404
    assert client.get("/admin/batch", headers=auth).get_json()["runs"][0]["id"] == run_id


def test_an_ended_run_is_audited_announced_and_counted(batch_app, bulk, tmp_path):
    document = json.loads(Path(batch_app.config["CDS_CLIENTS_FILE"]).read_text())
    document["clients"][0]["webhooks"] = [
        {"url": "https://receiver.example.org/hooks", "secret": "whsec_" + "A" * 43, "events": ["batch.completed"]}
    ]
    Path(batch_app.config["CDS_CLIENTS_FILE"]).write_text(json.dumps(document))
    seed_population(bulk, 12, seed=9, group_id="announced", prefix="announced")
    run = drive(batch_app, start(batch_app, bulk, group="announced").id)
    assert run.state == runs.SUCCEEDED
    records = [json.loads(line) for line in Path(batch_app.config["AUDIT_LOG"]).read_text().splitlines()]
    batch = [r for r in records if r["event"] == "batch" and r.get("run") == run.id]
    assert [r["action"] for r in batch] == ["start", "succeeded"]
    assert batch[1]["patients"] == 12 and "syn-" not in json.dumps(batch)
    delivery = [j for j in ledger.find(batch_app.extensions["db"], ledger.QUEUED, kind="webhook.deliver")]
    delivery += ledger.find(batch_app.extensions["db"], ledger.DEAD, kind="webhook.deliver")
    delivery += ledger.find(batch_app.extensions["db"], ledger.SUCCEEDED, kind="webhook.deliver")
    (event,) = [json.loads(j.payload["body"]) for j in delivery if j.payload["event_type"] == "batch.completed"]
    assert event["data"]["run"] == run.id and event["data"]["state"] == "succeeded"
    assert event["data"]["counts"]["patients"] == 12
    metrics = batch_app.test_client().get("/metrics").get_data(as_text=True)
    assert 'gateway_batch_runs_total{service="cardiovascular-risk",state="succeeded"}' in metrics
    assert 'gateway_batch_parts_total{outcome="done",stage="score"}' in metrics


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [("since", "2026-01-01T00:00Z", "since must be a FHIR instant"), ("group", "a/b", "group must be a FHIR id")],
)
def test_a_run_the_export_could_not_ask_for_is_refused_at_the_start(batch_app, bulk, field, value, words):
    body = {"service": SERVICE, "client": TEST_ISSUER, "fhirServer": bulk.base_url, field: value}
    refused = batch_app.test_client().post("/admin/batch", json=body, headers={"Authorization": "Bearer operator"})
    assert refused.status_code == 422 and words in refused.get_json()["issue"][0]["diagnostics"]
    assert runs.recent(batch_app.extensions["db"]) == []


# ---- issue 9 applied to the batch: only the export's patients, one bad record costs no one else, private files ----

LEAK_PREFIX, LEAK_SEED, LEAK_PATIENTS = "leak", 21, 12


def _clean_outcome(app, index: int):
    """What the service makes of one population patient's own resources, as of the export's day."""
    resources = [r for _, r in patient_resources(index, LEAK_SEED, prefix=LEAK_PREFIX)]
    patient = PatientResources(population_id(index, LEAK_PREFIX), resources, datetime.now(UTC).date())
    with app.app_context():
        return get_service(SERVICE).population.score(patient)


def _foreign_resources(app, directory: Path) -> tuple[str, float, list[str]]:
    """A scored patient, and three resources that name it in ways the hook does not accept (another server, a bare
    id, a urn:uuid) added to the export source: a diabetes, a higher cholesterol, a higher pressure."""
    index, outcome = next(
        (i, o) for i in range(1, LEAK_PATIENTS + 1) if isinstance(o := _clean_outcome(app, i), Scored)
    )
    target = population_id(index, LEAK_PREFIX)
    own = [r for kind, r in patient_resources(index, LEAK_SEED, prefix=LEAK_PREFIX) if kind == "Observation"]
    latest = "2026-11-01T00:00:00Z"
    diabetes = {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]}
    condition = {
        "resourceType": "Condition",
        "id": "leak-evil-diabetes",
        "clinicalStatus": {"coding": [{"system": CONDITION_CLINICAL, "code": "active"}]},
        "code": diabetes,
        "subject": {"reference": f"http://evil.example/fhir/Patient/{target}"},
        "onsetDateTime": latest,
    }
    cholesterol = next(o for o in own if o.get("code", {}).get("coding", [{}])[0].get("code") == "2093-3")
    bare = {**cholesterol, "id": "leak-bare-cholesterol", "subject": {"reference": target}, "effectiveDateTime": latest}
    bare["valueQuantity"] = {"value": 330, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}
    pressure = {
        "resourceType": "Observation",
        "id": "leak-urn-pressure",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
        "valueQuantity": {"value": 195, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
        "subject": {"reference": f"urn:uuid:{target}"},
        "effectiveDateTime": latest,
    }
    with (directory / "Condition.ndjson").open("a") as handle:
        handle.write(json.dumps(condition) + "\n")
    with (directory / "Observation.ndjson").open("a") as handle:
        handle.write(json.dumps(bare) + "\n" + json.dumps(pressure) + "\n")
    return target, outcome.probability, [condition["id"], bare["id"], pressure["id"]]


@pytest.mark.parametrize(("group", "dropped"), [(None, 3), ("leak", 1)])
def test_resources_of_another_server_or_a_bare_or_urn_reference_are_left_out_and_counted(
    batch_app, bulk, tmp_path, group, dropped
):
    write_population(tmp_path / "source", LEAK_PATIENTS, LEAK_SEED, group_id="leak", prefix=LEAK_PREFIX)
    target, clean_risk, foreign = _foreign_resources(batch_app, tmp_path / "source")
    bulk.bulk_source(tmp_path / "source")
    run = drive(batch_app, start(batch_app, bulk, group=group).id)
    assert run.state == runs.SUCCEEDED, run.error
    directory = tasks.run_dir(batch_app, run.id)
    written = (directory / "RiskAssessment.ndjson").read_text() + (directory / "OperationOutcome.ndjson").read_text()
    assert not [f for f in foreign if f in written]  # a Patient-level export has all three; a Group export one
    (assessment,) = [
        a for a in ndjson(directory / "RiskAssessment.ndjson") if a["subject"]["reference"].endswith(target)
    ]
    assert assessment["prediction"][0]["probabilityDecimal"] == round(clean_risk, 6)  # as if they were not there
    assert run.summary["counts"]["dropped"] == dropped and run.summary["counts"]["patients"] == LEAK_PATIENTS
    records = [json.loads(line) for line in Path(batch_app.config["AUDIT_LOG"]).read_text().splitlines()]
    (ended,) = [r for r in records if r.get("run") == run.id and r["action"] == "succeeded"]
    assert ended["dropped"] == dropped
    page = batch_app.test_client().get(f"/admin/batch/{run.id}/report", headers={"Authorization": "Bearer operator"})
    assert re.search(rf"Resources left out</t[hd]>\s*<td[^>]*>{dropped}<", page.get_data(as_text=True))


def like_batch_app(make_app, batch_app, clock, **overrides):
    """An application like ``batch_app`` (its clients, keys, part size, clock and admin token) with ``overrides``."""
    keep = ("CDS_CLIENTS_FILE", "KEYS_DIR", "BATCH_PART_BYTES", "ADMIN_TOKEN")
    return make_app(CLOCK=clock, **{name: batch_app.config[name] for name in keep}, **overrides)


@pytest.fixture
def postgres_batch_app(make_app, batch_app, clock):
    require(postgres_unavailable())
    with postgres_database() as url:
        yield like_batch_app(make_app, batch_app, clock, DATABASE_URL=url)


def test_one_malformed_resource_costs_no_one_else_on_postgresql(postgres_batch_app, bulk, tmp_path):
    write_population(tmp_path / "source", 40, seed=22, group_id="malformed", prefix="malformed")
    broken = {
        "resourceType": "Condition",
        "id": "malformed-system",
        "code": {"coding": [{"system": {"x": 1}, "code": "I10"}]},
        "subject": {"reference": f"Patient/{population_id(1, 'malformed')}"},
    }
    with (tmp_path / "source" / "Condition.ndjson").open("a") as handle:
        handle.write(json.dumps(broken) + "\n")
    bulk.bulk_source(tmp_path / "source")
    run = drive(postgres_batch_app, start(postgres_batch_app, bulk, group="malformed").id)
    assert (run.state, run.error) == (runs.SUCCEEDED, None)
    counts = run.summary["counts"]
    assert counts["patients"] == 40 and counts["scored"] > 0
    assert "record could not be read" not in run.summary["notScoredReasons"]  # a malformed coding matches nothing


@pytest.fixture
def permissive_umask():
    old = os.umask(0)
    yield
    os.umask(old)


def test_a_run_under_a_permissive_umask_keeps_every_directory_and_file_private(
    make_app, batch_app, clock, bulk, tmp_path, permissive_umask
):
    batch_dir = tmp_path / "batchout" / "nested" / "batch"
    app = like_batch_app(make_app, batch_app, clock, BATCH_DIR=str(batch_dir))
    seed_population(bulk, 6, seed=23, group_id="umask", prefix="umask")
    run = start(app, bulk, group="umask")
    worker, clock = Worker(app), app_clock(app)
    clock.advance(max(0.0, time.time() - clock.now()))
    export = tasks.run_dir(app, run.id) / "export"
    for _ in range(50):  # the export stage, one job at a time, until it has downloaded the files (PHI)
        if worker.run_once() is None:
            clock.advance(2.0)
        if runs.get(app.extensions["db"], run.id).state != runs.EXPORTING:
            break
    private = [tmp_path / "batchout", tmp_path / "batchout" / "nested", batch_dir, tasks.run_dir(app, run.id), export]
    assert {str(p): stat.S_IMODE(p.stat().st_mode) for p in private} == {str(p): 0o700 for p in private}
    assert {stat.S_IMODE(p.stat().st_mode) for p in export.iterdir()} == {0o600}
    run = drive(app, run.id)
    assert run.state == runs.SUCCEEDED, run.error
    outputs = list(tasks.run_dir(app, run.id).iterdir())
    assert {stat.S_IMODE(p.stat().st_mode) for p in outputs} == {0o600} and len(outputs) == 5


@pytest.mark.skipif(os.geteuid() != 0, reason="giving BATCH_DIR to another user needs root")
def test_a_run_refuses_a_batch_dir_that_others_may_write_in_and_is_not_ours(
    make_app, batch_app, clock, bulk, tmp_path, audit_records
):
    batch_dir = tmp_path / "shared-batch"
    batch_dir.mkdir()
    os.chown(batch_dir, 65534, 65534)
    batch_dir.chmod(0o777)
    app = like_batch_app(make_app, batch_app, clock, BATCH_DIR=str(batch_dir))
    seed_population(bulk, 2, seed=24, group_id="unsafe", prefix="unsafe")
    run = drive(app, start(app, bulk, group="unsafe").id)
    assert run.state == runs.FAILED
    assert "BATCH_DIR" in run.error and "writable by group or others" in run.error
    assert list(batch_dir.iterdir()) == []  # nothing of the run written there
    assert not [e for e in bulk.bulk_log() if e["path"].endswith("/$export")]  # nor anything asked of the EHR
    (failed,) = [r for r in audit_records("batch") if r["action"] == "failed"]
    assert failed["run"] == run.id and failed["patients"] == 0  # what it had done by then: counts only


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"a string"', b"\xff\xfe"])
def test_a_start_body_that_is_not_a_json_object_is_named(batch_app, body):
    answer = batch_app.test_client().post(
        "/admin/batch", data=body, content_type="application/json", headers={"Authorization": "Bearer operator"}
    )
    assert answer.status_code == 400
    assert answer.get_json()["issue"][0]["expression"] == ["body"]
