"""The synthetic population generator (tests/support/population.py): deterministic, streamed, and read by the
cardiovascular-risk service as a realistic mix of scorable and unscorable patients."""

from __future__ import annotations

import json
import tracemalloc
from collections import Counter
from datetime import date

import pytest

from app.fhir.codes import (
    ASCVD,
    BP_LOWERING,
    BP_PANEL,
    CURRENT_SMOKER,
    DIABETES,
    HDL,
    NON_SMOKER,
    SMOKING_STATUS,
    SMOKING_UNKNOWN,
    STATIN,
    SYSTOLIC_BP,
    TOTAL_CHOLESTEROL,
    classify,
)
from cds_services.cardiovascular_risk import extract_inputs
from tests.support.population import (
    AS_OF,
    HYPERTENSION,
    METFORMIN,
    PREDIABETES,
    iter_population,
    patient_id,
    patient_resources,
    population_group,
    write_population,
)

FILES = ("Patient.ndjson", "Observation.ndjson", "Condition.ndjson", "MedicationRequest.ndjson", "Group.ndjson")


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def patients(n: int, seed: int = 0):
    """Each patient's resources, grouped: (patient, observations, conditions, medication requests)."""
    for index in range(1, n + 1):
        resources = patient_resources(index, seed)
        by_type = {t: [r for k, r in resources if k == t] for t in ("Observation", "Condition", "MedicationRequest")}
        yield resources[0][1], by_type["Observation"], by_type["Condition"], by_type["MedicationRequest"]


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert write_population(first, 50, seed=5) == write_population(second, 50, seed=5)
    write_population(other, 50, seed=6)
    for name in FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "Patient.ndjson").read_bytes() != (other / "Patient.ndjson").read_bytes()


def test_a_patient_is_the_same_whatever_the_population_size():
    small = [r for r in iter_population(3, seed=2) if r[1].get("id", "").startswith(patient_id(3))]
    large = [r for r in iter_population(30, seed=2) if r[1].get("id", "").startswith(patient_id(3))]
    assert small == large and small[0][0] == "Patient"


def test_counts_match_the_files_and_the_group_names_every_patient(tmp_path):
    counts = write_population(tmp_path, 120, seed=1, group_id="cohort")
    for resource_type in ("Patient", "Observation", "Condition", "MedicationRequest"):
        resources = read_lines(tmp_path / f"{resource_type}.ndjson")
        assert len(resources) == counts[resource_type] > 0
        assert {r["resourceType"] for r in resources} == {resource_type}
        assert len({r["id"] for r in resources}) == len(resources)
    [group] = read_lines(tmp_path / "Group.ndjson")
    assert counts["Group"] == 1
    assert group == population_group(120, "cohort")
    assert group["member"][0]["entity"]["reference"] == "Patient/syn-000001"
    written = read_lines(tmp_path / "Patient.ndjson") + read_lines(tmp_path / "Observation.ndjson")
    streamed = [r for t, r in iter_population(120, seed=1) if t in ("Patient", "Observation")]
    assert sorted(written, key=lambda r: r["id"]) == sorted(streamed, key=lambda r: r["id"])


def test_every_resource_refers_to_its_patient_and_has_a_last_updated_instant():
    for patient, observations, conditions, requests in patients(200):
        assert patient["meta"]["lastUpdated"].endswith("Z")
        for resource in (*observations, *conditions, *requests):
            assert resource["subject"] == {"reference": f"Patient/{patient['id']}"}
            assert resource["id"].startswith(f"{patient['id']}-")
            assert date.fromisoformat(resource["meta"]["lastUpdated"][:10]) <= AS_OF


def test_every_code_is_one_the_reader_knows():
    known_noise = {HYPERTENSION[0], PREDIABETES[0]}
    for _, observations, conditions, requests in patients(300):
        for observation in observations:
            code = observation["code"]
            assert any(s.matches(code) for s in (TOTAL_CHOLESTEROL, HDL, SYSTOLIC_BP, BP_PANEL, SMOKING_STATUS))
            if BP_PANEL.matches(code):
                assert any(SYSTOLIC_BP.matches(c["code"]) for c in observation["component"])
            if SMOKING_STATUS.matches(code):
                answer = observation["valueCodeableConcept"]
                assert any(s.matches(answer) for s in (CURRENT_SMOKER, NON_SMOKER, SMOKING_UNKNOWN))
        for condition in conditions:
            code = condition["code"]
            assert DIABETES.matches(code) or ASCVD.matches(code) or code["coding"][0]["code"] in known_noise
        for request in requests:
            concept = request["medicationCodeableConcept"]
            metformin = concept["coding"][0]["code"] == METFORMIN[0]
            assert STATIN.matches(concept) or classify(concept, BP_LOWERING) or metformin


def test_the_population_spreads_over_what_the_risk_service_reads():
    seen: Counter[str] = Counter()
    for patient, observations, conditions, requests in patients(1000):
        inputs = extract_inputs(patient, observations, conditions, requests, AS_OF)
        blocking = {p.input for p in inputs.blocking}
        seen["scorable" if not blocking else "not scorable"] += 1
        seen.update(f"missing {name}" for name in blocking & {"total_cholesterol", "hdl", "systolic_bp", "smoker"})
        seen.update(f"blocked by {name}" for name in blocking & {"deceased", "sex", "age"})
        seen[f"race {inputs.findings['race'].value}"] += 1
        for name in ("diabetes", "treated_hypertension", "smoker"):
            if name in inputs.findings and inputs.findings[name].value is True:
                seen[name] += 1
        seen["ascvd"] += bool(inputs.ascvd)
        seen["statin"] += bool(inputs.statins)
        seen["several cholesterol readings"] += sum(TOTAL_CHOLESTEROL.matches(o["code"]) for o in observations) > 1
        seen["mmol/L"] += "converted" in getattr(inputs.findings.get("total_cholesterol"), "note", "")
        seen["panel"] += any(BP_PANEL.matches(o["code"]) for o in observations)
        seen["systolic alone"] += any(SYSTOLIC_BP.matches(o["code"]) for o in observations)
        age = AS_OF.year - int(patient["birthDate"][:4])
        seen["aged 20-39"] += age < 40
        seen["aged 80+"] += age >= 81
        if 40 < age < 79 and not blocking - {"total_cholesterol", "hdl", "systolic_bp", "smoker"}:
            seen["eligible"] += 1
            seen["eligible and complete"] += not blocking
    # Most patients the equations apply to can be scored; every kind of patient is there.
    assert 0.65 < seen["eligible and complete"] / seen["eligible"] < 0.95
    assert seen["scorable"] > 300 and seen["not scorable"] > 300
    for kind in (
        "missing total_cholesterol",
        "missing hdl",
        "missing systolic_bp",
        "missing smoker",
        "blocked by deceased",
        "blocked by sex",
        "blocked by age",
        "race white",
        "race african-american",
        "race other",
        "diabetes",
        "treated_hypertension",
        "smoker",
        "ascvd",
        "statin",
        "several cholesterol readings",
        "mmol/L",
        "panel",
        "systolic alone",
        "aged 20-39",
        "aged 80+",
    ):
        assert seen[kind] >= 5, (kind, seen)


def test_writing_is_streamed_memory_does_not_grow_with_the_population(tmp_path):
    def peak(n: int) -> int:
        tracemalloc.start()
        try:
            write_population(tmp_path / str(n), n)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(250), peak(2500)
    assert large < small * 1.5 + 200_000, (small, large)


def test_a_prefix_changes_the_ids_and_nothing_else():
    plain = json.dumps(patient_resources(4, seed=9))
    prefixed = json.dumps(patient_resources(4, seed=9, prefix="other"))
    assert '"other-000004"' in prefixed and "syn-" not in prefixed
    assert prefixed.replace("other-", "syn-") == plain
    with pytest.raises(ValueError):
        patient_id(1, prefix="has space")


def test_patient_indexes_start_at_one():
    with pytest.raises(ValueError):
        patient_resources(0)
