"""The loopback FHIR R4 test server (tests/fhir_server) does what the gateway's prefetch fill-in needs."""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.support.fhir_server import FhirTestServer, FhirTestServerError, fhir_server_available

SYNTHEA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "synthea-r4"
TIMEOUT = 10

PATIENT_ID = "5b0c6c2e-1c1a-4f7e-9a63-0d6b3f1e2a10"
PATIENT_URN = f"urn:uuid:{PATIENT_ID}"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
HDL = "2085-9"
CHOLESTEROL = "2093-3"
BP_PANEL = "55284-4"
VITALS_BP_PANEL = "85354-9"
HEART_RATE = "8867-4"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"


def _uuid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def _observation(n: int, code: str, when: str, value: float, unit: str = "mg/dL", status: str = "final") -> dict:
    return {
        "fullUrl": f"urn:uuid:{_uuid(n)}",
        "resource": {
            "resourceType": "Observation",
            "id": _uuid(n),
            "status": status,
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "subject": {"reference": PATIENT_URN},
            "effectiveDateTime": when,
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
        },
        "request": {"method": "POST", "url": "Observation"},
    }


def _condition(n: int, code: str, clinical_status: str) -> dict:
    return {
        "fullUrl": f"urn:uuid:{_uuid(n)}",
        "resource": {
            "resourceType": "Condition",
            "id": _uuid(n),
            "clinicalStatus": {"coding": [{"system": CLINICAL, "code": clinical_status}]},
            "code": {"coding": [{"system": SNOMED, "code": code}]},
            "subject": {"reference": PATIENT_URN},
        },
        "request": {"method": "POST", "url": "Condition"},
    }


def small_bundle() -> dict:
    """A Patient with HDL x3, cholesterol x2, two blood-pressure panels, 25 heart rates, two Conditions."""
    entries = [
        {
            "fullUrl": PATIENT_URN,
            "resource": {
                "resourceType": "Patient",
                "id": PATIENT_ID,
                "name": [{"family": "Testperson", "given": ["Ada"]}],
                "gender": "female",
                "birthDate": "1961-04-12",
            },
            "request": {"method": "POST", "url": "Patient"},
        },
        _observation(1, HDL, "2019-03-01T09:00:00+00:00", 48.0),
        _observation(2, HDL, "2021-02-10T09:00:00-05:00", 55.0),  # the latest HDL
        _observation(3, HDL, "2020-06-15T09:00:00+02:00", 51.0),
        _observation(4, CHOLESTEROL, "2020-06-15T09:00:00+02:00", 201.0),
        _observation(5, CHOLESTEROL, "2021-02-10T09:00:00-05:00", 188.0, status="amended"),
        _observation(6, BP_PANEL, "2020-01-01T10:00:00Z", 0, unit="mm[Hg]"),
        _observation(7, VITALS_BP_PANEL, "2021-01-01T10:00:00Z", 0, unit="mm[Hg]"),
        _condition(20, "44054006", "active"),  # diabetes
        _condition(21, "38341003", "resolved"),  # hypertension
    ]
    entries += [_observation(100 + i, HEART_RATE, f"2020-01-{i + 1:02d}T08:00:00Z", 60 + i, "/min") for i in range(25)]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


@pytest.fixture(scope="module")
def server():
    reason = fhir_server_available()
    if reason:
        pytest.skip(reason)
    with FhirTestServer() as srv:
        srv.post_bundle(small_bundle())
        yield srv


def search(server: FhirTestServer, resource_type: str, **params) -> dict:
    response = requests.get(f"{server.base_url}/{resource_type}", params=params, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    return bundle


def ids(bundle: dict) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def test_binds_loopback_and_reports_base_url(server):
    parts = urlsplit(server.base_url)
    assert parts.hostname == "127.0.0.1" and parts.port == server.port and parts.path == "/fhir/R4"


def test_metadata(server):
    response = requests.get(f"{server.base_url}/metadata", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/fhir+json")
    cap = response.json()
    assert cap["resourceType"] == "CapabilityStatement" and cap["fhirVersion"] == "4.0.1"
    types = {r["type"] for r in cap["rest"][0]["resource"]}
    assert {"Patient", "Observation", "Condition", "DocumentReference"} <= types


def test_read_keeps_the_bundle_ids(server):
    patient = server.get_json(f"Patient/{PATIENT_ID}")
    assert patient["id"] == PATIENT_ID and patient["name"][0]["family"] == "Testperson"
    obs = server.get_json(f"Observation/{_uuid(2)}")
    assert obs["subject"] == {"reference": f"Patient/{PATIENT_ID}"}  # urn:uuid rewritten


def test_read_missing_is_404_operation_outcome(server):
    response = requests.get(f"{server.base_url}/Patient/does-not-exist", timeout=TIMEOUT)
    assert response.status_code == 404
    assert response.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("patient", [f"Patient/{PATIENT_ID}", PATIENT_ID])
def test_latest_by_patient_and_code(server, patient):
    bundle = search(server, "Observation", patient=patient, code=f"{LOINC}|{HDL}", _sort="-date", _count=1)
    assert bundle["total"] == 3
    assert ids(bundle) == [_uuid(2)]
    assert bundle["entry"][0]["fullUrl"] == f"{server.base_url}/Observation/{_uuid(2)}"
    assert bundle["entry"][0]["resource"]["valueQuantity"]["value"] == 55.0


def test_sort_ascending_and_descending(server):
    down = search(server, "Observation", patient=PATIENT_ID, code=HDL, _sort="-date")
    up = search(server, "Observation", patient=PATIENT_ID, code=HDL, _sort="date")
    assert ids(down) == [_uuid(2), _uuid(3), _uuid(1)]
    assert ids(up) == list(reversed(ids(down)))


def test_code_or_list_and_status(server):
    bundle = search(server, "Observation", patient=PATIENT_ID, code=f"{BP_PANEL},{VITALS_BP_PANEL}", _sort="-date")
    assert ids(bundle) == [_uuid(7), _uuid(6)]
    mixed = search(server, "Observation", patient=PATIENT_ID, code=f"{LOINC}|{CHOLESTEROL},{LOINC}|{HDL}")
    assert mixed["total"] == 5
    final = search(server, "Observation", patient=PATIENT_ID, code=CHOLESTEROL, status="final")
    assert ids(final) == [_uuid(4)]
    several = search(server, "Observation", patient=PATIENT_ID, code=CHOLESTEROL, status="final,amended")
    assert several["total"] == 2


def test_condition_clinical_status(server):
    active = search(server, "Condition", patient=f"Patient/{PATIENT_ID}", **{"clinical-status": "active"})
    assert ids(active) == [_uuid(20)]
    assert search(server, "Condition", patient=PATIENT_ID)["total"] == 2


def test_other_patient_sees_nothing(server):
    assert search(server, "Observation", patient="Patient/nobody", code=HDL)["total"] == 0


def test_paging_follows_absolute_next_links(server):
    bundle = search(server, "Observation", patient=f"Patient/{PATIENT_ID}", code=HEART_RATE, _count=10, _sort="date")
    assert bundle["total"] == 25
    seen = ids(bundle)
    pages = 1
    while True:
        links = {link["relation"]: link["url"] for link in bundle.get("link", [])}
        assert urlsplit(links["self"]).netloc == f"127.0.0.1:{server.port}"
        if "next" not in links:
            break
        nxt = urlsplit(links["next"])
        assert nxt.scheme == "http" and nxt.netloc == f"127.0.0.1:{server.port}"
        assert nxt.path == "/fhir/R4/Observation"
        response = requests.get(links["next"], timeout=TIMEOUT)
        assert response.status_code == 200
        bundle = response.json()
        seen += ids(bundle)
        pages += 1
    assert pages == 3
    assert seen == [_uuid(100 + i) for i in range(25)]  # all of them, once, in date order


def test_default_page_size_is_20_with_next_link(server):
    bundle = search(server, "Observation", patient=PATIENT_ID)
    assert bundle["total"] == 32 and len(bundle["entry"]) == 20
    links = {link["relation"]: link["url"] for link in bundle["link"]}
    assert "_offset=20" in links["next"]
    last = requests.get(links["next"], timeout=TIMEOUT).json()
    assert len(last["entry"]) == 12 and "next" not in {link["relation"] for link in last["link"]}


def test_plain_transaction_assigns_new_ids_and_resolves_references(server):
    patient_urn = "urn:uuid:7d1e0b55-6f0a-4c4e-8f1c-2f9a3c5e8b01"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_urn,
                "resource": {"resourceType": "Patient", "name": [{"family": "Plain"}]},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": "urn:uuid:7d1e0b55-6f0a-4c4e-8f1c-2f9a3c5e8b02",
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": LOINC, "code": HDL}]},
                    "subject": {"reference": patient_urn},
                    "effectiveDateTime": "2021-01-01",
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    result = server.post_bundle(bundle, keep_ids=False)
    assert result["type"] == "transaction-response"
    patient_ref = result["entry"][0]["response"]["location"]
    assert patient_ref.startswith("Patient/")
    found = search(server, "Observation", patient=patient_ref, code=HDL)
    assert found["total"] == 1


def test_conditional_create_if_none_exist(server):
    doc = {
        "resourceType": "DocumentReference",
        "status": "current",
        "identifier": [{"system": "urn:test:cds-gateway", "value": "card-123"}],
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "content": [{"attachment": {"contentType": "text/plain", "data": "aGVsbG8="}}],
    }
    headers = {"Content-Type": "application/fhir+json", "If-None-Exist": "identifier=urn:test:cds-gateway|card-123"}
    first = requests.post(f"{server.base_url}/DocumentReference", json=doc, headers=headers, timeout=TIMEOUT)
    assert first.status_code == 201, first.text
    assert first.headers["Location"].startswith(f"{server.base_url}/DocumentReference/{first.json()['id']}/")
    second = requests.post(f"{server.base_url}/DocumentReference", json=doc, headers=headers, timeout=TIMEOUT)
    assert second.status_code == 200, second.text
    assert second.json()["id"] == first.json()["id"]
    assert search(server, "DocumentReference", patient=PATIENT_ID)["total"] == 1


def test_start_failure_raises_with_stderr():
    if fhir_server_available():
        pytest.skip(fhir_server_available())
    with pytest.raises(FhirTestServerError, match="(?s)exited before it was ready.*loopback only"):
        FhirTestServer(extra_env={"FHIR_TEST_SERVER_HOST": "0.0.0.0"}).start()


def test_synthea_population(server):
    bundles = sorted((SYNTHEA_DIR / "bundles").glob("*.json"))
    if not bundles or not (SYNTHEA_DIR / "pce_patients.csv").is_file():
        pytest.skip(f"Synthea sample data not found under {SYNTHEA_DIR}")
    assert server.post_bundle_files(bundles) == len(bundles) == 67

    with open(SYNTHEA_DIR / "pce_patients.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows
    session = requests.Session()
    timings = []
    for row in rows:
        patient = server.get_json(f"Patient/{row['patient_id']}")
        assert patient["id"] == row["patient_id"]
        started = time.perf_counter()
        response = session.get(
            f"{server.base_url}/Observation",
            params={"patient": f"Patient/{row['patient_id']}", "code": f"{LOINC}|{HDL}", "_sort": "-date", "_count": 1},
            timeout=TIMEOUT,
        )
        timings.append(time.perf_counter() - started)
        assert response.status_code == 200
        bundle = response.json()
        assert bundle["total"] >= 1, row["patient_id"]
        latest = bundle["entry"][0]["resource"]
        assert latest["valueQuantity"]["value"] == pytest.approx(float(row["hdl_mg_dl"]))
        assert latest["effectiveDateTime"].startswith(row["hdl_date"])
    session.close()
    # Plain Medplum MemoryRepository took ~4 s per such search over this population; the server's
    # compartment index brings it to a few ms. A generous bound keeps the test stable on slow CI.
    assert statistics.median(timings) < 0.25, timings
