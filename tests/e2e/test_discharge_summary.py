"""End to end: an encounter-discharge hook leads, with no human step, to exactly one preliminary DocumentReference
in a real FHIR server and one signed webhook at a real receiver, whatever is killed along the way.

The hook is answered in process (Flask test client); the work is done by ``flask --app app jobs worker``
processes on the same SQLite ledger, SIGKILLed at random points. Write-back uses SMART Backend Services
against a token endpoint test double; the FHIR server is the Medplum test server behind a proxy that can
fail requests or kill the worker right after a write.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import time
import uuid
from collections import Counter
from urllib.parse import urlencode

import pytest
import requests
from standardwebhooks.webhooks import Webhook

from app import results
from app.jobs import ledger

# WEBHOOKS_ALLOW_PRIVATE (loopback receivers) works only with the service on this host.
from tests.conftest import LOCAL_BASE_URL as PUBLIC_BASE_URL
from tests.support.http_servers import FhirProxy, WebhookReceiver
from tests.support.processes import start_worker
from tests.support.tokens import clients_document

SECRET = "whsec_" + base64.b64encode(b"discharge-webhook-secret-32-bytes!").decode()
SERVICE = "/cds-services/discharge-summary"
JOB_KIND = "discharge-summary.draft"


def seed_encounter(fhir_server, patient_id: str, encounter_id: str) -> None:
    """A finished inpatient encounter with one of everything the summary gathers (data written for this test)."""
    enc = {"reference": f"Encounter/{encounter_id}"}
    subject = {"reference": f"Patient/{patient_id}"}
    resources = [
        {"resourceType": "Patient", "id": patient_id, "gender": "female", "birthDate": "1950-04-02"},
        {
            "resourceType": "Encounter",
            "id": encounter_id,
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
            "subject": subject,
            "period": {"start": "2026-11-20T08:00:00Z", "end": "2026-11-27T15:00:00Z"},
            "reasonCode": [{"text": "Community-acquired pneumonia"}],
        },
        {
            "resourceType": "Condition",
            "id": f"{encounter_id}-c",
            "subject": subject,
            "encounter": enc,
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "233604007", "display": "Pneumonia"}]},
        },
        {
            "resourceType": "Procedure",
            "id": f"{encounter_id}-p",
            "status": "completed",
            "subject": subject,
            "encounter": enc,
            "code": {"text": "Chest X-ray"},
        },
        {
            "resourceType": "MedicationRequest",
            "id": f"{encounter_id}-m",
            "status": "active",
            "intent": "order",
            "subject": subject,
            "encounter": enc,
            "medicationCodeableConcept": {"text": "Amoxicillin 500 mg oral capsule"},
            "dosageInstruction": [{"text": "1 capsule three times daily for 5 days"}],
        },
        {
            "resourceType": "Observation",
            "id": f"{encounter_id}-o",
            "status": "final",
            "subject": subject,
            "encounter": enc,
            "code": {"text": "C-reactive protein"},
            "valueQuantity": {"value": 48, "unit": "mg/L"},
            "effectiveDateTime": "2026-11-21T06:00:00Z",
        },
    ]
    fhir_server.put(resources)


@pytest.fixture
def setup(fhir_server, make_httpserver, signing_key, tmp_path):
    """Token endpoint, webhook receiver, FHIR proxy, clients file, settings shared by app and workers."""
    tokens = {"issued": 0}

    def token_endpoint(request):
        from werkzeug import Response

        tokens["issued"] += 1
        body = {"access_token": f"token-{tokens['issued']}", "token_type": "bearer", "expires_in": 300}
        return Response(json.dumps(body), content_type="application/json")

    make_httpserver.expect_request("/token", method="POST").respond_with_handler(token_endpoint)
    receiver = WebhookReceiver()
    proxy = FhirProxy(fhir_server.base_url)
    with receiver, proxy:
        document = clients_document(signing_key, ["http://127.0.0.1:*"])
        document["clients"][0]["smart_backend"] = {
            "token_url": make_httpserver.url_for("/token"),
            "client_id": "gateway-test",
            "scope": "system/DocumentReference.c system/Encounter.r system/Condition.r",
        }
        document["clients"][0]["webhooks"] = [
            {"url": receiver.url + "/hooks", "secret": SECRET, "events": ["discharge-summary.ready"]}
        ]
        clients = tmp_path / "clients-e2e.json"
        clients.write_text(json.dumps(document))
        settings = {
            "DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}",
            "CDS_CLIENTS_FILE": str(clients),
            "PUBLIC_BASE_URL": PUBLIC_BASE_URL,
            "INSTANCE_PATH": str(tmp_path / "instance"),
            "AUDIT_LOG": str(tmp_path / "audit.jsonl"),
            "WEBHOOKS_ALLOW_PRIVATE": "1",
            "WEBHOOK_RETRY_SCHEDULE": "0.2,0.2,0.2,0.2,0.2,0.2,0.2",
            "JOB_LEASE_S": "1",
            "JOB_POLL_S": "0.05",
            "JOB_MAX_ATTEMPTS": "50",
        }
        yield {
            "settings": settings,
            "receiver": receiver,
            "proxy": proxy,
            "fhir": fhir_server,
            "fhir_base": proxy.url + "/fhir/R4",
            "tokens": tokens,
            "logs": tmp_path,
        }


@pytest.fixture
def gateway(make_app, setup):
    app = make_app(**setup["settings"])
    app.extensions["smart_keys"].ensure()
    return app


def discharge(app, signing_key, fhir_base: str, patient_id: str, encounter_id: str) -> dict:
    body = {
        "hookInstance": str(uuid.uuid4()),
        "hook": "encounter-discharge",
        "fhirServer": fhir_base,
        "context": {"userId": "Practitioner/dr-1", "patientId": patient_id, "encounterId": encounter_id},
    }
    token = signing_key.token(PUBLIC_BASE_URL + SERVICE)
    response = app.test_client().post(
        SERVICE, json=body, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def job_of(app, card_response: dict) -> str:
    """The job behind a card: its smart link's appContext is a stored result that names the job."""
    link = card_response["cards"][0]["links"][0]
    app.extensions["results_writer"].flush()
    return results.load(app.extensions["db"], link["appContext"]).data["job_id"]


def jobs_of_kind(app, kind: str) -> list[ledger.Job]:
    engine = app.extensions["db"]
    return [job for state in ledger.STATES for job in ledger.find(engine, state, kind=kind, limit=10_000)]


def wait_all_done(app, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        jobs = jobs_of_kind(app, JOB_KIND) + jobs_of_kind(app, "webhook.deliver")
        if jobs and all(job.state == ledger.SUCCEEDED for job in jobs):
            return
        bad = [(job.id, job.state, job.last_error) for job in jobs if job.state in (ledger.DEAD, ledger.EXPIRED)]
        assert not bad, f"jobs ended badly: {bad}"
        assert time.monotonic() < deadline, f"not done: {Counter(job.state for job in jobs)}"
        time.sleep(0.1)


def work_until_done(setup, app, timeout: float = 60) -> None:
    """One worker process until every job has succeeded, then a clean SIGTERM."""
    log = setup["logs"] / "worker.log"
    started_before = log.read_text().count(" started") if log.exists() else 0
    worker = start_worker(setup["settings"], log_path=log)
    try:
        wait_all_done(app, timeout)
        deadline = time.monotonic() + 30  # its SIGTERM handler is set once it says it started
        while log.read_text().count(" started") <= started_before:
            assert worker.poll() is None and time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0


def documents_for(fhir_server, app, job_id: str) -> list[dict]:
    system = f"{app.config['PUBLIC_BASE_URL']}/jobs"
    bundle = fhir_server.get_json("DocumentReference", params={"identifier": f"{system}|{job_id}"})
    return [e["resource"] for e in bundle.get("entry") or ()]


def verified_ids(receiver: WebhookReceiver) -> Counter[str]:
    """webhook-id of every delivery received, each checked with the subscriber's secret."""
    ids: Counter[str] = Counter()
    for item in receiver.received:
        Webhook(SECRET).verify(item.body, item.headers)
        ids[item.headers["webhook-id"]] += 1
    return ids


def test_the_hook_answers_at_once_and_one_job_makes_one_document_and_one_webhook(gateway, setup, signing_key):
    patient, encounter = f"p-{uuid.uuid4().hex[:8]}", f"e-{uuid.uuid4().hex[:8]}"
    seed_encounter(setup["fhir"], patient, encounter)
    started = time.monotonic()
    first = discharge(gateway, signing_key, setup["fhir_base"], patient, encounter)
    assert time.monotonic() - started < 0.5
    card = first["cards"][0]
    assert card["summary"] == "A draft discharge summary is being prepared" and card["indicator"] == "info"
    assert card["links"][0]["type"] == "smart"
    again = discharge(gateway, signing_key, setup["fhir_base"], patient, encounter)
    assert job_of(gateway, first) == job_of(gateway, again)
    assert len(jobs_of_kind(gateway, JOB_KIND)) == 1

    work_until_done(setup, gateway)
    job_id = job_of(gateway, first)
    docs = documents_for(setup["fhir"], gateway, job_id)
    assert len(docs) == 1
    doc = docs[0]
    assert doc["docStatus"] == "preliminary" and doc["type"]["coding"][0]["code"] == "18842-5"
    assert doc["context"]["encounter"][0]["reference"] == f"Encounter/{encounter}"
    text = base64.b64decode(doc["content"][0]["attachment"]["data"]).decode()
    assert "Pneumonia" in text and "Amoxicillin" in text and "DRAFT" in text.upper()
    assert verified_ids(setup["receiver"]) == {job_id: 1}
    event = json.loads(setup["receiver"].received[0].body)
    assert event["type"] == "discharge-summary.ready"
    assert event["data"] == {"jobId": job_id, "url": f"{PUBLIC_BASE_URL}/jobs/{job_id}"}  # thin: no PHI
    assert setup["tokens"]["issued"] == 1  # one Backend Services token for every FHIR call of the job
    done = discharge(gateway, signing_key, setup["fhir_base"], patient, encounter)
    assert done["cards"][0]["summary"] == "A draft discharge summary is ready for your review"


def test_workers_killed_at_random_points_twenty_times_still_make_one_result_each(gateway, setup, signing_key):
    seed = int(os.environ.get("KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    patient = f"p-{uuid.uuid4().hex[:8]}"
    encounters = [f"e-{uuid.uuid4().hex[:8]}-{i}" for i in range(40)]
    for encounter in encounters:
        seed_encounter(setup["fhir"], patient, encounter)
    job_ids = {}
    kills = 0
    for round_ in range(20):
        for encounter in encounters[round_ * 2 : round_ * 2 + 2]:
            job_ids[encounter] = job_of(
                gateway, discharge(gateway, signing_key, setup["fhir_base"], patient, encounter)
            )
        repeat = rng.choice(list(job_ids))
        assert job_of(gateway, discharge(gateway, signing_key, setup["fhir_base"], patient, repeat)) == job_ids[repeat]
        worker = start_worker(setup["settings"], "--threads", "2", log_path=setup["logs"] / "worker.log")
        time.sleep(rng.uniform(0.6, 1.8))  # start-up is ~0.6 s: kills land before, during and after work
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        kills += 1
    work_until_done(setup, gateway, timeout=90)
    assert kills == 20
    summary_jobs = jobs_of_kind(gateway, JOB_KIND)
    assert len(summary_jobs) == len(encounters)
    assert all(job.state == ledger.SUCCEEDED for job in summary_jobs)
    for encounter, job_id in job_ids.items():
        assert len(documents_for(setup["fhir"], gateway, job_id)) == 1, f"seed {seed}: {encounter}"
    received = verified_ids(setup["receiver"])
    assert set(received) == set(job_ids.values()), f"seed {seed}"
    retried = sum(job.attempts > 1 for job in jobs_of_kind(gateway, JOB_KIND))
    print(f"seed {seed}: {retried} summary jobs re-run, {sum(received.values()) - len(received)} duplicate webhooks")


def test_a_kill_after_the_write_before_completion_reruns_to_the_same_document(gateway, setup, signing_key):
    patient, encounter = f"p-{uuid.uuid4().hex[:8]}", f"e-{uuid.uuid4().hex[:8]}"
    seed_encounter(setup["fhir"], patient, encounter)
    job_id = job_of(gateway, discharge(gateway, signing_key, setup["fhir_base"], patient, encounter))
    worker = {}

    def kill_after_document_write(method: str, path: str, status: int) -> None:
        if method == "POST" and path.startswith("/fhir/R4/DocumentReference") and "killed" not in worker:
            worker["killed"] = True
            os.killpg(worker["proc"].pid, signal.SIGKILL)

    setup["proxy"].after = kill_after_document_write
    worker["proc"] = start_worker(setup["settings"], log_path=setup["logs"] / "worker.log")
    assert worker["proc"].wait(timeout=30) == -signal.SIGKILL
    job = ledger.get(gateway.extensions["db"], job_id)
    assert job.state == ledger.RUNNING and len(documents_for(setup["fhir"], gateway, job_id)) == 1
    work_until_done(setup, gateway)
    job = ledger.get(gateway.extensions["db"], job_id)
    assert job.attempts == 2 and job.result["created"] is False  # the re-run found the first document
    docs = documents_for(setup["fhir"], gateway, job_id)
    assert len(docs) == 1 and job.result["documentReference"] == f"DocumentReference/{docs[0]['id']}"
    assert verified_ids(setup["receiver"]) == {job_id: 1}


def test_a_kill_during_webhook_delivery_redelivers_with_the_same_id(gateway, setup, signing_key):
    patient, encounter = f"p-{uuid.uuid4().hex[:8]}", f"e-{uuid.uuid4().hex[:8]}"
    seed_encounter(setup["fhir"], patient, encounter)
    job_id = job_of(gateway, discharge(gateway, signing_key, setup["fhir_base"], patient, encounter))
    worker = {}

    def kill_on_first_receipt(_received) -> int:
        if "killed" not in worker:
            worker["killed"] = True
            os.killpg(worker["proc"].pid, signal.SIGKILL)
        return 200

    setup["receiver"].respond = kill_on_first_receipt
    worker["proc"] = start_worker(setup["settings"], log_path=setup["logs"] / "worker.log")
    assert worker["proc"].wait(timeout=30) == -signal.SIGKILL
    work_until_done(setup, gateway)
    assert verified_ids(setup["receiver"]) == {job_id: 2}  # at least once, one id: the receiver dedupes on it
    assert len(documents_for(setup["fhir"], gateway, job_id)) == 1


def test_fhir_server_down_is_retried_until_it_is_back(gateway, setup, signing_key):
    patient, encounter = f"p-{uuid.uuid4().hex[:8]}", f"e-{uuid.uuid4().hex[:8]}"
    seed_encounter(setup["fhir"], patient, encounter)
    job_id = job_of(gateway, discharge(gateway, signing_key, setup["fhir_base"], patient, encounter))
    refused = Counter()

    def down_for_a_while(method: str, path: str) -> int | None:
        if refused["n"] < 3:
            refused["n"] += 1
            return 503
        return None

    setup["proxy"].before = down_for_a_while
    work_until_done(setup, gateway)
    job = ledger.get(gateway.extensions["db"], job_id)
    assert job.attempts == 4 and job.state == ledger.SUCCEEDED
    assert len(documents_for(setup["fhir"], gateway, job_id)) == 1


def test_an_expired_job_delivers_nothing(gateway, setup, signing_key):
    patient, encounter = f"p-{uuid.uuid4().hex[:8]}", f"e-{uuid.uuid4().hex[:8]}"
    seed_encounter(setup["fhir"], patient, encounter)
    job_id = job_of(gateway, discharge(gateway, signing_key, setup["fhir_base"], patient, encounter))
    engine = gateway.extensions["db"]
    with engine.begin() as conn:  # the clinical deadline passes before any worker is free
        conn.execute(ledger.jobs.update().where(ledger.jobs.c.id == job_id).values(expires_at=ledger.jobs.c.created_at))
    from app.jobs.worker import Worker

    assert Worker(gateway).run_until_idle() == []
    assert ledger.get(engine, job_id).state == ledger.EXPIRED
    assert documents_for(setup["fhir"], gateway, job_id) == [] and setup["receiver"].received == []
    late = discharge(gateway, signing_key, setup["fhir_base"], patient, encounter)
    assert late["cards"][0]["summary"] == "The draft discharge summary was not prepared in time"


def test_job_status_is_served_to_the_client_that_asked(gateway, setup, signing_key):
    patient, encounter = f"p-{uuid.uuid4().hex[:8]}", f"e-{uuid.uuid4().hex[:8]}"
    seed_encounter(setup["fhir"], patient, encounter)
    job_id = job_of(gateway, discharge(gateway, signing_key, setup["fhir_base"], patient, encounter))
    from app.jobs.worker import Worker

    Worker(gateway).run_until_idle()
    path = f"/jobs/{job_id}"
    token = signing_key.token(PUBLIC_BASE_URL + path)
    body = gateway.test_client().get(path, headers={"Authorization": f"Bearer {token}"}).get_json()
    assert body["status"] == "succeeded" and body["result"]["docStatus"] == "preliminary"
    assert "Pneumonia" in body["result"]["summary"]
    query = urlencode({"identifier": f"{PUBLIC_BASE_URL}/jobs|{job_id}"})
    found = requests.get(f"{setup['fhir'].base_url}/DocumentReference?{query}", timeout=10).json()
    assert body["result"]["documentReference"] == f"DocumentReference/{found['entry'][0]['resource']['id']}"
