"""The FHIR reads and writes a job makes, and the webhooks it sends, are in the audit log: who and what, as hook
records have them (issuer, user, patient reference, hookInstance), the job, resource type, method, status and
server host, never resource content, patient names or the receiver's URL."""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections import Counter
from urllib.parse import urlsplit

import pytest

from app.fhir.client import Client, pooled_session
from app.jobs import ledger
from app.jobs.worker import Worker
from tests.conftest import LOCAL_BASE_URL
from tests.support.http_servers import WebhookReceiver
from tests.support.tokens import TEST_ISSUER, clients_document

SERVICE = "/cds-services/discharge-summary"
NAME = "Zelda Quixote-Audit"  # a patient's name: it must appear nowhere in the audit log


def seed(fhir_server, patient: str, encounter: str) -> None:
    subject = {"reference": f"Patient/{patient}"}
    fhir_server.put(
        [
            {"resourceType": "Patient", "id": patient, "name": [{"text": NAME}], "gender": "female"},
            {
                "resourceType": "Encounter",
                "id": encounter,
                "status": "finished",
                "class": {"code": "IMP"},
                "subject": subject,
                "period": {"start": "2026-11-20T08:00:00Z", "end": "2026-11-27T15:00:00Z"},
            },
            {
                "resourceType": "Condition",
                "id": f"{encounter}-c",
                "subject": subject,
                "encounter": {"reference": f"Encounter/{encounter}"},
                "code": {"text": "Community-acquired pneumonia"},
            },
        ]
    )


@pytest.fixture
def receiver():
    with WebhookReceiver() as server:
        yield server


@pytest.fixture
def app(make_app, tmp_path, signing_key, receiver):
    document = clients_document(signing_key, ["http://127.0.0.1:*"])
    document["clients"][0]["webhooks"] = [
        {
            "url": receiver.url + "/hooks?token=in-the-url",
            "secret": "whsec_" + base64.b64encode(os.urandom(32)).decode(),
            "events": ["discharge-summary.ready"],
            "payload": "full",
        }
    ]
    path = tmp_path / "clients-audit.json"
    path.write_text(json.dumps(document))
    return make_app(
        CDS_CLIENTS_FILE=str(path),
        PUBLIC_BASE_URL=LOCAL_BASE_URL,
        FHIR_ALLOW_ANONYMOUS=True,
        WEBHOOKS_ALLOW_PRIVATE=True,
    )


def call_hook(app, signing_key, fhir_base: str, patient: str, encounter: str) -> str:
    hook_instance = str(uuid.uuid4())
    body = {
        "hookInstance": hook_instance,
        "hook": "encounter-discharge",
        "fhirServer": fhir_base,
        "context": {"userId": "Practitioner/dr-audit", "patientId": patient, "encounterId": encounter},
    }
    token = signing_key.token(LOCAL_BASE_URL + SERVICE)
    response = app.test_client().post(SERVICE, json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.get_data(as_text=True)
    return hook_instance


def test_every_fhir_request_of_the_discharge_job_is_audited(app, signing_key, fhir_server, receiver, tmp_path):
    patient, encounter = f"p-{uuid.uuid4().hex[:8]}", f"e-{uuid.uuid4().hex[:8]}"
    seed(fhir_server, patient, encounter)
    hook_instance = call_hook(app, signing_key, fhir_server.base_url, patient, encounter)
    outcomes = Worker(app).run_until_idle()
    assert [o.state for o in outcomes] == ["succeeded", "succeeded"]  # the draft, then its webhook
    job = ledger.find(app.extensions["db"], ledger.SUCCEEDED, kind="discharge-summary.draft")[0]

    text = (tmp_path / "audit.jsonl").read_text()
    assert NAME not in text and "pneumonia" not in text.lower() and "in-the-url" not in text
    records = [json.loads(line) for line in text.splitlines()]
    fhir = [r for r in records if r["event"] in ("job.fhir-read", "job.fhir-write")]
    server = urlsplit(fhir_server.base_url).netloc
    for record in fhir:
        assert record["job"] == job.id and record["kind"] == "discharge-summary.draft" and record["attempt"] == 1
        assert record["iss"] == TEST_ISSUER and record["user"] == "Practitioner/dr-audit"
        assert record["patient"] == f"Patient/{patient}" and record["hookInstance"] == hook_instance
        assert record["server"] == server and record["status"] in (200, 201) and record["latency_ms"] >= 0
    reads = Counter((r["resourceType"], r["interaction"]) for r in fhir if r["event"] == "job.fhir-read")
    assert reads == {
        ("Encounter", "read"): 1,
        ("Patient", "read"): 1,
        ("Condition", "search"): 1,
        ("Procedure", "search"): 1,
        ("MedicationRequest", "search"): 1,
        ("Observation", "search"): 1,
    }
    (write,) = [r for r in fhir if r["event"] == "job.fhir-write"]
    assert (write["method"], write["resourceType"], write["interaction"], write["status"]) == (
        "POST",
        "DocumentReference",
        "create",
        201,
    )

    (delivery,) = [r for r in records if r["event"] == "job.webhook-delivery"]
    assert delivery["kind"] == "webhook.deliver" and delivery["status"] == 200
    assert delivery["iss"] == TEST_ISSUER and delivery["payloadKind"] == "full"
    assert delivery["webhookEvent"] == "discharge-summary.ready"
    assert delivery["server"] == urlsplit(receiver.url).netloc
    assert len(receiver.received) == 1


def test_a_fhir_server_that_does_not_answer_is_audited_too(make_httpserver):
    seen = []
    port = make_httpserver.port
    client = Client(f"http://127.0.0.1:{port}/nothing-here", None, pooled_session(), timeout=2, observe=seen.append)
    make_httpserver.expect_request("/nothing-here/Encounter/e-1").respond_with_data("gone", status=404)
    with pytest.raises(Exception, match="not found"):
        client.get("Encounter/e-1")
    unreachable = Client("http://127.0.0.1:9/fhir", None, pooled_session(), timeout=2, observe=seen.append)
    with pytest.raises(Exception, match="unreachable"):
        unreachable.get("Patient/p-1")
    make_httpserver.clear()
    assert [(s["method"], s["resourceType"], s.get("status"), s.get("outcome")) for s in seen] == [
        ("GET", "Encounter", 404, None),
        ("GET", "Patient", None, "unreachable"),
    ]
    assert seen[1]["server"] == "127.0.0.1:9"
