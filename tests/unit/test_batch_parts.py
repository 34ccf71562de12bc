"""A run's work on disk: ranges on line boundaries, every patient in one bucket, steps that are done once."""

from __future__ import annotations

import csv
import stat
from datetime import date
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.ai.types import ModelUnavailable
from app.batch import outputs, parts
from app.batch.parts import Identity, Range
from app.batch.scoring import NotScored, PatientResources, Population, Scored
from app.fhir.compartment import Compartment

POPULATION = Population(
    score=lambda p: Scored(0.1, "intermediate", "toy", "1", (f"Patient/{p.patient_id}",), "Propose a statin"),
    outcome="an outcome",
    method="a method",
    categories=("low", "intermediate"),
    reasons={"age": "Age outside 40-79"},
)
IDENTITY = Identity("https://gateway.example/batch", "run-0123456789abcdef")
SERVER = "https://ehr.example/fhir"


def write(path: Path, lines: list[bytes]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path.relative_to(path.parents[1]))


def observation(i: int, patient: str) -> bytes:
    return orjson.dumps({"resourceType": "Observation", "id": f"o{i}", "subject": {"reference": f"Patient/{patient}"}})


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=120), min_size=1, max_size=60),
    part_bytes=st.integers(min_value=1, max_value=400),
)
@settings(max_examples=150, deadline=None)
def test_ranges_cover_every_line_once_and_start_on_a_line(tmp_path_factory, sizes, part_bytes):
    run = tmp_path_factory.mktemp("run")
    lines = [b"x" * size for size in sizes]
    name = write(run / "export" / "000-Observation.ndjson", lines)
    ranges = parts.plan_ranges(run, [name], part_bytes)
    data = (run / name).read_bytes()
    assert ranges[0].start == 0 and ranges[-1].end == len(data)
    assert all(a.end == b.start for a, b in zip(ranges, ranges[1:], strict=False))
    for r in ranges:
        assert r.start == 0 or data[r.start - 1 : r.start] == b"\n"
        assert r.first_line == data[: r.start].count(b"\n") + 1
        assert r.end - r.start <= part_bytes + max(sizes) + 1  # never more than asked plus one line


def test_a_split_puts_each_patient_in_one_bucket_and_reports_bad_lines(tmp_path):
    lines = [orjson.dumps({"resourceType": "Patient", "id": f"p{i}"}) for i in range(40)]
    lines += [observation(i, f"p{i % 40}") for i in range(200)]
    lines += [b"{not json", b"[1, 2]", orjson.dumps({"resourceType": "Practitioner", "id": "dr"})]
    lines += [orjson.dumps({"resourceType": "Medication", "id": "m1"})]
    name = write(tmp_path / "export" / "000-mixed.ndjson", lines)
    ranges = parts.plan_ranges(tmp_path, [name], 2_000)
    assert len(ranges) > 3
    buckets = 7
    totals = [parts.split_range(tmp_path, i, r, buckets, SERVER) for i, r in enumerate(ranges)]
    assert sum(t.lines for t in totals) == len(lines)
    assert sum(t.bad for t in totals) == 2 and sum(t.shared for t in totals) == 1
    assert sum(t.dropped for t in totals) == 1  # the Practitioner: no patient's
    assert parts.split_range(tmp_path, 0, ranges[0], buckets, SERVER) is None  # done before: not again
    found: dict[str, set[int]] = {}
    for bucket in range(buckets):
        for patient, resources in parts.bucket_patients(tmp_path, bucket, SERVER).items():
            found.setdefault(patient, set()).add(bucket)
            assert len(resources) == 6  # the Patient and its five observations
    assert sorted(found) == sorted(f"p{i}" for i in range(40))
    assert all(len(b) == 1 for b in found.values())
    bad = [orjson.loads(line) for path in sorted(tmp_path.glob("split/*/bad.ndjson")) for line in path.open("rb")]
    diagnostics = [b["issue"][0]["diagnostics"] for b in bad]
    assert diagnostics == [
        "000-mixed.ndjson line 241: not valid JSON",
        "000-mixed.ndjson line 242: not a FHIR resource (no resourceType)",
    ]
    assert "not json" not in str(bad)  # the line's content (maybe PHI) is not copied
    assert list(parts.shared_resources(tmp_path)) == ["Medication/m1"]


def test_a_step_killed_before_its_rename_leaves_nothing_half_done(tmp_path):
    final = tmp_path / "parts" / "b000001"
    with pytest.raises(RuntimeError), parts.atomic_dir(final) as out:
        (out / "RiskAssessment.ndjson").write_text("half")
        raise RuntimeError("killed")
    assert not final.exists()
    assert list((tmp_path / "parts").iterdir()) == []
    with parts.atomic_dir(final) as out:
        (out / "summary.json").write_text("{}")
    assert (final / "summary.json").is_file()
    assert stat.S_IMODE(final.stat().st_mode) == 0o700


def score_all(run: Path, buckets: int, score=POPULATION.score) -> list:
    return [
        parts.score_bucket(run, b, score, POPULATION, IDENTITY, "2026-01-01T00:00:00Z", date(2026, 1, 1), SERVER)
        for b in range(buckets)
    ]


def test_scored_buckets_merge_into_outputs_with_a_manifest(tmp_path):
    lines = [orjson.dumps({"resourceType": "Patient", "id": f"p{i:02d}"}) for i in range(30)]
    lines += [observation(1, "orphan")]  # resources of a patient the export has no Patient for
    name = write(tmp_path / "export" / "000-Patient.ndjson", lines)
    ranges = parts.plan_ranges(tmp_path, [name], 500)
    for i, r in enumerate(ranges):
        parts.split_range(tmp_path, i, r, 4, SERVER)

    def score(patient: PatientResources):
        if patient.patient_id.endswith("7"):
            return NotScored("age", "age 30 is outside 40-79")
        return POPULATION.score(patient)

    summaries = score_all(tmp_path, 4, score)
    assert sum(s.patients for s in summaries) == 31
    assert score_all(tmp_path, 4) == [None] * 4  # a bucket scored before is not scored again
    files = outputs.merge(tmp_path, 4, len(ranges))
    assert [f["name"] for f in files] == ["RiskAssessment.ndjson", "OperationOutcome.ndjson", "worklist.csv"]
    assessments = [orjson.loads(line) for line in (tmp_path / "RiskAssessment.ndjson").open("rb")]
    subjects = [a["subject"]["reference"] for a in assessments]
    assert len(subjects) == len(set(subjects)) == 27
    assert assessments[0]["identifier"][0]["value"].startswith("run-0123456789abcdef/p")
    outcomes = [orjson.loads(line) for line in (tmp_path / "OperationOutcome.ndjson").open("rb")]
    reasons = sorted(o["issue"][0]["details"]["coding"][0]["code"] for o in outcomes)
    assert reasons == ["age", "age", "age", "patient"]
    with (tmp_path / "worklist.csv").open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(parts.WORKLIST_FIELDS) and len(rows) == 28
    facts = {f["name"]: f for f in files}
    assert facts["RiskAssessment.ndjson"]["lines"] == 27
    before = (tmp_path / "RiskAssessment.ndjson").read_bytes()
    assert outputs.merge(tmp_path, 4, len(ranges)) == files  # finishing again writes the same bytes
    assert (tmp_path / "RiskAssessment.ndjson").read_bytes() == before
    assert stat.S_IMODE((tmp_path / "RiskAssessment.ndjson").stat().st_mode) == 0o600


def test_a_model_failure_writes_nothing_for_the_bucket(tmp_path):
    name = write(tmp_path / "export" / "000-Patient.ndjson", [orjson.dumps({"resourceType": "Patient", "id": "p"})])
    parts.split_range(tmp_path, 0, parts.plan_ranges(tmp_path, [name], 1000)[0], 1, SERVER)

    def down(patient):
        raise ModelUnavailable("down")

    with pytest.raises(ModelUnavailable):
        score_all(tmp_path, 1, down)
    assert not (tmp_path / "parts" / "b000000").exists()
    assert score_all(tmp_path, 1)[0].scored == 1


def test_bucket_of_is_stable_and_spreads():
    assert parts.bucket_of("abc", 10) == parts.bucket_of("abc", 10)
    counts = [0] * 10
    for i in range(10_000):
        counts[parts.bucket_of(f"patient-{i}", 10)] += 1
    assert min(counts) > 850


def test_patient_of_reads_relative_references_and_absolute_ones_on_the_export_server():
    server = Compartment(None, SERVER)
    assert parts.patient_of({"resourceType": "Patient", "id": "a"}, server) == "a"
    assert parts.patient_of({"resourceType": "Condition", "subject": {"reference": "Patient/b"}}, server) == "b"
    absolute = {"resourceType": "AllergyIntolerance", "patient": {"reference": f"{SERVER}/Patient/c/_history/2"}}
    assert parts.patient_of(absolute, server) == "c"
    assert parts.patient_of({"resourceType": "Coverage", "beneficiary": {"reference": "Patient/d"}}, server) == "d"


@pytest.mark.parametrize(
    "resource",
    [
        {"resourceType": "Condition", "subject": {"reference": "http://evil.example/fhir/Patient/p1"}},
        {"resourceType": "Observation", "subject": {"reference": "p1"}},
        {"resourceType": "Observation", "subject": {"reference": "urn:uuid:p1"}},
        {"resourceType": "Observation", "subject": {"reference": "#p1"}},
        {"resourceType": "Observation", "subject": {"identifier": {"value": "p1"}}},
        {"resourceType": "Observation", "subject": {"reference": "Group/g"}},
        {"resourceType": "MedicationRequest", "subject": [{"reference": "Patient/p1"}, {"reference": "Patient/p2"}]},
        {"resourceType": "Practitioner", "id": "dr"},
        {"resourceType": "Patient"},
        {"resourceType": "Patient", "id": 7},
        {"resourceType": "Patient", "id": "a/b"},
    ],
)
def test_patient_of_is_none_for_resources_the_hook_would_not_use(resource):
    assert parts.patient_of(resource, Compartment(None, SERVER)) is None


def test_range_round_trips_through_json():
    r = Range("export/001-Observation.ndjson", 10, 20, 3)
    assert Range.from_json(r.to_json()) == r


def test_a_patient_treated_whatever_the_risk_is_on_the_worklist_first(tmp_path):
    lines = [orjson.dumps({"resourceType": "Patient", "id": f"p{i}"}) for i in range(3)]
    name = write(tmp_path / "export" / "000-Patient.ndjson", lines)
    parts.split_range(tmp_path, 0, parts.plan_ranges(tmp_path, [name], 10_000)[0], 1, SERVER)

    def score(patient: PatientResources):
        if patient.patient_id == "p2":
            return NotScored("ascvd", "clinical ASCVD: no risk estimate", action="Propose atorvastatin 40 mg")
        return POPULATION.score(patient)

    (summary,) = score_all(tmp_path, 1, score)
    assert (summary.scored, summary.not_scored, summary.worklist) == (2, 1, 3)
    outputs.merge(tmp_path, 1, 1)
    with (tmp_path / "worklist.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["patient"], r["risk_percent"], r["action"]) for r in rows] == [
        ("p2", "", "Propose atorvastatin 40 mg"),
        ("p0", "10.0", "Propose a statin"),
        ("p1", "10.0", "Propose a statin"),
    ]


def test_a_patient_whose_record_breaks_scoring_is_not_scored_and_the_bucket_goes_on(tmp_path, caplog):
    lines = [orjson.dumps({"resourceType": "Patient", "id": f"p{i}"}) for i in range(3)]
    name = write(tmp_path / "export" / "000-Patient.ndjson", lines)
    parts.split_range(tmp_path, 0, parts.plan_ranges(tmp_path, [name], 10_000)[0], 1, SERVER)

    def score(patient: PatientResources):
        if patient.patient_id == "p1":
            raise TypeError("unhashable type: 'dict' in Jane Doe's coding")
        return POPULATION.score(patient)

    (summary,) = score_all(tmp_path, 1, score)
    assert (summary.scored, summary.not_scored, summary.reasons) == (2, 1, {parts.UNREADABLE: 1})
    (line,) = (tmp_path / "parts" / "b000000" / "OperationOutcome.ndjson").read_bytes().splitlines()
    issue = orjson.loads(line)["issue"][0]
    assert issue["diagnostics"] == "the record could not be read (TypeError)"
    assert "TypeError at" in caplog.text and "Jane Doe" not in caplog.text + str(issue)


def test_a_split_leaves_out_resources_of_no_patient_of_the_export_and_counts_them(tmp_path):
    lines = [
        orjson.dumps({"resourceType": "Patient", "id": "p1"}),
        orjson.dumps({"resourceType": "Condition", "id": "c1", "subject": {"reference": f"{SERVER}/Patient/p1"}}),
        orjson.dumps(
            {"resourceType": "Condition", "id": "c2", "subject": {"reference": "http://evil/fhir/Patient/p1"}}
        ),
        orjson.dumps({"resourceType": "Observation", "id": "o1", "subject": {"reference": "p1"}}),
        orjson.dumps({"resourceType": "Observation", "id": "o2", "subject": {"reference": "urn:uuid:p1"}}),
    ]
    name = write(tmp_path / "export" / "000-mixed.ndjson", lines)
    counts = parts.split_range(tmp_path, 0, parts.plan_ranges(tmp_path, [name], 10_000)[0], 1, SERVER)
    assert (counts.lines, counts.bad, counts.dropped) == (5, 0, 3)
    assert orjson.loads((tmp_path / "split" / "00000" / "counts.json").read_bytes())["dropped"] == 3
    ((patient, resources),) = parts.bucket_patients(tmp_path, 0, SERVER).items()
    assert patient == "p1" and [r["id"] for r in resources] == ["p1", "c1"]
