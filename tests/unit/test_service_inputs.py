"""Service inputs with provenance (app.cds.inputs): findings, problems, the latest observation, and their wording."""

from datetime import date

from app.cds.inputs import (
    INCOMPLETE,
    Finding,
    InputDisplay,
    Inputs,
    ObservedInput,
    Problem,
    age_input,
    any_of,
    condition_finding,
    incomplete_note,
    latest_observations,
    plain,
    problem_bullets,
    problem_notes,
)
from app.cds.prefetch import check_template
from app.fhir.codes import HDL, SMOKING_STATUS, CodeSet
from app.fhir.record import CHOLESTEROL, Read, Record, answer, quantity
from tests.support.fhir_builders import LOINC, concept, condition, observation

TODAY = date(2021, 4, 1)
OLD_BEFORE = date(2019, 4, 1)
HDL_INPUT = ObservedInput("hdl", "hdl", HDL, quantity("mg/dL", CHOLESTEROL), "mg/dL")


def _yes_no(value: dict) -> Read | str:
    if concept_code(value) == "Y":
        return Read(True, "yes")
    if concept_code(value) == "N":
        return Read(False, "no")
    return "not a yes or no"


def concept_code(value: dict) -> str:
    return value["coding"][0]["code"]


class Screened(Inputs):
    first = ("patient", "age")


def _shown(name, finding, esc):
    return f"{finding.value} {finding.unit}".strip() if name != "smoker" else f"{esc(finding.text)}"


DISPLAY = InputDisplay(
    labels={"hdl": "HDL cholesterol", "smoker": "Smoking status"},
    shown=_shown,
    old_after_years=2,
    date_verbs={"smoker": "recorded"},
    loinc={"hdl": ("2085-9",)},
)


# ---- findings and problems ------------------------------------------------------------------------------------


def test_blocking_problems_name_the_declared_first_inputs_first_and_notes_are_kept_apart():
    inputs = Screened(
        problems=[
            Problem("hdl", "no HDL"),
            Problem("age", "no age"),
            Problem(INCOMPLETE, "some pages missing", blocking=False),
            Problem("patient", "no patient"),
            Problem("sex", "no sex"),
        ]
    )
    assert [p.input for p in inputs.blocking] == ["patient", "age", "hdl", "sex"]
    assert [p.message for p in inputs.notes] == ["some pages missing"]
    assert [p.input for p in Inputs(problems=inputs.problems).blocking] == ["hdl", "age", "patient", "sex"]


def test_add_files_a_finding_under_its_input_and_a_problem_among_the_problems():
    inputs = Inputs()
    inputs.add("age", Finding(55, "years"))
    inputs.add("sex", Problem("sex", "sex not recorded"))
    assert inputs.findings == {"age": Finding(55, "years")}
    assert inputs.problems == [Problem("sex", "sex not recorded")]


def test_values_and_basis_follow_the_names_given_and_cite_each_resource_once():
    inputs = Inputs(patient_id="p1")
    inputs.findings = {
        "hdl": Finding(50, "mg/dL", source="Observation/o1"),
        "sex": Finding("male", source="Patient.gender"),
        "diabetes": Finding(True, source="Condition/c1, Condition/c2"),
        "bp": Finding(True, source="Observation/o1"),
    }
    assert inputs.values(["sex", "hdl", "missing"]) == {"sex": "male", "hdl": 50}
    assert inputs.basis(["hdl", "sex", "diabetes", "bp"]) == (
        "Patient/p1",
        "Observation/o1",
        "Condition/c1",
        "Condition/c2",
    )
    assert Inputs().basis(["hdl"]) == ()


def test_a_finding_is_cited_with_its_words_source_and_iso_date():
    cited = Finding(True, date=date(2019, 5, 1), source="MedicationRequest/m1", text="atorvastatin").cited()
    assert cited == {"text": "atorvastatin", "source": "MedicationRequest/m1", "date": "2019-05-01"}
    assert Finding(True).cited()["date"] is None


# ---- the latest observation -------------------------------------------------------------------------------------


def test_the_latest_usable_value_is_found_with_its_source_and_date_and_newer_unusable_ones_are_noted():
    record = Record(
        [
            observation("2085-9", 45, "mg/dL", "2018-01-10", id="old"),
            observation("2085-9", 1.3, "mmol/L", "2020-06-01", id="used"),
            observation("2085-9", 50, "furlongs", "2021-01-10", id="bad-unit"),
        ]
    )
    inputs = Inputs()
    inputs.read_latest(HDL_INPUT, record, OLD_BEFORE)
    found = inputs.findings["hdl"]
    assert (found.unit, found.date, found.source, found.old) == ("mg/dL", date(2020, 6, 1), "Observation/used", False)
    assert round(found.value, 2) == 50.27 and found.note == "converted from 1.3 mmol/L"
    assert [(p.input, p.blocking) for p in inputs.problems] == [("hdl", False)]
    [skipped] = inputs.problems  # the record id is kept apart from the words a card shows
    assert skipped.message == "a newer HDL cholesterol was not used (2021-01-10): unit 'furlongs' is not recognised"
    assert skipped.source == "Observation/bad-unit"


def test_a_value_measured_before_the_cut_off_is_marked_old():
    inputs = Inputs()
    inputs.read_latest(HDL_INPUT, Record([observation("2085-9", 45, "mg/dL", "2018-01-10")]), OLD_BEFORE)
    assert inputs.findings["hdl"].old is True


def test_no_value_is_picked_from_results_at_the_same_instant_that_disagree():
    record = Record(
        [
            observation("2085-9", 40, "mg/dL", "2020-06-01T10:00:00Z", id="a"),
            observation("2085-9", 60, "mg/dL", "2020-06-01T10:00:00Z", id="b"),
        ]
    )
    inputs = Inputs()
    inputs.read_latest(HDL_INPUT, record, OLD_BEFORE)
    assert "hdl" not in inputs.findings
    [problem] = inputs.blocking
    assert problem.message == "HDL cholesterol results at the same time on 2020-06-01 disagree: 40 vs 60 mg/dL"


def test_results_at_the_same_instant_that_agree_to_the_decimal_shown_are_one_value():
    record = Record(
        [
            observation("2085-9", 40.01, "mg/dL", "2020-06-01T10:00:00Z", id="a"),
            observation("2085-9", 40.04, "mg/dL", "2020-06-01T10:00:00Z", id="b"),
        ]
    )
    inputs = Inputs()
    inputs.read_latest(HDL_INPUT, record, OLD_BEFORE)
    assert inputs.findings["hdl"].source == "Observation/a" and not inputs.problems


def test_coded_answers_that_disagree_at_the_same_instant_are_named_by_their_words():
    smoker = ObservedInput("smoker", "smoking", SMOKING_STATUS, answer(_yes_no))
    record = Record(
        [
            observation("72166-2", concept("Y", "urn:test"), when="2020-06-01", id="a"),
            observation("72166-2", concept("N", "urn:test"), when="2020-06-01", id="b"),
        ]
    )
    inputs = Inputs()
    inputs.read_latest(smoker, record, OLD_BEFORE)
    assert inputs.blocking[0].message.endswith("disagree: no vs yes")


def test_an_absent_input_is_reported_as_absent_or_as_unusable():
    inputs = Inputs()
    inputs.read_latest(HDL_INPUT, Record([]), OLD_BEFORE)
    inputs.read_latest(
        ObservedInput("tc", "tc", CodeSet.of("total cholesterol", LOINC, ["2093-3"]), quantity("mg/dL")),
        Record([observation("2093-3", 200, "", "2020-01-01", id="x")]),
        OLD_BEFORE,
    )
    assert [(p.message, p.source) for p in inputs.blocking] == [
        ("no HDL cholesterol in the record", ""),
        ("total cholesterol not usable (2020-01-01): no unit", "Observation/x"),
    ]


def test_an_input_whose_prefetch_key_could_not_be_fetched_is_reported_as_unseen_not_absent():
    inputs = Inputs()
    inputs.read_observations([HDL_INPUT], Record([]), OLD_BEFORE, unavailable={"hdl"})
    assert [(p.input, p.message) for p in inputs.problems] == [("hdl", "HDL cholesterol could not be fetched")]
    found = Inputs()
    found.read_observations([HDL_INPUT], Record([observation("2085-9", 45, "mg/dL")]), OLD_BEFORE, {"hdl"})
    assert "hdl" in found.findings and not found.problems


def test_latest_observations_is_a_valid_optional_first_page_template_sorted_newest_first():
    key = latest_observations(CodeSet.of("HDL", LOINC, ["2085-9"]), count=3)
    assert key.template == (
        "Observation?patient={{context.patientId}}&code=http://loinc.org|2085-9&_sort=-date&_count=3"
    )
    assert (key.required, key.pages) == (False, "first")
    check_template(key.template)


# ---- conditions, yes/no inputs, age ---------------------------------------------------------------------------


def test_a_condition_is_a_dated_cited_yes_and_any_of_joins_several():
    diabetes = condition("44054006", "Type 2 diabetes", id="c1")
    found = condition_finding(diabetes)
    assert found == Finding(True, "", date(2015, 6, 1), "Condition/c1", "Type 2 diabetes")
    other = Finding(True, "", date(2016, 1, 1), "Condition/c2", "Diabetes, insulin")
    assert any_of([found, other], "Condition", "none") == Finding(
        True, "", date(2015, 6, 1), "Condition/c1, Condition/c2", "Type 2 diabetes; Diabetes, insulin"
    )
    assert any_of([], "Condition", "no active diabetes") == Finding(False, "", None, "Condition", "no active diabetes")


def test_age_from_a_complete_birth_date_is_exact():
    assert age_input("1960-05-02", TODAY, (40, 79)) == Finding(60, "years", None, "Patient.birthDate", "1960-05-02")


def test_age_from_a_partial_birth_date_is_the_age_certainly_reached_when_every_possible_age_is_allowed():
    found = age_input("1960", TODAY, (40, 79))
    assert (found.value, found.note) == (60, "at least 60: the birth date (1960) is partial")
    straddling = age_input("1941", TODAY, (40, 79))
    assert straddling == Problem("age", "age 79 or 80 (birth date 1941 is partial) may be outside 40–79")
    assert age_input("1960-13", TODAY, (40, 79)).input == "age"
    assert age_input(None, TODAY, (40, 79)) == Problem("age", "no usable birth date in the record")


# ---- wording ----------------------------------------------------------------------------------------------------


def test_incomplete_note_names_the_keys_in_the_services_order_or_is_none():
    words = {"patient": "the patient record", "hdl": "HDL results", "meds": "medications"}
    assert incomplete_note([], words) is None
    assert incomplete_note({"unknown"}, words) is None
    note = incomplete_note({"meds", "patient", "hdl"}, words)
    assert note == Problem(
        INCOMPLETE,
        "The patient record, HDL results and medications may be incomplete: not every page could be read from the EHR",
        blocking=False,
    )
    assert incomplete_note(["meds"], words).message.startswith("Medications may be incomplete")


def test_problems_become_escaped_markdown_bullets_and_notes():
    problems = [Problem("x", "value <b>*bold*</b>")]
    assert problem_bullets(problems) == [r"- value &lt;b&gt;\*bold\*&lt;/b&gt;"]
    assert problem_notes(problems) == ["\nNote: value &lt;b&gt;\\*bold\\*&lt;/b&gt;"]


def test_a_card_line_shows_label_value_date_escaped_note_and_age():
    finding = Finding(True, "", date(2020, 1, 2), "Observation/s", "smokes *daily*", "from a <panel>", old=True)
    assert DISPLAY.line("smoker", finding) == (
        r"- **Smoking status:** smokes \*daily\*, recorded 2020-01-02; from a &lt;panel&gt; — **older than 2 years**"
    )
    assert DISPLAY.line("hdl", Finding(50, "mg/dL")) == "- **HDL cholesterol:** 50 mg/dL"
    inputs = Inputs(findings={"smoker": Finding(False, text="never"), "hdl": Finding(50, "mg/dL"), "x": Finding(1)})
    assert DISPLAY.lines(inputs) == ["- **HDL cholesterol:** 50 mg/dL", "- **Smoking status:** never"]


def test_explanation_entries_keep_the_records_words_unescaped_and_list_the_codes_to_recheck():
    inputs = Inputs(
        findings={"smoker": Finding(date(2020, 1, 1), "", date(2020, 1, 2), "Observation/s", "smokes *daily*")},
        problems=[Problem("hdl", "no HDL cholesterol in the record"), Problem(INCOMPLETE, "partial", False)],
    )
    explained = DISPLAY.explained(inputs, inputs.blocking)
    assert explained["inputs"] == [
        {
            "name": "smoker",
            "label": "Smoking status",
            "value": "2020-01-01",  # not JSON: stored as text
            "display": "smokes *daily*",
            "unit": "",
            "date": "2020-01-02",
            "date_kind": "recorded",
            "source": "Observation/s",
            "note": "",
            "old": False,
            "loinc": [],
        }
    ]
    assert explained["missing"] == [
        {"input": "hdl", "label": "HDL cholesterol", "message": "no HDL cholesterol in the record"}
    ]
    assert explained["notes"] == ["partial"]
    assert DISPLAY.codes() == {"loinc_system": LOINC, "loinc": {"hdl": ["2085-9"]}}


def test_plain_keeps_json_values_and_writes_anything_else_as_text():
    assert [plain(v) for v in ("a", 1, 2.5, True, None)] == ["a", 1, 2.5, True, None]
    assert plain(date(2020, 1, 1)) == "2020-01-01"
