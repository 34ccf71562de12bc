"""The discharge-summary draft is one patient's: a hook naming another patient for the same encounter never gets
(or links) that draft, the job page never shows it for another patient or server, an encounter naming no patient
is not drafted, and what the job left out as another patient's is counted in the audit log. Real Node FHIR test
server, real worker (in process)."""

from __future__ import annotations

import json
import uuid

import pytest

from app import results
from app.jobs import ledger
from app.jobs.worker import Worker
from app.smart.pages import LaunchContext, render_result
from tests.conftest import LOCAL_BASE_URL

SERVICE = "/cds-services/discharge-summary"
OTHER_DIAGNOSIS = "Another patient's hip fracture"  # must reach neither the draft nor the audit log


@pytest.fixture
def app(make_app):
    return make_app(PUBLIC_BASE_URL=LOCAL_BASE_URL, FHIR_ALLOW_ANONYMOUS=True)


def seed(fhir_server, patient: str, encounter: str, *, subject: bool = True, others: int = 0) -> None:
    """A patient's encounter with one condition; ``others`` conditions of another patient recorded on it too."""
    encounter_resource = {"resourceType": "Encounter", "id": encounter, "status": "finished", "class": {"code": "IMP"}}
    if subject:
        encounter_resource["subject"] = {"reference": f"Patient/{patient}"}

    def condition(cid: str, whose: str, text: str) -> dict:
        return {
            "resourceType": "Condition",
            "id": cid,
            "subject": {"reference": f"Patient/{whose}"},
            "encounter": {"reference": f"Encounter/{encounter}"},
            "code": {"text": text},
        }

    fhir_server.put(
        [
            {"resourceType": "Patient", "id": patient, "gender": "female"},
            encounter_resource,
            condition(f"{encounter}-c", patient, "Community-acquired pneumonia"),
            *(condition(f"{encounter}-x{i}", f"{patient}-other", OTHER_DIAGNOSIS) for i in range(others)),
        ]
    )


def hook(app, signing_key, fhir_base: str, patient: str, encounter: str) -> dict:
    body = {
        "hookInstance": str(uuid.uuid4()),
        "hook": "encounter-discharge",
        "fhirServer": fhir_base,
        "context": {"userId": "Practitioner/dr-1", "patientId": patient, "encounterId": encounter},
    }
    token = signing_key.token(LOCAL_BASE_URL + SERVICE)
    response = app.test_client().post(SERVICE, json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.get_data(as_text=True)
    (card,) = response.get_json()["cards"]
    return card


def stored(app, card: dict) -> results.StoredResult:
    (link,) = card["links"]
    app.extensions["results_writer"].flush()
    return results.load(app.extensions["db"], link["appContext"])


def page_text(app, result: results.StoredResult) -> str:
    launch = LaunchContext(
        patient=None, need_patient_banner=False, user="Practitioner/dr-1", granted_scopes=frozenset()
    )
    with app.app_context():
        return render_result(result, launch)


def new_ids() -> tuple[str, str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"dsA-{tag}", f"dsB-{tag}", f"e-{tag}"


def test_another_patient_on_the_same_encounter_never_gets_the_first_patients_draft(app, signing_key, fhir_server):
    patient_a, patient_b, encounter = new_ids()
    seed(fhir_server, patient_a, encounter)
    base = fhir_server.base_url
    job_a = stored(app, hook(app, signing_key, base, patient_a, encounter)).data["job_id"]
    assert [o.state for o in Worker(app).run_until_idle()] == ["succeeded"]

    card_b = hook(app, signing_key, base, patient_b, encounter)

    assert card_b["summary"] == "A draft discharge summary is being prepared"
    result_b = stored(app, card_b)
    assert result_b.data["job_id"] != job_a and result_b.patient_id == patient_b
    assert "pneumonia" not in page_text(app, result_b).lower()
    assert [o.state for o in Worker(app).run_until_idle()] == ["dead"]  # the encounter is not B's
    again_b = hook(app, signing_key, base, patient_b, encounter)
    assert again_b["summary"] == "The draft discharge summary could not be prepared"
    assert "encounter could not be read" in again_b["detail"]
    assert hook(app, signing_key, base, patient_a, encounter)["summary"] == (
        "A draft discharge summary is ready for your review"
    )


def test_a_wrong_patients_call_first_does_not_spoil_the_real_discharge(app, signing_key, fhir_server):
    patient_a, patient_b, encounter = new_ids()
    seed(fhir_server, patient_a, encounter)
    base = fhir_server.base_url
    hook(app, signing_key, base, patient_b, encounter)
    assert [o.state for o in Worker(app).run_until_idle()] == ["dead"]

    assert (
        hook(app, signing_key, base, patient_a, encounter)["summary"] == "A draft discharge summary is being prepared"
    )
    assert [o.state for o in Worker(app).run_until_idle()] == ["succeeded"]
    card_a = hook(app, signing_key, base, patient_a, encounter)
    assert card_a["summary"] == "A draft discharge summary is ready for your review"
    assert "Community-acquired pneumonia" in page_text(app, stored(app, card_a))


def test_the_job_page_shows_a_job_only_for_its_patient_and_fhir_server(app, signing_key, fhir_server):
    patient_a, patient_b, encounter = new_ids()
    seed(fhir_server, patient_a, encounter)
    base = fhir_server.base_url
    job_a = stored(app, hook(app, signing_key, base, patient_a, encounter)).data["job_id"]
    Worker(app).run_until_idle()
    engine = app.extensions["db"]

    def page_for(patient: str, server: str) -> str:
        # A result naming A's job, as a link stored before the patient was part of the job id could.
        result_id = results.save(
            engine,
            "discharge-summary",
            {"job_id": job_a},
            client_iss=None,
            fhir_server=server,
            patient_id=patient,
            ttl_seconds=600,
        )
        return page_text(app, results.load(engine, result_id))

    assert "Community-acquired pneumonia" in page_for(patient_a, base + "/")
    for patient, server in ((patient_b, base), (patient_a, "http://127.0.0.1:9/fhir/R4")):
        page = page_for(patient, server)
        assert "This job could not be found" in page and "Community-acquired pneumonia" not in page


def test_an_encounter_that_names_no_patient_is_not_drafted(app, signing_key, fhir_server):
    patient, _, encounter = new_ids()
    seed(fhir_server, patient, encounter, subject=False)
    hook(app, signing_key, fhir_server.base_url, patient, encounter)

    assert [o.state for o in Worker(app).run_until_idle()] == ["dead"]
    (job,) = ledger.find(app.extensions["db"], ledger.DEAD, kind="discharge-summary.draft")
    assert "the encounter could not be read" in job.last_error
    card = hook(app, signing_key, fhir_server.base_url, patient, encounter)
    assert card["indicator"] == "warning" and "encounter could not be read" in card["detail"]


@pytest.mark.parametrize("others", [0, 2])
def test_what_the_job_left_out_is_counted_in_the_audit_log(app, signing_key, fhir_server, audit_records, others):
    patient, _, encounter = new_ids()
    seed(fhir_server, patient, encounter, others=others)
    hook(app, signing_key, fhir_server.base_url, patient, encounter)
    assert [o.state for o in Worker(app).run_until_idle()] == ["succeeded"]

    (record,) = audit_records("job.fhir-screened")
    assert record["dropped"] == others and record.get("dropped_by_key") == ({"conditions": others} if others else None)
    assert record["patient"] == f"Patient/{patient}" and record["kind"] == "discharge-summary.draft"
    assert OTHER_DIAGNOSIS not in json.dumps(audit_records())


def test_paging_that_leaves_the_fhir_server_fails_the_job_at_once_not_five_times(app, signing_key, httpserver):
    """A next link off the server is the server's own answer: asking again gets the same, so no retries."""
    patient, _, encounter = new_ids()
    base = httpserver.url_for("/paging-fhir")
    httpserver.expect_request(f"/paging-fhir/Encounter/{encounter}").respond_with_json(
        {
            "resourceType": "Encounter",
            "id": encounter,
            "status": "finished",
            "subject": {"reference": f"Patient/{patient}"},
        }
    )
    httpserver.expect_request(f"/paging-fhir/Patient/{patient}").respond_with_json(
        {"resourceType": "Patient", "id": patient}
    )
    off_server = {"relation": "next", "url": "http://other.example/fhir/Condition?page=2"}
    httpserver.expect_request("/paging-fhir/Condition").respond_with_json(
        {"resourceType": "Bundle", "type": "searchset", "link": [off_server], "entry": []}
    )
    for kind in ("Procedure", "MedicationRequest", "Observation"):
        httpserver.expect_request(f"/paging-fhir/{kind}").respond_with_json(
            {"resourceType": "Bundle", "type": "searchset"}
        )

    hook(app, signing_key, base, patient, encounter)
    outcomes = Worker(app).run_until_idle()

    assert [o.state for o in outcomes] == ["dead"]
    (job,) = ledger.find(app.extensions["db"], ledger.DEAD)
    assert job.attempts == 1 and "next link points outside" in job.last_error
