"""Prefetch fill-in against a real FHIR R4 server on loopback: absent keys fetched, failures handled."""

from __future__ import annotations

import copy
import json
import time

import pytest

from tests.conftest import PUBLIC_BASE_URL
from tests.support.tokens import clients_document

SERVICE = "/cds-services/cardiovascular-risk"


def as_seed_bundle(hook_body: dict) -> dict:
    """The fixture's prefetch resources as a bundle for the test server."""
    resources = [hook_body["prefetch"]["patient"]]
    for key, value in hook_body["prefetch"].items():
        if key != "patient":
            resources += [e["resource"] for e in value["entry"]]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources
        ],
    }


@pytest.fixture(scope="module")
def seeded(fhir_server):
    from tests.conftest import FIXTURES

    body = json.loads((FIXTURES / "hooks" / "patient-view-cardiovascular-risk.json").read_text())
    fhir_server.post_bundle(as_seed_bundle(body))
    return fhir_server


@pytest.fixture
def call(make_app, signing_key):
    def invoke(body: dict, app=None):
        client = (app or make_app()).test_client()
        token = signing_key.token(PUBLIC_BASE_URL + SERVICE)
        started = time.monotonic()
        response = client.post(
            SERVICE,
            data=json.dumps(body),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        return response, time.monotonic() - started

    return invoke


def without_prefetch(hook_body: dict, server_url: str) -> dict:
    body = copy.deepcopy(hook_body)
    body.pop("prefetch")
    body["fhirServer"] = server_url
    body["fhirAuthorization"] = {
        "access_token": "hook-token-abc123",
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/Patient.read patient/Observation.read",
        "subject": "cds-service",
    }
    return body


def test_absent_prefetch_is_fetched_and_gives_the_same_card(seeded, call, hook_body, audit_records, tmp_path):
    with_prefetch, _ = call(hook_body)
    fetched, _ = call(without_prefetch(hook_body, seeded.base_url))
    assert fetched.status_code == 200
    assert fetched.get_json()["cards"][0]["summary"] == with_prefetch.get_json()["cards"][0]["summary"]
    records = audit_records("fhir.fetch")
    assert sorted(r["key"] for r in records) == sorted(hook_body["prefetch"])
    assert all(r["outcome"] == "ok" and r["hookInstance"] == hook_body["hookInstance"] for r in records)
    assert "hook-token-abc123" not in (tmp_path / "audit.jsonl").read_text()


def test_fhir_server_down_gives_412_for_the_required_key(call, hook_body):
    response, elapsed = call(without_prefetch(hook_body, "http://127.0.0.1:9/fhir"))
    assert response.status_code == 412
    assert response.get_json()["issue"][0]["expression"] == ["prefetch.patient"]
    assert elapsed < 1.0


def test_fhir_server_down_with_patient_sent_degrades_and_says_what_is_missing(call, hook_body):
    body = without_prefetch(hook_body, "http://127.0.0.1:9/fhir")
    body["prefetch"] = {"patient": hook_body["prefetch"]["patient"]}
    response, _ = call(body)
    assert response.status_code == 200
    card = response.get_json()["cards"][0]
    assert "not calculated" in card["summary"]
    assert "could not" in card["detail"]


def test_slow_fhir_server_is_cut_off_at_the_deadline(httpserver, call, hook_body):
    def slow(_request):
        time.sleep(2)

    httpserver.expect_request("/fhir/Patient/gw-test-patient-1").respond_with_handler(slow)
    response, elapsed = call(without_prefetch(hook_body, httpserver.url_for("/fhir")))
    assert response.status_code == 412
    assert elapsed < 0.5 + 0.15  # the 500 ms hook budget, not the server's 2 s


def test_fhir_server_outside_the_allowlist_is_never_contacted(
    httpserver, make_app, signing_key, call, hook_body, tmp_path
):
    httpserver.expect_request("/fhir/Patient/gw-test-patient-1").respond_with_json(hook_body["prefetch"]["patient"])
    clients = tmp_path / "narrow-clients.json"
    clients.write_text(json.dumps(clients_document(signing_key, ["https://ehr.example.org/fhir"])))
    app = make_app(CDS_CLIENTS_FILE=str(clients))
    response, _ = call(without_prefetch(hook_body, httpserver.url_for("/fhir")), app=app)
    assert response.status_code == 412
    assert httpserver.log == []


def test_without_a_token_nothing_is_fetched_unless_anonymous_is_allowed(seeded, make_app, call, hook_body):
    body = without_prefetch(hook_body, seeded.base_url)
    del body["fhirAuthorization"]
    refused, _ = call(body)
    assert refused.status_code == 412
    allowed, _ = call(body, app=make_app(FHIR_ALLOW_ANONYMOUS="1"))
    assert allowed.status_code == 200
    assert allowed.get_json()["cards"][0]["summary"].startswith("10-year ASCVD risk")


def test_searchset_pages_are_followed(seeded, make_app, call, hook_body):
    """The test server pages at 20 by default; 25 conditions, the diabetes one last, need two pages."""
    conditions = [
        {
            "resourceType": "Condition",
            "id": f"paged-cond-{i}",
            "clinicalStatus": {"coding": [{"code": "resolved"}]},
            "code": {"text": f"old problem {i}"},
            "subject": {"reference": "Patient/gw-paged"},
        }
        for i in range(24)
    ]
    diabetes = {
        "resourceType": "Condition",
        "id": "paged-cond-diabetes",
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
        "subject": {"reference": "Patient/gw-paged"},
    }
    patient = {**hook_body["prefetch"]["patient"], "id": "gw-paged"}
    entries = [patient, *conditions, diabetes]
    seeded.post_bundle(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in entries
            ],
        }
    )
    body = copy.deepcopy(hook_body)
    body["context"]["patientId"] = "gw-paged"
    body["prefetch"]["patient"] = patient
    del body["prefetch"]["conditions"]
    body["fhirServer"] = seeded.base_url
    body["fhirAuthorization"] = without_prefetch(hook_body, seeded.base_url)["fhirAuthorization"]
    first_page = seeded.get_json("Condition", {"patient": "gw-paged"})
    assert any(link["relation"] == "next" for link in first_page["link"])
    response, _ = call(body)
    detail = response.get_json()["cards"][0]["detail"]
    assert "**Diabetes:** yes" in detail
