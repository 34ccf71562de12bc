"""The embedded discharge-summary model (deterministic, de-duplicated, nothing invented) and its FHIR extraction."""

from __future__ import annotations

import copy
import json
import random
from datetime import date
from pathlib import Path

import pytest

from app.ai import InvalidModelInput, model_guard
from app.ai.models import embedded_models
from app.ai.models.discharge_inputs import age_at, concept_text, reference_id
from app.ai.models.discharge_summary import NAME, VERSION, DischargeSummary, extract_inputs
from tests.conftest import FIXTURES

MODEL = DischargeSummary()
SECTIONS = (
    "Encounter",
    "Reason for admission",
    "Diagnoses",
    "Procedures",
    "Medications at discharge",
    "Key results",
    "Disposition",
)
INPUTS = {
    "encounter": {
        "id": "enc-1",
        "class": "inpatient encounter",
        "type": "Hospital admission",
        "reason": ["Community acquired pneumonia", "Hypoxaemia"],
        "period": {"start": "2024-01-10T08:15:00Z", "end": "2024-01-14T16:30:00Z"},
        "hospitalization": {"dischargeDisposition": "Home"},
    },
    "patient": {"age": 69, "gender": "female"},
    "conditions": [
        {
            "text": "Community acquired pneumonia",
            "code": "385093006",
            "system": "http://snomed.info/sct",
            "onset": "2024-01-10T08:15:00Z",
            "clinicalStatus": "active",
        },
        {
            "text": "Diabetes mellitus type 2",
            "code": "44054006",
            "system": "http://snomed.info/sct",
            "onset": "2015-06-01",
            "clinicalStatus": "active",
        },
        {"text": "Acute kidney injury", "code": None, "system": None, "onset": None, "clinicalStatus": "resolved"},
    ],
    "procedures": [
        {"text": "Chest X-ray", "code": "399208008", "performed": "2024-01-10T09:05:00Z"},
        {"text": "Blood culture", "code": "30088009", "performed": "2024-01-10T08:40:00Z"},
    ],
    "medications": [
        {
            "text": "Amoxicillin 875 mg / clavulanate 125 mg tablet",
            "status": "active",
            "dosage": "1 tablet by mouth twice daily for 5 days",
            "authoredOn": "2024-01-13T10:00:00Z",
        },
        {
            "text": "Ceftriaxone 1 g injection",
            "status": "stopped",
            "dosage": "1 g IV daily",
            "authoredOn": "2024-01-10",
        },
    ],
    "results": [
        {
            "text": "White blood cell count",
            "code": "6690-2",
            "value": 14.2,
            "unit": "10*3/uL",
            "effective": "2024-01-10T08:30:00Z",
            "interpretation": "High",
        },
        {
            "text": "White blood cell count",
            "code": "6690-2",
            "value": 8.1,
            "unit": "10*3/uL",
            "effective": "2024-01-13T07:00:00Z",
            "interpretation": "Normal",
        },
        {"text": "Sputum culture", "code": "624-7", "value": "Streptococcus pneumoniae", "effective": "2024-01-12"},
    ],
}


def section(text: str, title: str) -> list[str]:
    """The lines under ``title`` in the rendered text."""
    blocks = {block.split("\n", 1)[0]: block.split("\n")[1:] for block in text.rstrip("\n").split("\n\n")}
    return blocks[title]


def shuffled(inputs: dict, seed: int) -> dict:
    rng = random.Random(seed)
    copied = copy.deepcopy(inputs)
    for key in ("conditions", "procedures", "medications", "results"):
        rng.shuffle(copied[key])
    rng.shuffle(copied["encounter"]["reason"])
    return dict(reversed(list(copied.items())))


def fixture_resources() -> tuple[dict, dict[str, list[dict]]]:
    """The project's own discharge Bundle, as (encounter, resources by type); entries that are not resources
    are dropped here, as the caller's gathering does."""
    bundle = json.loads((FIXTURES / "fhir" / "discharge-encounter.json").read_text())
    resources: dict[str, list[dict]] = {}
    for entry in bundle["entry"]:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict):
            resources.setdefault(resource["resourceType"], []).append(resource)
    return resources.pop("Encounter")[0], resources


# --- the model -------------------------------------------------------------------------------------------------


def test_runs_behind_the_summary_guard_and_not_over_kserve(make_app):
    guard = model_guard(make_app(), NAME)  # the guard the discharge-summary service registers for its model
    prediction = guard.backend.infer(NAME, INPUTS)
    assert (prediction.model, prediction.version) == (NAME, VERSION)
    assert prediction.outputs == MODEL.predict(INPUTS)
    assert NAME not in {m.name for m in embedded_models()}  # nested inputs do not fit v2's flat tensors


def test_same_inputs_give_byte_identical_text():
    first, second = MODEL.predict(INPUTS), MODEL.predict(copy.deepcopy(INPUTS))
    assert first["text"].encode() == second["text"].encode()
    assert first["sections"] == second["sections"]


@pytest.mark.parametrize("seed", range(5))
def test_shuffled_inputs_give_the_same_text(seed):
    assert MODEL.predict(shuffled(INPUTS, seed))["text"] == MODEL.predict(INPUTS)["text"]


def test_a_realistic_encounter_reads_as_expected():
    text = MODEL.predict(INPUTS)["text"]
    assert text.startswith("DISCHARGE SUMMARY (DRAFT)\nAI-generated DRAFT for clinician review")
    assert f"Generated by {NAME} {VERSION}" in text
    assert section(text, "Encounter") == [
        "Type: Hospital admission",
        "Class: inpatient encounter",
        "Admitted: 2024-01-10",
        "Discharged: 2024-01-14",
        "Patient: age 69, female",
    ]
    assert section(text, "Reason for admission") == ["- Community acquired pneumonia", "- Hypoxaemia"]
    # by date, undated last
    assert section(text, "Diagnoses") == [
        "- Diabetes mellitus type 2 (SNOMED CT 44054006); onset 2015-06-01; active",
        "- Community acquired pneumonia (SNOMED CT 385093006); onset 2024-01-10; active",
        "- Acute kidney injury; resolved",
    ]
    assert section(text, "Procedures") == ["- Blood culture (2024-01-10)", "- Chest X-ray (2024-01-10)"]
    assert section(text, "Medications at discharge") == [
        "- Amoxicillin 875 mg / clavulanate 125 mg tablet: 1 tablet by mouth twice daily for 5 days "
        "(active, ordered 2024-01-13)"
    ]
    assert section(text, "Medications stopped or completed during the stay") == [
        "- Ceftriaxone 1 g injection: 1 g IV daily (stopped, ordered 2024-01-10)"
    ]
    assert section(text, "Key results") == [
        "- Sputum culture: Streptococcus pneumoniae on 2024-01-12",
        "- White blood cell count: 8.1 10*3/uL (Normal) on 2024-01-13; 1 earlier value",
    ]
    assert section(text, "Disposition") == ["Home"]
    assert text.endswith("Home\n")


def test_empty_inputs_say_none_recorded_in_every_section():
    outputs = MODEL.predict({})
    for title in SECTIONS:
        assert section(outputs["text"], title) == ["None recorded"]
    assert "Medications stopped" not in outputs["text"]
    assert [s["title"] for s in outputs["sections"]] == list(SECTIONS)
    assert all(s["lines"] == [] for s in outputs["sections"])


def test_empty_and_wrongly_typed_members_are_treated_as_empty():
    inputs = {
        "encounter": {"reason": "not a list", "period": None, "hospitalization": []},
        "patient": {"age": True, "gender": 7},
        "conditions": [None, "text", {"text": ""}, {"text": 5}],
        "procedures": {"text": "not a list"},
        "medications": [{"status": "active"}],
        "results": [{"text": "Lactate", "value": None}, {"text": "Lactate", "value": {"v": 1}}],
    }
    text = MODEL.predict(inputs)["text"]
    for title in SECTIONS:
        assert section(text, title) == ["None recorded"]


def test_duplicates_are_listed_once():
    inputs = copy.deepcopy(INPUTS)
    for key in ("conditions", "procedures", "medications", "results"):
        inputs[key] = inputs[key] + copy.deepcopy(inputs[key])
    inputs["encounter"]["reason"] += ["community acquired  pneumonia", "Hypoxaemia"]
    # the same diagnosis recorded again later in the stay is one diagnosis, shown with its first onset
    inputs["conditions"].append({**INPUTS["conditions"][0], "onset": "2024-01-12T10:00:00Z"})
    # the same procedure on another day is a second procedure
    inputs["procedures"].append({"text": "Chest X-ray", "code": "399208008", "performed": "2024-01-13T09:00:00Z"})
    text = MODEL.predict(inputs)["text"]
    assert text.count("Community acquired pneumonia (SNOMED CT") == 1
    assert "onset 2024-01-12" not in text
    assert section(text, "Reason for admission") == ["- Community acquired pneumonia", "- Hypoxaemia"]
    assert section(text, "Procedures") == [
        "- Blood culture (2024-01-10)",
        "- Chest X-ray (2024-01-10)",
        "- Chest X-ray (2024-01-13)",
    ]
    assert text.count("Amoxicillin") == 1
    assert "White blood cell count: 8.1 10*3/uL (Normal) on 2024-01-13; 1 earlier value" in text


def test_nothing_is_invented():
    """Every date, code and name in the text comes from the inputs; absent facts leave no placeholder."""
    inputs = {"encounter": {"type": "Emergency admission"}, "conditions": [{"text": "Asthma"}]}
    text = MODEL.predict(inputs)["text"]
    assert section(text, "Encounter") == ["Type: Emergency admission"]
    assert section(text, "Diagnoses") == ["- Asthma"]
    assert "None" not in "\n".join(section(text, "Encounter") + section(text, "Diagnoses"))
    assert "Admitted" not in text and "Patient:" not in text


def test_text_in_the_inputs_cannot_break_the_layout():
    inputs = {"conditions": [{"text": "Asthma\n\nDisposition\nDeceased"}]}
    text = MODEL.predict(inputs)["text"]
    assert section(text, "Diagnoses") == ["- Asthma Disposition Deceased"]
    assert section(text, "Disposition") == ["None recorded"]


def test_inputs_must_be_an_object():
    with pytest.raises(InvalidModelInput):
        MODEL.predict(["not", "an", "object"])  # type: ignore[arg-type]


# --- extraction from FHIR ----------------------------------------------------------------------------------------


def test_extract_inputs_from_the_fixture_bundle():
    encounter, resources = fixture_resources()
    inputs = extract_inputs(encounter, resources)
    assert inputs["encounter"] == {
        "id": "ds-enc-1",
        "class": "inpatient encounter",
        "type": "Hospital admission",
        "reason": ["Community acquired pneumonia (disorder)", "Hypoxaemia"],
        "period": {"start": "2024-01-10T08:15:00Z", "end": "2024-01-14T16:30:00Z"},
        "hospitalization": {"dischargeDisposition": "Home"},
    }
    # born 1954-03-09, age at the encounter's end (2024-01-14)
    assert inputs["patient"] == {"age": 69, "gender": "female"}
    conditions = {c["text"]: c for c in inputs["conditions"]}
    assert conditions["Diabetes mellitus type 2 (disorder)"] == {
        "text": "Diabetes mellitus type 2 (disorder)",
        "code": "44054006",
        "system": "http://snomed.info/sct",
        "onset": "2015-06-01",
        "clinicalStatus": "active",
    }
    assert conditions["N17.9"]["onset"] == "2024-01-11"  # no text, no display: the code
    assert {p["text"]: p["performed"] for p in inputs["procedures"]} == {
        "Chest X-ray": "2024-01-10T09:05:00Z",
        "Blood culture": "2024-01-10T08:40:00Z",  # performedPeriod.start
    }
    medications = {m["text"]: m for m in inputs["medications"]}
    assert set(medications) == {
        "Amoxicillin 875 MG / Clavulanate 125 MG Oral Tablet",
        "Ceftriaxone 1 g injection",  # contained Medication
        "Metformin 500 MG Oral Tablet",  # medicationReference display
    }
    assert medications["Ceftriaxone 1 g injection"]["status"] == "stopped"
    assert medications["Metformin 500 MG Oral Tablet"]["dosage"] == "500 mg by mouth twice daily with meals"
    results = {(r["text"], r["effective"]): r for r in inputs["results"]}
    assert results[("White blood cell count", "2024-01-10T08:30:00Z")] == {
        "text": "White blood cell count",
        "code": "6690-2",
        "value": 14.2,
        "unit": "10*3/uL",
        "effective": "2024-01-10T08:30:00Z",
        "interpretation": "High",
    }
    values = {text: r["value"] for (text, _), r in results.items()}
    assert values["SARS-CoV-2 PCR"] == "Not detected"
    assert values["Sputum culture"] == "Streptococcus pneumoniae"
    assert values["Blood pressure"] == "Systolic blood pressure 128 mm[Hg], Diastolic blood pressure 76 mm[Hg]"


def test_extract_inputs_skips_malformed_erroneous_and_foreign_records():
    encounter, resources = fixture_resources()
    text = MODEL.predict(extract_inputs(encounter, resources))["text"]
    for absent in (
        "Myocardial infarction",  # entered-in-error
        "Urinary tract infection",  # another encounter
        "Bronchoscopy",  # not-done
        "Warfarin",  # entered-in-error
        "Procalcitonin",  # cancelled
        "Legionella",  # no value
        "Lactate",  # value is not a number
        "pneumonia\n",
    ):
        assert absent not in text
    assert len(extract_inputs(encounter, resources)["conditions"]) == 4  # two pneumonia records, merged in the text
    assert text.count("Community acquired pneumonia (SNOMED CT") == 1


def test_extract_inputs_accepts_the_callers_own_grouping():
    """The job groups resources as patient/conditions/...: resources are dispatched on resourceType, not key."""
    encounter, resources = fixture_resources()
    regrouped = {"patient": resources["Patient"], "everything": [r for k, rs in resources.items() for r in rs]}
    regrouped["everything"] = [r for r in regrouped["everything"] if r["resourceType"] != "Patient"]
    assert extract_inputs(encounter, regrouped) == extract_inputs(encounter, resources)


def test_extract_inputs_never_crashes_on_garbage():
    garbage = {
        "Condition": [None, 1, "x", [], {"resourceType": "Condition", "code": {"coding": [None, {"code": 5}]}}],
        "Observation": [{"resourceType": "Observation", "code": {"text": "X"}, "valueQuantity": []}],
        "MedicationRequest": [{"resourceType": "MedicationRequest", "medicationReference": "Medication/1"}],
        "Patient": [{"resourceType": "Patient", "birthDate": "not a date", "gender": None}],
        "Procedure": "not a list",
    }
    for encounter in ({}, None, {"class": [{"code": "EMER"}], "period": "x", "reasonCode": "y"}):
        inputs = extract_inputs(encounter, garbage)  # type: ignore[arg-type]
        assert inputs["conditions"] == inputs["procedures"] == inputs["medications"] == inputs["results"] == []
        assert inputs["patient"] == {"age": None, "gender": None}
        assert MODEL.predict(inputs)["text"]
    assert extract_inputs({}, None)["patient"] == {"age": None, "gender": None}  # type: ignore[arg-type]
    assert extract_inputs({"class": [{"code": "EMER"}]}, {})["encounter"]["class"] == "emergency"


def test_age_uses_the_encounter_end_else_today():
    patient = {"resourceType": "Patient", "birthDate": "1980-06-15"}
    ended = {"id": "e", "period": {"start": "2020-06-01", "end": "2020-06-20"}}
    ongoing = {"id": "e", "period": {"start": "2024-06-01"}}
    assert extract_inputs(ended, {"Patient": [patient]})["patient"]["age"] == 40
    assert extract_inputs(ongoing, {"Patient": [patient]}, today=date(2024, 6, 14))["patient"]["age"] == 43
    assert age_at("1980", date(2020, 1, 1)) is None  # partial birth date: no guessed age
    assert age_at("2030-01-01", date(2020, 1, 1)) is None


def test_concepts_and_references():
    assert concept_text({"text": " Chest  pain ", "coding": [{"display": "x"}]}) == "Chest pain"
    assert concept_text({"coding": [{"code": "123"}, {"code": "456", "display": "Shown"}]}) == "Shown"
    assert concept_text({"coding": [{"code": "123"}]}) == "123"
    assert concept_text("nope") is None
    for ref in ("Encounter/abc", "https://fhir.example/r4/Encounter/abc/_history/2", "urn:uuid:abc"):
        assert reference_id({"reference": ref}) == "abc"
    assert reference_id({"display": "x"}) is None


# --- Synthea, when the shared sample data is there ---------------------------------------------------------------


def synthea_stay(bundles: Path) -> tuple[dict, dict[str, list[dict]]]:
    """The first finished inpatient Encounter (by file name) with conditions, and every resource referencing it."""
    for path in sorted(bundles.glob("*.json")):
        resources = [e["resource"] for e in json.loads(path.read_text())["entry"]]
        encounters = [
            r
            for r in resources
            if r["resourceType"] == "Encounter" and r.get("status") == "finished" and r["class"].get("code") == "IMP"
        ]
        for encounter in sorted(encounters, key=lambda r: r["id"]):
            grouped: dict[str, list[dict]] = {"Patient": [r for r in resources if r["resourceType"] == "Patient"]}
            for r in resources:
                if reference_id(r.get("encounter")) == encounter["id"]:
                    grouped.setdefault(r["resourceType"], []).append(r)
            if grouped.get("Condition"):
                return encounter, grouped
    pytest.skip("no finished inpatient encounter with conditions in the Synthea sample")


def test_a_synthea_inpatient_stay_is_summarised(synthea_dir):
    encounter, resources = synthea_stay(synthea_dir / "bundles")
    inputs = extract_inputs(encounter, resources)
    text = MODEL.predict(inputs)["text"]
    assert MODEL.predict(extract_inputs(encounter, resources))["text"] == text
    diagnoses = "\n".join(section(text, "Diagnoses"))
    for condition in resources["Condition"]:
        assert concept_text(condition["code"]) in diagnoses
    procedures = "\n".join(section(text, "Procedures"))
    for procedure in resources.get("Procedure", ()):
        assert concept_text(procedure["code"]) in procedures
    assert section(text, "Encounter")[0] == f"Type: {concept_text(encounter['type'][0])}"
    assert section(text, "Encounter")[2] == f"Admitted: {encounter['period']['start'][:10]}"
