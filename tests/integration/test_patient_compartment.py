"""A card never uses another patient's data: patient A in context, B's resources in prefetch, through the HTTP
endpoint (Flask test client, real JWTs) and against the real FHIR test server; and the discharge-summary job's
reads by ``encounter=``."""

from __future__ import annotations

import copy
import json
import uuid

import pytest

from app.fhir.client import Client, pooled_session
from app.jobs.registry import PermanentFailure
from cds_services.discharge_summary import gather
from tests.conftest import PUBLIC_BASE_URL

SERVICE = "/cds-services/cardiovascular-risk"
A = "gw-test-patient-1"  # the fixture's patient, in context in every call here
B = "gw-other-patient"
SNOMED = "http://snomed.info/sct"


@pytest.fixture
def call(make_app, signing_key):
    app = make_app()

    def invoke(body: dict) -> dict:
        token = signing_key.token(PUBLIC_BASE_URL + SERVICE)
        response = app.test_client().post(
            SERVICE,
            data=json.dumps(body),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        assert response.status_code == 200, response.get_data(as_text=True)
        (card,) = response.get_json()["cards"]
        return card

    return invoke


def entries(bundle: dict) -> list[dict]:
    return [e["resource"] for e in bundle["entry"]]


def of_patient_b(resource: dict) -> dict:
    """A copy of one of A's resources, made B's (its own id, B as subject)."""
    copied = copy.deepcopy(resource)
    if copied["resourceType"] == "Patient":
        copied["id"] = B
    else:
        copied["id"] = "b-" + copied["id"]
        copied["subject"] = {"reference": f"Patient/{B}"}
    return copied


def high_risk_b(prefetch: dict) -> dict:
    """All of A's prefetch made B's, with values that give B a high risk and so a statin proposal."""
    prefetch_b = {"patient": of_patient_b(prefetch["patient"])}
    for key, bundle in prefetch.items():
        if key != "patient":
            prefetch_b[key] = {**bundle, "entry": [{"resource": of_patient_b(r)} for r in entries(bundle)]}
    for observation in entries(prefetch_b["totalCholesterol"]):
        observation["valueQuantity"]["value"] = 287
    for observation in entries(prefetch_b["hdl"]):
        observation["valueQuantity"]["value"] = 31
    for observation in entries(prefetch_b["smoking"]):
        observation["valueCodeableConcept"] = {"coding": [{"system": SNOMED, "code": "449868002"}], "text": "Smokes"}
    return prefetch_b


def test_a_card_never_uses_another_patients_prefetch_nor_proposes_a_medication_for_them(
    call, hook_body, audit_records, tmp_path
):
    sent = high_risk_b(hook_body["prefetch"])
    card = call({**hook_body, "prefetch": sent})

    assert card["summary"].startswith("10-year ASCVD risk not calculated: the patient record could not be read")
    assert "287" not in card["detail"] and "Smokes" not in card["detail"]
    assert not card.get("suggestions")
    assert B not in json.dumps(card)
    (record,) = audit_records("hook")
    counts = {key: 1 if key == "patient" else len(value["entry"]) for key, value in sent.items()}
    assert record["prefetch_dropped_by_key"] == counts
    assert record["prefetch_dropped"] == sum(counts.values()) == 33
    assert B not in (tmp_path / "audit.jsonl").read_text()  # counts only, never which resources


def test_another_patients_resources_among_the_context_patients_are_left_out_and_counted(
    call, hook_body, audit_records, tmp_path
):
    body = copy.deepcopy(hook_body)
    prefetch = body["prefetch"]
    newer = of_patient_b(entries(prefetch["totalCholesterol"])[0])
    newer["effectiveDateTime"] = "2026-07-01T09:00:00Z"
    newer["valueQuantity"]["value"] = 287
    elsewhere = copy.deepcopy(newer)  # A's id, but on another FHIR server: another patient
    elsewhere["id"], elsewhere["subject"] = "elsewhere", {"reference": f"https://elsewhere.example/fhir/Patient/{A}"}
    diabetes = of_patient_b(entries(prefetch["conditions"])[0])
    diabetes["code"] = {"coding": [{"system": SNOMED, "code": "44054006"}], "text": "Type 2 diabetes"}
    statin = of_patient_b(entries(prefetch["medications"])[0])
    statin["medicationCodeableConcept"] = {"text": "atorvastatin 40 MG Oral Tablet"}
    prefetch["totalCholesterol"]["entry"] += [{"resource": newer}, {"resource": elsewhere}]
    prefetch["conditions"]["entry"].append({"resource": diabetes})
    prefetch["medications"]["entry"].append({"resource": statin})
    # A's own resources, referred to absolutely on the request's FHIR server: kept
    for hdl in entries(prefetch["hdl"]):
        hdl["subject"] = {"reference": f"{body['fhirServer']}/Patient/{A}/_history/1"}

    card = call(body)

    detail = card["detail"]
    assert "| Total cholesterol | 213 mg/dL | 2026-06-02 |" in detail and "287" not in detail
    assert "| HDL cholesterol | 50 mg/dL |" in detail
    assert "| Diabetes | no |  |" in detail
    assert "No statin is active." in detail.splitlines() and "atorvastatin" not in detail
    (record,) = audit_records("hook")
    assert record["prefetch_dropped_by_key"] == {"totalCholesterol": 2, "conditions": 1, "medications": 1}
    assert record["prefetch_dropped"] == 4
    audit_text = (tmp_path / "audit.jsonl").read_text()
    assert B not in audit_text and "287" not in audit_text


def test_the_audit_record_counts_no_drop_when_everything_belongs(call, hook_body, audit_records):
    call(hook_body)
    (record,) = audit_records("hook")
    assert record["prefetch_dropped"] == 0
    assert "prefetch_dropped_by_key" not in record


def test_a_next_page_on_the_fhir_server_that_holds_another_patients_data_is_not_used(
    fhir_server, call, hook_body, audit_records
):
    """A's conditions arrive as a first page whose ``next`` link leads to B's conditions on the real server."""
    other = f"b-{uuid.uuid4().hex[:8]}"
    conditions = [
        {
            "resourceType": "Condition",
            "id": f"{other}-diabetes-{i}",
            "clinicalStatus": {"coding": [{"code": "active"}]},
            "code": {"coding": [{"system": SNOMED, "code": "44054006"}], "text": "Type 2 diabetes"},
            "subject": {"reference": f"Patient/{other}"},
        }
        for i in range(2)
    ]
    fhir_server.post_bundle(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                for r in [{"resourceType": "Patient", "id": other}, *conditions]
            ],
        }
    )
    b_first = fhir_server.get_json("Condition", {"patient": other, "_count": 1})
    (next_url,) = [link["url"] for link in b_first["link"] if link["relation"] == "next"]
    body = json.loads(json.dumps(hook_body).replace(hook_body["fhirServer"], fhir_server.base_url))  # entries too
    body["fhirAuthorization"] = {
        "access_token": "hook-token",
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/Condition.rs",
        "subject": "cds-service",
    }
    body["prefetch"]["conditions"]["link"] = [{"relation": "next", "url": next_url}]

    card = call(body)

    assert "| Diabetes | no |  |" in card["detail"]
    assert [r["key"] for r in audit_records("fhir.fetch")] == ["conditions"]  # the page was read...
    (record,) = audit_records("hook")
    assert record["prefetch_dropped_by_key"] == {"conditions": 1}  # ...and B's condition on it left out


# ---- the discharge-summary job's reads by encounter= ----------------------------------------------------------


def seed_encounter(fhir_server, patient: str, encounter: str, encounter_subject: str) -> None:
    def condition(cid: str, subject: str, text: str) -> dict:
        return {
            "resourceType": "Condition",
            "id": cid,
            "code": {"text": text},
            "subject": {"reference": f"Patient/{subject}"},
            "encounter": {"reference": f"Encounter/{encounter}"},
        }

    resources = [
        {"resourceType": "Patient", "id": patient, "gender": "female", "birthDate": "1950-04-02"},
        {
            "resourceType": "Encounter",
            "id": encounter,
            "status": "finished",
            "class": {"code": "IMP"},
            "subject": {"reference": f"Patient/{encounter_subject}"},
        },
        condition(f"{encounter}-own", patient, "Community-acquired pneumonia"),
        condition(f"{encounter}-other", f"{patient}-someone-else", "Another patient's fracture"),
    ]
    fhir_server.put(resources)


def test_the_discharge_job_keeps_only_the_encounters_patients_records(fhir_server):
    patient, encounter = f"p-{uuid.uuid4().hex[:8]}", f"e-{uuid.uuid4().hex[:8]}"
    seed_encounter(fhir_server, patient, encounter, encounter_subject=patient)
    fhir = Client(fhir_server.base_url, None, pooled_session(), timeout=10)

    _, resources = gather(fhir, patient, encounter)

    assert [c["id"] for c in resources["conditions"]] == [f"{encounter}-own"]
    assert [p["id"] for p in resources["patient"]] == [patient]


def test_the_discharge_job_refuses_an_encounter_of_another_patient(fhir_server):
    patient, encounter = f"p-{uuid.uuid4().hex[:8]}", f"e-{uuid.uuid4().hex[:8]}"
    seed_encounter(fhir_server, patient, encounter, encounter_subject=f"{patient}-someone-else")
    fhir = Client(fhir_server.base_url, None, pooled_session(), timeout=10)

    with pytest.raises(PermanentFailure, match="not the context patient's"):
        gather(fhir, patient, encounter)
