"""The shared FHIR record reader: codes, concept text, dates, units, latest values, statuses and medications."""

from datetime import UTC, date, datetime, timedelta

import pytest

from app.cds.request import HookRequest
from app.cds.service import ServiceCall
from app.fhir import record as fr
from app.fhir.codes import (
    BP_LOWERING,
    DIABETES,
    HDL,
    ICD10,
    STATIN,
    SYSTOLIC_BP,
    TOTAL_CHOLESTEROL,
    US_CORE_ETHNICITY,
    US_CORE_RACE,
    CodeSet,
    classify,
)
from app.fhir.record import CHOLESTEROL, Read, Record, answer, quantity
from tests.support.fhir_builders import (
    CLINICAL,
    RXNORM,
    SNOMED,
    VERIFICATION,
    bp_panel,
    bundle,
    concept,
    condition,
    medication,
    medication_request,
    observation,
)

MG_DL = quantity("mg/dL", CHOLESTEROL)

# ---- codes and text -------------------------------------------------------------------------------------------


def test_code_sets_are_named_immutable_and_match_concepts_and_codings():
    assert TOTAL_CHOLESTEROL.name == "total cholesterol"
    assert TOTAL_CHOLESTEROL.matches(concept("14647-2"))
    assert TOTAL_CHOLESTEROL.matches({"system": "http://loinc.org", "code": "2093-3"})  # a bare Coding
    assert not TOTAL_CHOLESTEROL.matches(concept("2093-3", system="http://example.org/local"))
    assert not TOTAL_CHOLESTEROL.matches("2093-3") and not TOTAL_CHOLESTEROL.matches(None)
    with pytest.raises(AttributeError):
        TOTAL_CHOLESTEROL.name = "other"  # type: ignore[misc]
    assert {TOTAL_CHOLESTEROL: 1}[TOTAL_CHOLESTEROL] == 1  # hashable


def test_icd10_categories_and_unions():
    assert DIABETES.matches(concept("E11.9", system=ICD10[0]))
    assert DIABETES.matches(concept("e10", system=ICD10[1]))
    assert not DIABETES.matches(concept("R73.03", system=ICD10[0]))  # prediabetes
    assert not DIABETES.matches(concept("15777000", system=SNOMED))
    both = TOTAL_CHOLESTEROL | HDL
    assert both.matches(concept("2085-9")) and both.matches(concept("2093-3"))
    assert both.in_system("http://loinc.org") == ("2093-3", "14647-2", "2085-9", "14646-4")


def test_concept_text_prefers_text_then_display_then_code():
    assert fr.concept_text(concept("1", display="Shown", text="  Written \n here ")) == "Written here"
    assert fr.concept_text(concept("1", display="Shown")) == "Shown"
    # Only the discharge reader fell back to the code before; every reader does now.
    assert fr.concept_text(concept("44054006", system=SNOMED)) == "44054006"
    assert fr.concept_text({}) is None and fr.concept_text("text") is None


def test_references():
    assert fr.reference_id({"reference": "http://x/fhir/Medication/m1/_history/2"}) == "m1"
    assert fr.reference_id({"reference": "urn:uuid:abc-1"}) == "abc-1"
    assert fr.reference_type({"reference": "Medication/m1"}) == "Medication"
    assert fr.reference_type({"reference": "#m1"}) is None


# ---- dates ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "moment", "day"),
    [
        ("2020", datetime(2020, 1, 1, tzinfo=UTC), date(2020, 1, 1)),
        ("2020-06", datetime(2020, 6, 1, tzinfo=UTC), date(2020, 6, 1)),
        ("2020-06-15", datetime(2020, 6, 15, tzinfo=UTC), date(2020, 6, 15)),
        ("2020-06-15T10:00:00", datetime(2020, 6, 15, 10, tzinfo=UTC), date(2020, 6, 15)),  # naive: UTC
        ("2020-06-15T23:00:00-05:00", datetime(2020, 6, 16, 4, tzinfo=UTC), date(2020, 6, 15)),  # date as written
        ("2020-06-15T10:00:00Z", datetime(2020, 6, 15, 10, tzinfo=UTC), date(2020, 6, 15)),
    ],
)
def test_fhir_dates_are_aware_and_keep_the_written_day(value, moment, day):
    when = fr.parse_when(value)
    assert when.moment == moment and when.moment.tzinfo is not None and when.day == day


@pytest.mark.parametrize("value", ["", "June 2020", "2020-13-01", "2021-02-30", None, 2020])
def test_unreadable_dates_are_none(value):
    assert fr.parse_when(value) is None


def test_effective_prefers_datetime_then_period_end_then_start_then_issued():
    obs = observation("2093-3", 200, "mg/dL", when=None)
    assert fr.effective(obs) is None
    obs["issued"] = "2021-03-01T00:00:00Z"
    assert fr.effective(obs).day == date(2021, 3, 1)
    obs["effectivePeriod"] = {"start": "2021-01-01", "end": "2021-01-02"}
    assert fr.effective(obs).day == date(2021, 1, 2) and fr.effective_text(obs) == "2021-01-02"
    obs["effectiveDateTime"] = "2020-12-31"
    assert fr.effective(obs).day == date(2020, 12, 31)


# ---- units ----------------------------------------------------------------------------------------------------


def test_cholesterol_converts_between_mass_and_molar_units_with_its_molar_mass():
    assert fr.convert(5.5, "mmol/L", "mg/dL", CHOLESTEROL) == pytest.approx(212.685)
    assert fr.convert(212.685, "mg/dL", "mmol/L", CHOLESTEROL) == pytest.approx(5.5)
    assert fr.convert(200, "MG/DL", "mg/dL") == 200.0
    assert fr.convert(120, "mmHg", "mm[Hg]") == fr.convert(120, "mm [Hg]", "mm[Hg]") == 120.0
    assert fr.convert(7.1, "%", "%") == 7.1


def test_units_that_cannot_convert_give_none_never_a_guess():
    assert fr.convert(5.5, "mmol/L", "mg/dL") is None  # no analyte, no molar mass
    assert fr.convert(200, "mg/dL", "mm[Hg]", CHOLESTEROL) is None
    assert fr.convert(200, "g/L", "mg/dL", CHOLESTEROL) is None
    assert fr.convert(200, "", "mg/dL") is None


def test_a_quantity_read_in_a_unit_says_why_it_cannot_be():
    read = fr.quantity_in({"value": 5.5, "unit": "mmol/L"}, "mg/dL", CHOLESTEROL)
    assert read == Read(pytest.approx(212.685), "", "converted from 5.5 mmol/L")
    assert fr.quantity_in({"value": 20, "comparator": "<", "unit": "mg/dL"}, "mg/dL") == ("the value is <20, not exact")
    assert fr.quantity_in({"value": "high", "unit": "mg/dL"}, "mg/dL") == "no numeric value"
    assert fr.quantity_in({"value": True, "unit": "mg/dL"}, "mg/dL") == "no numeric value"
    assert fr.quantity_in({"value": 200}, "mg/dL") == "no unit"
    assert fr.quantity_in({"value": 200, "unit": "g/L"}, "mg/dL", CHOLESTEROL) == "unit 'g/L' is not recognised"


# ---- latest observation ---------------------------------------------------------------------------------------


def test_latest_is_by_instant_not_by_order():
    observations = [
        observation("2093-3", 180, "mg/dL", "2019-03-01"),
        observation("2093-3", 240, "mg/dL", "2020-11-30T23:00:00-05:00"),  # 2020-12-01 04:00 UTC
        observation("2093-3", 200, "mg/dL", "2020-12-01T02:00:00+00:00"),
    ]
    latest = Record(observations).latest(TOTAL_CHOLESTEROL, MG_DL)
    assert (latest.reading.value, latest.reading.day) == (240.0, date(2020, 11, 30))
    assert latest.conflicting() == [] and latest.skipped == ()


def test_two_values_at_the_same_latest_time_are_a_conflict_the_service_decides():
    a = observation("2093-3", 176.21, "mg/dL", "2021-01-10", id="a")
    b = observation("2093-3", 5.5, "mmol/L", "2021-01-10", id="b")
    latest = Record([a, b]).latest(TOTAL_CHOLESTEROL, MG_DL)
    assert [r.ref for r in latest.conflicting()] == ["Observation/a", "Observation/b"]
    same = observation("2093-3", 176.24, "mg/dL", "2021-01-10", id="c")
    nearly = Record([a, same]).latest(TOTAL_CHOLESTEROL, MG_DL)
    assert len(nearly.conflicting()) == 2  # exact values differ...
    assert nearly.conflicting(lambda r: round(r.value, 1)) == []  # ...but agree to the decimal shown


def test_newer_unusable_values_are_skipped_and_reported():
    usable = observation("2085-9", 47, "mg/dL", "2021-01-10")
    censored = observation("2085-9", 20, "mg/dL", "2021-02-01", id="censored")
    censored["valueQuantity"]["comparator"] = "<"
    no_value = observation("2085-9", None, when="2021-03-01")  # not a candidate at all
    latest = Record([usable, censored, no_value]).latest(HDL, MG_DL)
    assert latest.reading.value == 47.0
    assert [(s.ref, s.reason) for s in latest.skipped] == [("Observation/censored", "the value is <20, not exact")]
    nothing = Record([censored]).latest(HDL, MG_DL)
    assert nothing.reading is None and len(nothing.skipped) == 1


@pytest.mark.parametrize(
    ("status", "used"),
    [
        ("final", True),
        ("amended", True),
        ("corrected", True),
        ("preliminary", True),
        (None, True),
        ("entered-in-error", False),
        ("cancelled", False),
        ({"code": "final"}, False),
    ],
)
def test_one_status_rule_for_observations(status, used):
    obs = observation("2093-3", 200, "mg/dL")
    if status is None:
        del obs["status"]
    else:
        obs["status"] = status
    assert fr.usable_observation(obs) is used
    assert (Record([obs]).latest(TOTAL_CHOLESTEROL, MG_DL).reading is not None) is used


def test_systolic_pressure_is_read_from_a_panel_component_or_alone():
    panel = bp_panel(141, when="2021-01-10")
    alone = observation("8480-6", 150, "mmHg", "2020-01-10")
    latest = Record([alone, panel]).latest(SYSTOLIC_BP, quantity("mm[Hg]"))
    assert (latest.reading.value, latest.reading.ref) == (141.0, "Observation/bp-2021-01-10")
    assert fr.elements(panel, SYSTOLIC_BP) == [panel["component"][1]]


def test_coded_answers_are_interpreted_by_the_service():
    def interpret(value):
        return Read(True, fr.concept_text(value)) if fr.first_code(value)[0] == "77176002" else "not recognised"

    smoker = observation("72166-2", concept("77176002", SNOMED, "Smoker"), when="2021-01-01")
    unknown = observation("72166-2", concept("266927001", SNOMED), when="2021-02-01")
    latest = Record([smoker, unknown]).latest(CodeSet.of("smoking", "http://loinc.org", ["72166-2"]), answer(interpret))
    assert (latest.reading.value, latest.reading.text) == (True, "Smoker")
    assert [s.reason for s in latest.skipped] == ["not recognised"]


# ---- conditions -----------------------------------------------------------------------------------------------


def test_active_conditions_follow_clinical_and_verification_status():
    active = condition("44054006", "Type 2 diabetes", id="active")
    resolved = condition("44054006", "Type 2 diabetes", status="resolved", id="resolved")
    abated = {**condition("44054006", status=None, id="abated"), "abatementDateTime": "2019-01-01"}
    unstated = condition("44054006", status=None, id="unstated")
    refuted = {**condition("44054006", id="refuted"), "verificationStatus": concept("refuted", VERIFICATION)}
    in_error = {**condition("44054006", id="err"), "verificationStatus": {"text": "entered-in-error"}}
    relapse = condition("46635009", status="relapse", id="relapse")
    other = condition("15777000", "Prediabetes", id="other")
    record = Record([active, resolved, abated, unstated, refuted, in_error, relapse, other])
    assert [c["id"] for c in record.active_conditions(DIABETES)] == ["active", "unstated", "relapse"]
    assert len(record.active_conditions()) == 4
    assert fr.onset(active).day == date(2015, 6, 1)
    assert CLINICAL in active["clinicalStatus"]["coding"][0]["system"]


# ---- medications ----------------------------------------------------------------------------------------------


def test_medications_by_class_and_by_code():
    by_code = medication_request(code="617310", id="coded")  # no name: the RxNorm code says statin
    by_name = medication_request("Lipitor 10 mg", id="named")
    eye_drops = medication_request("timolol 0.5% ophthalmic solution", id="drops")
    stopped = medication_request("simvastatin 20 MG", status="stopped", id="stopped")
    proposal = {**medication_request("simvastatin 20 MG", id="proposal"), "intent": "proposal"}
    record = Record([by_code, by_name, eye_drops, stopped, proposal])
    assert [m.ref for m in record.active_medications(STATIN)] == ["MedicationRequest/coded", "MedicationRequest/named"]
    assert [m.text for m in record.active_medications(STATIN)] == ["617310", "Lipitor 10 mg"]
    assert classify(eye_drops["medicationCodeableConcept"], BP_LOWERING) is None
    combination = concept(text="losartan / hydrochlorothiazide")
    assert classify(combination, BP_LOWERING).name == "angiotensin receptor blocker"  # the first name written
    assert classify(concept("5487", RXNORM), BP_LOWERING).name == "thiazide diuretic"
    assert STATIN.matches(concept(text="ATORVASTATIN")) and not STATIN.matches(concept(text="statins class"))


def test_medication_references_resolve_to_contained_or_supplied_medications():
    contained = medication_request(
        id="contained", medicationReference={"reference": "#med"}, contained=[medication("med", "Valsartan 80 MG")]
    )
    supplied = medication_request(id="supplied", medicationReference={"reference": "Medication/atorva/_history/1"})
    absolute = medication_request(id="absolute", medicationReference={"reference": "urn:uuid:atorva"})
    missing = medication_request(id="missing", medicationReference={"reference": "Medication/elsewhere"})
    dangling = medication_request(id="dangling", medicationReference={"reference": "#gone"})
    no_code = medication_request(id="nocode", medicationReference={"reference": "Medication/blank"})
    record = Record(
        [
            contained,
            supplied,
            absolute,
            missing,
            dangling,
            no_code,
            medication("atorva", "atorvastatin 20 MG"),
            {"resourceType": "Medication", "id": "blank"},
        ]
    )
    uses = {u.request["id"]: u for u in record.medication_requests()}
    assert uses["contained"].text == "Valsartan 80 MG"
    assert uses["supplied"].text == uses["absolute"].text == "atorvastatin 20 MG"
    assert uses["missing"].concept is None and "Medication/elsewhere" in uses["missing"].why
    assert uses["dangling"].why == "refers to contained #gone, which is not there"
    assert uses["nocode"].why == "refers to Medication/blank, which has no code"
    assert uses["supplied"].start.day == date(2019, 5, 1)
    assert [u.ref for u in record.active_medications(STATIN)] == [
        "MedicationRequest/supplied",
        "MedicationRequest/absolute",
    ]


# ---- the record over a hook call ------------------------------------------------------------------------------


def test_a_record_reads_a_calls_prefetch_in_key_order():
    prefetch = {
        "patient": {"resourceType": "Patient", "id": "p1"},
        "labs": bundle(observation("2093-3", 200, "mg/dL", id="o1")),
        "meds": bundle(medication_request("atorvastatin", id="m1"), {"resourceType": "OperationOutcome"}),
        "broken": "not a resource",
    }
    request = HookRequest(
        hook="patient-view",
        hook_instance="0b8f9a3e-2b5c-4a53-9d3c-3c0c6a3a6f10",
        context={"userId": "Practitioner/d1", "patientId": "p1"},
        prefetch=prefetch,
    )
    record = Record.from_call(ServiceCall(request=request, prefetch=prefetch))
    assert record.patient["id"] == "p1"
    assert record.latest(TOTAL_CHOLESTEROL, MG_DL).reading.ref == "Observation/o1"
    assert [m.ref for m in record.active_medications(STATIN)] == ["MedicationRequest/m1"]
    assert Record.from_call(ServiceCall(request=request, prefetch=prefetch), ["labs"]).patient is None


def test_the_latest_of_many_observations_in_any_order():
    observations = [
        observation("2093-3", 150 + i % 50, "mg/dL", (datetime(2000, 1, 1, tzinfo=UTC) + timedelta(days=i)).isoformat())
        for i in range(2000)
    ]
    latest = Record(observations[::-1]).latest(TOTAL_CHOLESTEROL, MG_DL)
    assert latest.reading.day == date(2005, 6, 22)
    assert latest.reading.when.moment.tzinfo == UTC


@pytest.mark.parametrize(
    ("birth_date", "least", "most"),
    [
        ("1960-05-15", 66, 66),
        (" 1960-05-16 ", 65, 65),  # the day before the birthday
        ("1960-05", 65, 66),  # born in May 1960: 65 or 66 on 15 May 2026
        ("1960-04", 66, 66),  # a whole month already past
        ("1960", 65, 66),
        ("2000-02-29", 26, 26),
    ],
)
def test_age_on_a_day_from_a_full_or_partial_birth_date(birth_date, least, most):
    age = fr.age_on(birth_date, date(2026, 5, 15))
    assert (age.least, age.most, age.written) == (least, most, birth_date.strip())


@pytest.mark.parametrize(
    ("birth_date", "why"),
    [
        (None, "no usable birth date in the record"),
        (19600515, "no usable birth date in the record"),
        ("1960-05-15T10:00:00Z", "no usable birth date in the record"),
        ("15/05/1960", "no usable birth date in the record"),
        ("1960-02-30", "birth date '1960-02-30' is not a valid date"),
        ("1960-13", "birth date '1960-13' is not a valid date"),
    ],
)
def test_an_unreadable_birth_date_says_why(birth_date, why):
    assert fr.age_on(birth_date, date(2026, 5, 15)) == why


def test_deceased_by_flag_or_date():
    assert fr.deceased({"deceasedBoolean": True}) and fr.deceased({"deceasedDateTime": "2025-01-01"})
    assert not fr.deceased({"deceasedBoolean": False}) and not fr.deceased({"deceasedBoolean": "true"})
    assert not fr.deceased({})


def _us_core(url, *parts):
    return {"url": url, "extension": list(parts)}


def test_us_core_race_and_ethnicity_categories_and_text():
    patient = {
        "resourceType": "Patient",
        "extension": [
            "not an extension",
            {"url": "http://example.org/other", "valueString": "x"},
            _us_core(
                US_CORE_RACE,
                {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3"}},
                {"url": "ombCategory", "valueCoding": {"code": "2054-5"}},
                {"url": "ombCategory", "valueCoding": {"display": "no code"}},
                {"url": "detailed", "valueCoding": {"code": "2108-9"}},
                {"url": "text", "valueString": "White and Black"},
                "malformed part",
            ),
            _us_core(US_CORE_ETHNICITY, {"url": "ombCategory", "valueCoding": {"code": "2135-2"}}),
        ],
    }
    assert fr.us_core_category(patient) == (["2106-3", "2054-5"], "White and Black")
    assert fr.us_core_category(patient, US_CORE_ETHNICITY) == (["2135-2"], "")
    assert fr.us_core_category({"resourceType": "Patient"}) == ([], "")


def test_a_code_set_as_a_token_search_keeps_its_order_across_systems():
    both = CodeSet.of("panel", "http://loinc.org", ("85354-9",)) | CodeSet.of("sbp", SNOMED, ("271649006",))
    assert both.search_token() == "http://loinc.org|85354-9,http://snomed.info/sct|271649006"
    assert HDL.search_token() == "http://loinc.org|2085-9,http://loinc.org|14646-4"
