"""The cardiovascular-risk service: reading the record into PCE inputs, and the card built from them."""

import csv
import json
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from fhir.resources.R4B.medicationrequest import MedicationRequest
from markdown_it import MarkdownIt

import app.ai
from app.ai import ModelUnavailable, Prediction
from app.cds.prefetch import check_template
from app.cds.request import HookRequest
from app.cds.service import ServiceCall, get_service
from cds_services import cardiovascular_risk as service
from cds_services.cardiovascular_risk import (
    PREFETCH,
    CardOptions,
    build_cards,
    explanation,
    extract_inputs,
    fallback,
    needs_risk,
)
from tests.support.assertions import assert_no_empty_members
from tests.support.models import model_app

TODAY = date(2021, 4, 1)
SYNTHEA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "synthea-r4"
RACE_URL = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SUBJECT = {"reference": "Patient/p1"}


# ---- FHIR resources authored for these tests ------------------------------------------------------------------


def patient(birth="1966-02-01", gender="male", race="2106-3", race_text="White", **extra):
    resource = {"resourceType": "Patient", "id": "p1", "birthDate": birth, "gender": gender, **extra}
    if race:
        resource["extension"] = [
            {
                "url": RACE_URL,
                "extension": [
                    {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": race}},
                    {"url": "text", "valueString": race_text},
                ],
            }
        ]
    return resource


def quantity(value, unit):
    return {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}


def lab(code, value, unit, when, oid=None):
    return {
        "resourceType": "Observation",
        "id": oid or f"{code}-{when}",
        "status": "final",
        "subject": SUBJECT,
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "effectiveDateTime": when,
        "valueQuantity": quantity(value, unit),
    }


def bp_panel(systolic, when, panel="55284-4", oid=None):
    component = [
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
            "valueQuantity": quantity(80, "mm[Hg]"),
        },
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
            "valueQuantity": quantity(systolic, "mm[Hg]"),
        },
    ]
    return {
        "resourceType": "Observation",
        "id": oid or f"bp-{when}",
        "status": "final",
        "subject": SUBJECT,
        "code": {"coding": [{"system": "http://loinc.org", "code": panel}]},
        "effectiveDateTime": when,
        "component": component,
    }


def smoking(code, when="2021-01-10", display="Never smoker"):
    return {
        "resourceType": "Observation",
        "id": f"smoking-{when}",
        "status": "final",
        "subject": SUBJECT,
        "code": {"coding": [{"system": "http://loinc.org", "code": "72166-2"}]},
        "effectiveDateTime": when,
        "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]},
    }


def condition(code, display, status="active", system="http://snomed.info/sct", oid=None):
    resource = {
        "resourceType": "Condition",
        "id": oid or f"c-{code}",
        "subject": SUBJECT,
        "code": {"coding": [{"system": system, "code": code, "display": display}], "text": display},
        "onsetDateTime": "2015-06-01",
    }
    if status:
        resource["clinicalStatus"] = {"coding": [{"system": CLINICAL, "code": status}]}
    return resource


def med(text, code=None, status="active", oid=None):
    concept = {"text": text}
    if code:
        concept["coding"] = [{"system": RXNORM, "code": code, "display": text}]
    return {
        "resourceType": "MedicationRequest",
        "id": oid or f"m-{text[:10]}",
        "subject": SUBJECT,
        "status": status,
        "intent": "order",
        "authoredOn": "2019-05-01",
        "medicationCodeableConcept": concept,
    }


def observations(tc=213, hdl=50, sbp=120, smoker_code="266919005"):
    return [
        lab("2093-3", tc, "mg/dL", "2021-01-10"),
        lab("2085-9", hdl, "mg/dL", "2021-01-10"),
        bp_panel(sbp, "2021-01-10"),
        smoking(smoker_code),
    ]


def extract(pt=None, obs=None, conditions=(), meds=(), unavailable=()):
    return extract_inputs(
        pt or patient(), observations() if obs is None else obs, list(conditions), list(meds), TODAY, unavailable
    )


def predict(inputs):
    flask_app = model_app()
    with flask_app.app_context():
        return app.ai.infer("ascvd-pce", inputs.model_inputs())


def cards_for(inputs, info_cards=False):
    """The cards the hook gives: the model is asked only when the patient's group needs the risk."""
    return build_cards(inputs, predict(inputs) if needs_risk(inputs) else None, CardOptions(info_cards=info_cards))


def card_for(inputs, info_cards=False):
    cards = cards_for(inputs, info_cards)
    assert len(cards) == 1
    return cards[0]


def problems(inputs, blocking=True):
    return [p.message for p in inputs.problems if p.blocking is blocking]


# ---- extraction -----------------------------------------------------------------------------------------------


def test_the_worked_example_patient_is_read_completely():
    inputs = extract()
    assert inputs.blocking == []
    assert inputs.model_inputs() == {
        "age": 55,
        "sex": "male",
        "race": "white",
        "total_cholesterol": 213.0,
        "hdl": 50.0,
        "systolic_bp": 120.0,
        "smoker": False,
        "diabetes": False,
        "treated_hypertension": False,
    }
    assert round(predict(inputs).outputs["risk"] * 100, 1) == 5.4


def test_latest_observation_by_effective_date_is_used_whatever_the_order():
    obs = (
        [
            lab("2093-3", 180, "mg/dL", "2019-03-01"),
            lab("2093-3", 240, "mg/dL", "2020-11-30T23:00:00-05:00"),  # 2020-12-01 04:00 UTC: the latest
            lab("2093-3", 200, "mg/dL", "2020-12-01T02:00:00+00:00"),
            lab("2093-3", 150, "mg/dL", "2018-01-01"),
        ]
        + observations()[1:]
    )
    finding = extract(obs=obs).findings["total_cholesterol"]
    assert (finding.value, finding.date, finding.source) == (
        240.0,
        date(2020, 11, 30),
        "Observation/2093-3-2020-11-30T23:00:00-05:00",
    )


def test_a_newer_observation_without_a_value_is_skipped():
    empty = {**lab("2085-9", 0, "mg/dL", "2021-03-01"), "dataAbsentReason": {"text": "not done"}}
    del empty["valueQuantity"]
    entered_in_error = {**lab("2085-9", 99, "mg/dL", "2021-03-02"), "status": "entered-in-error"}
    obs = [*observations(hdl=47), empty, entered_in_error]
    finding = extract(obs=obs).findings["hdl"]
    assert (finding.value, finding.date) == (47.0, date(2021, 1, 10))


def test_systolic_pressure_is_read_from_the_55284_4_panel_component():
    obs = observations()[:2] + [bp_panel(141.5, "2020-05-05"), bp_panel(133, "2019-05-05"), smoking("266919005")]
    finding = extract(obs=obs).findings["systolic_bp"]
    assert (finding.value, finding.unit, finding.date) == (141.5, "mmHg", date(2020, 5, 5))


def test_systolic_pressure_is_read_from_the_85354_9_vital_signs_panel():
    obs = observations()[:2] + [bp_panel(152, "2020-05-05", panel="85354-9"), smoking("266919005")]
    assert extract(obs=obs).findings["systolic_bp"].value == 152.0


def test_systolic_pressure_alone_8480_6_is_read():
    obs = observations()[:2] + [lab("8480-6", 128, "mm[Hg]", "2020-07-07"), smoking("266919005")]
    assert extract(obs=obs).findings["systolic_bp"].value == 128.0


def test_cholesterol_in_mmol_per_litre_is_converted_to_mg_per_dl():
    obs = [lab("2093-3", 5.5, "mmol/L", "2021-01-10"), lab("2085-9", 1.3, "mmol/l", "2021-01-10")] + observations()[2:]
    inputs = extract(obs=obs)
    assert inputs.findings["total_cholesterol"].value == pytest.approx(5.5 * 38.67)
    assert inputs.findings["hdl"].value == pytest.approx(1.3 * 38.67)
    assert inputs.findings["total_cholesterol"].unit == "mg/dL"
    assert "converted from 5.5 mmol/L" in inputs.findings["total_cholesterol"].note
    assert "mmol/L" in card_for(inputs).detail


def test_a_censored_value_is_not_used_as_exact():
    censored = lab("2085-9", 20, "mg/dL", "2021-01-10")
    censored["valueQuantity"]["comparator"] = "<"
    inputs = extract(obs=[observations()[0], censored, *observations()[2:]])
    assert "hdl" not in inputs.findings
    [problem] = inputs.blocking
    assert problem.message == "HDL cholesterol not usable (2021-01-10): the value is <20, not exact"
    assert problem.source == "Observation/2085-9-2021-01-10"  # for the explanation page, never on the card


def test_lowercase_mg_dl_spelling_is_accepted():
    obs = [lab("2093-3", 190, "mg/dl", "2021-01-10")] + observations()[1:]
    assert extract(obs=obs).findings["total_cholesterol"].value == 190.0


def test_an_unknown_unit_is_a_problem_not_a_guess():
    obs = [lab("2093-3", 2.1, "g/L", "2021-01-10")] + observations()[1:]
    inputs = extract(obs=obs)
    assert "total_cholesterol" not in inputs.findings
    assert any("total cholesterol not usable" in m and "'g/L'" in m for m in problems(inputs))
    assert card_for(inputs).summary.startswith("10-year ASCVD risk not calculated: total cholesterol not usable")


def test_a_newer_value_in_an_unknown_unit_is_reported_and_the_older_usable_one_used():
    obs = [lab("2093-3", 2.1, "g/L", "2021-02-10"), lab("2093-3", 201, "mg/dL", "2020-06-01")] + observations()[1:]
    inputs = extract(obs=obs)
    assert inputs.findings["total_cholesterol"].value == 201.0
    assert inputs.blocking == []
    assert any("newer total cholesterol was not used" in m for m in problems(inputs, blocking=False))
    assert "newer total cholesterol was not used" in card_for(inputs).detail


def test_missing_hdl_prevents_the_risk_and_says_so_in_the_summary():
    inputs = extract(obs=[o for o in observations() if o["code"]["coding"][0]["code"] != "2085-9"])
    card = card_for(inputs)
    assert card.summary == "10-year ASCVD risk not calculated: no HDL cholesterol in the record"
    assert card.indicator == "info"
    assert card.detail == "Missing or not usable:\n- no HDL cholesterol in the record"  # short: what is missing
    assert card.suggestions == []


def test_an_unavailable_prefetch_key_is_reported_as_not_seen():
    inputs = extract(
        obs=[o for o in observations() if o["code"]["coding"][0]["code"] != "2085-9"],
        unavailable={"hdl", "medications"},
    )
    assert "HDL cholesterol could not be fetched" in problems(inputs)
    assert any("medications could not be fetched" in m for m in problems(inputs))


@pytest.mark.parametrize(
    ("code", "smoker"),
    [
        ("449868002", True),
        ("428041000124106", True),
        ("77176002", True),
        ("65568007", True),
        ("428071000124103", True),
        ("428061000124105", True),
        ("8517006", False),
        ("266919005", False),
    ],
)
def test_smoking_status_codes(code, smoker):
    assert extract(obs=observations(smoker_code=code)).findings["smoker"].value is smoker


@pytest.mark.parametrize("code", ["266927001", "999999"])
def test_unknown_smoking_status_is_a_problem(code):
    inputs = extract(obs=observations(smoker_code=code))
    assert "smoker" not in inputs.findings
    assert any(m.startswith("smoking status not usable") for m in problems(inputs))


@pytest.mark.parametrize(
    ("conditions", "diabetic"),
    [
        ([condition("44054006", "Diabetes mellitus type 2")], True),
        ([condition("46635009", "Diabetes mellitus type 1", status="relapse")], True),
        ([condition("368581000119106", "Neuropathy due to type 2 diabetes mellitus")], True),
        ([condition("E11.9", "Type 2 diabetes", system="http://hl7.org/fhir/sid/icd-10-cm")], True),
        ([condition("73211009", "Diabetes mellitus", status=None)], True),
        ([condition("15777000", "Prediabetes")], False),
        ([condition("714628002", "Prediabetes")], False),
        ([condition("44054006", "Diabetes mellitus type 2", status="resolved")], False),
        (
            [
                {
                    **condition("44054006", "Diabetes"),
                    "verificationStatus": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                "code": "entered-in-error",
                            }
                        ]
                    },
                }
            ],
            False,
        ),
        ([condition("38341003", "Hypertension")], False),
    ],
)
def test_diabetes_comes_from_active_diabetes_conditions_only(conditions, diabetic):
    assert extract(conditions=conditions).findings["diabetes"].value is diabetic


def test_prediabetes_is_not_diabetes_even_next_to_other_conditions():
    inputs = extract(conditions=[condition("15777000", "Prediabetes"), condition("38341003", "Hypertension")])
    assert inputs.findings["diabetes"].value is False
    assert inputs.model_inputs()["diabetes"] is False


@pytest.mark.parametrize(
    ("meds", "treated"),
    [
        ([med("Hydrochlorothiazide 25 MG", "316049")], True),
        ([med("lisinopril 10 MG Oral Tablet")], True),
        ([med("AMLODIPINE besylate 5 mg")], True),
        ([med("Losartan Potassium 50 MG Oral Tablet")], True),
        ([med("24 HR metoprolol succinate 100 MG Extended Release Oral Tablet [Toprol]", "866414")], True),
        ([med("Lasix 40mg", "315971")], True),
        ([med("Chlorthalidone 25 MG Oral Tablet")], True),
        ([med("Hydrochlorothiazide 25 MG", "316049", status="stopped")], False),
        ([med("Timolol 0.5 % Ophthalmic Solution")], False),
        ([med("Naproxen sodium 220 MG Oral Tablet", "849574")], False),
        ([], False),
    ],
)
def test_treated_hypertension_from_active_bp_lowering_medication(meds, treated):
    assert extract(meds=meds).findings["treated_hypertension"].value is treated


def test_a_contained_medication_is_resolved():
    request = {
        "resourceType": "MedicationRequest",
        "id": "m1",
        "status": "active",
        "intent": "order",
        "contained": [{"resourceType": "Medication", "id": "med", "code": {"text": "Valsartan 80 MG Oral Tablet"}}],
        "medicationReference": {"reference": "#med"},
    }
    inputs = extract(meds=[request])
    assert inputs.findings["treated_hypertension"].value is True
    assert inputs.findings["treated_hypertension"].text == "Valsartan 80 MG Oral Tablet (angiotensin receptor blocker)"


def test_a_medication_included_in_the_bundle_is_resolved():
    request = {
        "resourceType": "MedicationRequest",
        "id": "m1",
        "status": "active",
        "intent": "order",
        "medicationReference": {"reference": "Medication/atorva"},
    }
    medication = {"resourceType": "Medication", "id": "atorva", "code": {"text": "Atorvastatin 40 MG Oral Tablet"}}
    inputs = extract(meds=[request, medication])
    assert [s.text for s in inputs.statins] == ["Atorvastatin 40 MG Oral Tablet"]


def test_an_external_medication_reference_is_noted_not_a_crash():
    request = {
        "resourceType": "MedicationRequest",
        "id": "m1",
        "status": "active",
        "intent": "order",
        "medicationReference": {"reference": "Medication/elsewhere"},
    }
    inputs = extract(meds=[request])
    assert inputs.blocking == []
    [note] = [p for p in inputs.problems if p.input == "treated_hypertension"]
    assert note.blocking is False
    assert note.message.startswith("an active medication order names no readable medication")
    assert note.source == "MedicationRequest/m1"
    assert inputs.statin_status_known is False
    detail = card_for(inputs).detail
    assert "Note: an active medication order names no readable medication" in detail
    assert "MedicationRequest/" not in detail and "Medication/elsewhere" not in detail  # no record ids on cards


@pytest.mark.parametrize(
    ("meds", "statin"),
    [
        ([med("Simvastatin 20 MG Oral Tablet", "312961")], True),
        ([med("Simvistatin 10 MG", "316672")], True),  # Synthea's spelling: found by its RxNorm code
        ([med("rosuvastatin calcium 10 MG")], True),
        ([med("Atorvastatin 20 MG", status="completed")], False),
        ([med("Ezetimibe 10 MG Oral Tablet")], False),
    ],
)
def test_active_statins_are_found(meds, statin):
    assert bool(extract(meds=meds).statins) is statin


@pytest.mark.parametrize(
    ("code", "race", "note"),
    [
        ("2106-3", "white", ""),
        ("2054-5", "african-american", ""),
        ("2135-2", "other", "ethnicity"),
        ("2028-9", "other", "neither white nor African American"),
        (None, "other", "no race recorded"),
    ],
)
def test_race_from_the_us_core_extension(code, race, note):
    finding = extract(pt=patient(race=code)).findings["race"]
    assert finding.value == race
    assert note in finding.note
    if race == "other":
        assert "equations for white individuals are used" in finding.note


def test_race_2135_2_is_named_on_the_card_and_explained_on_the_page():
    inputs = extract(pt=patient(race="2135-2", race_text="Other"))
    assert "| Patient | 55 years, male, Other (white equations) |  |" in card_for(inputs).detail
    data = explanation(inputs, predict(inputs), made_at=datetime.now(UTC))
    [race] = [item for item in data["inputs"] if item["name"] == "race"]
    assert "Hispanic or Latino" in race["note"] and "equations for white individuals are used" in race["note"]


@pytest.mark.parametrize(
    ("birth", "age"),
    [("1966-02-01", 55), ("1966-04-01", 55), ("1966-04-02", 54), ("1981-04-01", 40), ("1941-04-02", 79)],
)
def test_age_in_whole_years_at_today(birth, age):
    assert extract(pt=patient(birth=birth)).findings["age"].value == age


def test_a_partial_birth_date_uses_the_age_certainly_reached():
    finding = extract(pt=patient(birth="1966")).findings["age"]
    assert finding.value == 54  # born in 1966: 54 or 55 on 2021-04-01
    assert "partial" in finding.note
    assert extract(pt=patient(birth="1966-03")).findings["age"].value == 55


def test_a_partial_birth_date_at_the_edge_of_the_range_is_not_guessed():
    inputs = extract(pt=patient(birth="1981"))  # 39 or 40
    assert "age" not in inputs.findings
    assert any("may be outside 40–79" in m for m in problems(inputs))


@pytest.mark.parametrize(("birth", "age"), [("1936-01-01", 85), ("1982-01-01", 39)])
def test_outside_every_groups_ages_there_is_no_card_unless_the_site_asks(birth, age):
    inputs = extract(pt=patient(birth=birth))
    assert "age outside" not in str(inputs.findings)
    assert [p.message for p in inputs.blocking] == [f"age {age} years is outside 40–79"]
    assert cards_for(inputs) == []
    card = card_for(inputs, info_cards=True)
    assert card.summary == f"Cardiovascular risk not assessed: no statin benefit group applies at age {age}"
    assert card.indicator == "info" and not card.suggestions and "%" not in card.summary


def test_outside_the_ages_missing_values_make_no_card_either():
    inputs = extract(pt=patient(birth="1936-01-01"), obs=[])
    assert cards_for(inputs) == []
    assert card_for(inputs, info_cards=True).summary.endswith("at age 85")


@pytest.mark.parametrize("gender", ["other", "unknown", None])
def test_sex_other_than_female_or_male_is_a_problem(gender):
    inputs = extract(pt=patient(gender=gender))
    assert any("the equations need female or male" in m for m in problems(inputs))


def test_deceased_patients_get_no_card_unless_the_site_asks():
    for pt in (patient(deceasedDateTime="2020-01-01"), patient(deceasedBoolean=True)):
        inputs = extract(pt=pt, conditions=[condition("22298006", "Myocardial infarction")])
        assert cards_for(inputs) == []
        card = card_for(inputs, info_cards=True)
        assert card.summary == "Cardiovascular risk not assessed: the patient is recorded as deceased"


def test_values_older_than_two_years_are_flagged_old():
    obs = [lab("2093-3", 213, "mg/dL", "2019-03-31")] + observations()[1:]
    inputs = extract(obs=obs)
    assert inputs.findings["total_cholesterol"].old is True
    assert inputs.findings["hdl"].old is False
    card = card_for(inputs)
    assert card.summary.endswith("; values over 2 years old")  # once, in the summary
    assert "| Total cholesterol | 213 mg/dL | 2019-03-31 |" in card.detail and "older" not in card.detail


def test_the_age_at_which_values_are_old_is_a_setting():
    obs = [lab("2093-3", 213, "mg/dL", "2019-03-31")] + observations()[1:]
    inputs = extract_inputs(patient(), obs, [], [], TODAY, old_after_years=3)
    assert inputs.findings["total_cholesterol"].old is False
    [card] = build_cards(inputs, predict(inputs), CardOptions(old_after_years=3))
    assert "old" not in card.summary
    older = extract_inputs(
        patient(), [lab("2093-3", 213, "mg/dL", "2018-03-31")] + obs[1:], [], [], TODAY, old_after_years=3
    )
    [card] = build_cards(older, predict(older), CardOptions(old_after_years=3))
    assert card.summary.endswith("; values over 3 years old")


def test_out_of_range_values_are_problems():
    inputs = extract(obs=observations(sbp=210))
    assert problems(inputs) == ["systolic blood pressure 210 mmHg is outside 90–200"]


def test_results_at_the_same_instant_that_disagree_are_a_conflict_not_a_choice():
    obs = [
        lab("2093-3", 176, "mg/dL", "2020-04-13T06:19:07+00:00", oid="a"),
        lab("2093-3", 291, "mg/dL", "2020-04-13T06:19:07Z", oid="b"),
    ] + observations()[1:]
    for ordered in (obs, obs[::-1]):
        inputs = extract(obs=ordered)
        assert "total_cholesterol" not in inputs.findings
        assert problems(inputs) == [
            "total cholesterol results at the same time on 2020-04-13 disagree: 176 vs 291 mg/dL"
        ]


def test_identical_duplicates_at_the_same_instant_are_not_a_conflict():
    obs = [
        lab("2093-3", 176, "mg/dL", "2020-04-13T06:19:07+00:00", oid="a"),
        lab("2093-3", 176, "mg/dL", "2020-04-13T06:19:07+00:00", oid="b"),
    ] + observations()[1:]
    assert extract(obs=obs).findings["total_cholesterol"].value == 176.0


# ---- cards ----------------------------------------------------------------------------------------------------


def _high_risk(meds=(), conditions=()):
    """A 65-year-old white man, TC 250, HDL 40, SBP 150: 21.6 %; with a statin or ASCVD as given."""
    return extract(
        pt=patient(birth="1955-06-01"), obs=observations(tc=250, hdl=40, sbp=150), meds=meds, conditions=conditions
    )


def test_a_risk_card_has_every_input_in_a_table_with_value_unit_and_date():
    card = card_for(extract())
    assert card.summary == "10-year ASCVD risk 5.4 % (borderline): discuss a statin if risk enhancers are present"
    assert card.indicator == "info"
    assert card.detail.splitlines()[2:12] == [
        "| Input | Value | Date |",
        "| --- | --- | --- |",
        "| Patient | 55 years, male, White |  |",
        "| Total cholesterol | 213 mg/dL | 2021-01-10 |",
        "| HDL cholesterol | 50 mg/dL | 2021-01-10 |",
        "| LDL cholesterol | not on record |  |",
        "| Systolic blood pressure | 120 mmHg | 2021-01-10 |",
        "| Blood-pressure treatment | no |  |",
        "| Smoking status | not a current smoker (Never smoker) | 2021-01-10 |",
        "| Diabetes | no |  |",
    ]
    assert "Statin" not in card.detail.splitlines()[2:12]  # not an input of the equations
    assert card.source.label == "ACC/AHA Pooled Cohort Equations 2013 (ascvd-pce 2013.1)"
    assert card.source.url.startswith("https://doi.org/10.1161/")


def test_a_high_intensity_statin_is_proposed_at_20_percent_or_more_without_an_active_statin():
    card = card_for(_high_risk())
    assert card.summary == "10-year ASCVD risk 21.6 % (high): high-intensity statin recommended"
    assert card.indicator == "warning"
    assert card.selectionBehavior == "at-most-one"
    [suggestion] = card.suggestions
    assert suggestion.isRecommended is True
    assert suggestion.label == "Propose atorvastatin 40 mg daily (high-intensity statin)"
    [action] = suggestion.actions
    assert action.type == "create"
    resource = action.resource
    assert resource["status"] == "draft" and resource["intent"] == "proposal"
    assert resource["subject"] == {"reference": "Patient/p1"}
    assert resource["medicationCodeableConcept"]["coding"][0] == {
        "system": RXNORM,
        "code": "617311",
        "display": "atorvastatin 40 MG Oral Tablet",
    }
    assert resource["reasonCode"][0]["text"].startswith("10-year ASCVD risk 21.6 %")
    MedicationRequest.model_validate(resource)  # a valid R4 resource


def test_no_statin_suggestion_below_7_5_percent():
    card = card_for(extract())
    assert card.suggestions == [] and card.selectionBehavior is None


def test_no_statin_suggestion_when_a_statin_is_active_and_the_card_says_so_in_one_line():
    card = card_for(_high_risk(meds=[med("Simvastatin 20 MG Oral Tablet", "312961")]))
    assert card.summary == "10-year ASCVD risk 21.6 % (high): statin already active"
    assert card.indicator == "info"
    assert card.suggestions == [] and card.overrideReasons == []
    [line] = [line for line in card.detail.splitlines() if "Statin" in line]
    assert line == (
        "Statin already active: Simvastatin 20 MG Oral Tablet, so none is proposed; "
        "primary prevention at 40-75 calls for high intensity."
    )


def test_with_clinical_ascvd_the_equations_are_not_used_and_a_high_intensity_statin_is_proposed():
    inputs = _high_risk(conditions=[condition("22298006", "Myocardial infarction")])
    assert not needs_risk(inputs)
    card = card_for(inputs)
    assert card.summary == "Clinical ASCVD on record: high-intensity statin recommended"
    assert "%" not in card.summary
    assert card.suggestions[0].label == "Propose atorvastatin 40 mg daily (high-intensity statin)"
    assert "| Clinical ASCVD | Myocardial infarction | since 2015-06-01 |" in card.detail
    assert "estimate a first event" in card.detail


def test_cards_serialise_with_uuids_and_no_empty_members():
    for inputs in (extract(), _high_risk(), extract(pt=patient(birth="1930-01-01"))):
        body = card_for(inputs, info_cards=True).to_json()
        assert_no_empty_members(body)
        assert len(body["uuid"]) == 36
        assert all(len(s["uuid"]) == 36 for s in body.get("suggestions", []))
        assert len(body["summary"]) < 140
        assert body["source"]["label"]
        json.dumps(body)


def test_record_text_is_escaped_in_the_detail():
    hostile = "<img src=x onerror=alert(1)> *Lisinopril* [click](http://evil)"
    inputs = extract(meds=[med(hostile)], pt=patient(race="2028-9", race_text="<b>Asian</b>"))
    detail = card_for(inputs).detail
    assert "<img" not in detail and "<b>" not in detail
    assert "&lt;img" in detail and "&lt;b&gt;Asian" in detail
    assert "\\*Lisinopril\\*" in detail and "[click\\](http://evil)" in detail  # no emphasis, no link
    rendered = MarkdownIt("commonmark").enable("table").render(detail)
    assert "<em>" not in rendered and "<a " not in rendered and "<img" not in rendered


def test_a_long_reason_keeps_the_summary_under_140_characters():
    obs = [lab("2093-3", 2.1, "x" * 200, "2021-01-10")] + observations()[1:]
    inputs = extract(obs=obs, pt=patient(gender="unknown"))
    card = card_for(inputs)
    assert len(card.summary) < 140
    assert card.summary.endswith("more)")


def test_no_prediction_without_blocking_problems_still_gives_a_card():
    [card] = build_cards(extract(), None)
    assert card.summary.startswith("10-year ASCVD risk not calculated")


# ---- the service as the framework runs it ---------------------------------------------------------------------


def _bundle(resources):
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def _call(prefetch, unavailable=frozenset(), incomplete=frozenset()):
    request = HookRequest(
        hook="patient-view",
        hook_instance="0b8f9a3e-2b5c-4a53-9d3c-3c0c6a3a6f10",
        context={"userId": "Practitioner/d1", "patientId": "p1"},
        prefetch=prefetch,
    )
    return ServiceCall(request=request, prefetch=prefetch, unavailable=unavailable, incomplete=incomplete)


def _prefetch():
    obs = observations(tc=250, hdl=40, sbp=150)
    return {
        "patient": patient(birth="1955-06-01"),
        "totalCholesterol": _bundle([obs[0]]),
        "hdl": _bundle([obs[1]]),
        "bloodPressure": _bundle([obs[2]]),
        "smoking": _bundle([obs[3]]),
        "conditions": _bundle([condition("15777000", "Prediabetes")]),
        "medications": None,
    }


@pytest.fixture
def app_context(monkeypatch):
    monkeypatch.setattr(service, "today", lambda: TODAY)
    flask_app = model_app()
    with flask_app.app_context():
        yield flask_app


def test_the_service_is_declared_with_its_prefetch():
    declared = get_service("cardiovascular-risk")
    assert declared is not None and declared.hook == "patient-view" and declared.fallback is fallback
    entry = declared.discovery_entry()
    assert entry["prefetch"]["patient"] == "Patient/{{context.patientId}}"
    assert entry["prefetch"]["bloodPressure"] == (
        "Observation?patient={{context.patientId}}&code=http://loinc.org|55284-4,http://loinc.org|85354-9,"
        "http://loinc.org|8480-6&_sort=-date&_count=5"
    )
    assert [k for k, v in PREFETCH.items() if v.required] == ["patient"]
    for key in PREFETCH.values():
        check_template(key.template)
        _, _, query = key.template.partition("?")
        for param in filter(None, query.split("&")):
            assert param.split("=")[0] in {"patient", "code", "status", "_sort", "_count"}


def test_the_service_computes_the_risk_from_prefetch(app_context):
    [card] = service.cardiovascular_risk(_call(_prefetch()))
    assert card.summary.startswith("10-year ASCVD risk ") and "(high)" in card.summary
    assert len(card.suggestions) == 1


def test_the_service_says_what_it_could_not_see(app_context):
    prefetch = {k: v for k, v in _prefetch().items() if k != "medications"}
    [card] = service.cardiovascular_risk(_call(prefetch, unavailable=frozenset({"medications"})))
    assert card.summary == (
        "10-year ASCVD risk not calculated: medications could not be fetched, so blood-pressure treatment and "
        "statins are unknown"
    )


def test_a_model_failure_reaches_the_framework_which_falls_back(app_context, monkeypatch):
    class Down:
        def infer(self, model, inputs, timeout=None):
            raise ModelUnavailable("unavailable")

    guard = app_context.extensions["ai_guard"]
    monkeypatch.setattr(guard, "backend", Down())
    call = _call(_prefetch())
    with pytest.raises(ModelUnavailable):
        service.cardiovascular_risk(call)
    [card] = fallback(call, "timed out")
    assert card.summary == "Cardiovascular risk unavailable (timed out): estimate with the ACC/AHA risk calculator"
    assert card.indicator == "info"
    assert card.source.label.endswith("(AI result unavailable: timed out)")
    assert card.links and card.links[0].url.startswith("https://")
    assert "| Total cholesterol | 250 mg/dL | 2021-01-10 |" in card.detail
    assert "No statin is active." in card.detail.splitlines()
    assert len(card.summary) < 140


def test_the_fallback_is_quiet_for_a_patient_the_service_does_not_apply_to(monkeypatch):
    monkeypatch.setattr(service, "today", lambda: TODAY)
    assert fallback(_call({**_prefetch(), "patient": patient(birth="1936-01-01")}), "timed out") == []


def test_the_fallback_gives_the_ordinary_card_to_a_group_that_needs_no_risk(monkeypatch):
    monkeypatch.setattr(service, "today", lambda: TODAY)
    prefetch = {**_prefetch(), "conditions": _bundle([condition("22298006", "Myocardial infarction")])}
    [card] = fallback(_call(prefetch), "timed out")
    assert card.summary == "Clinical ASCVD on record: high-intensity statin recommended"


def test_the_fallback_answers_even_without_usable_prefetch(monkeypatch):
    monkeypatch.setattr(service, "today", lambda: TODAY)
    [card] = fallback(_call({}), "overloaded")
    assert "overloaded" in card.summary
    assert card.to_json()["uuid"]


def test_the_statin_proposal_always_names_the_context_patient(app_context):
    call = _call(_prefetch())
    call.prefetch["patient"] = {**call.prefetch["patient"], "id": "someone-else"}  # whatever a resource says
    [card] = service.cardiovascular_risk(call)
    [action] = card.suggestions[0].actions
    assert action.resource["subject"] == {"reference": "Patient/p1"}


def test_the_observation_searches_need_only_their_first_page_and_the_lists_every_page():
    pages = {key: spec.pages for key, spec in PREFETCH.items() if key != "patient"}
    assert pages == {
        "totalCholesterol": "first",
        "hdl": "first",
        "ldl": "first",
        "bloodPressure": "first",
        "smoking": "first",
        "conditions": "all",
        "medications": "all",
    }
    for key in ("totalCholesterol", "hdl", "ldl", "bloodPressure", "smoking"):
        assert "_sort=-date" in PREFETCH[key].template  # why the first page is enough
    discovered = get_service("cardiovascular-risk").discovery_entry()["prefetch"]
    assert discovered == {key: spec.template for key, spec in PREFETCH.items()}  # discovery keeps its shape


def test_incomplete_inputs_are_named_in_one_line_and_the_risk_is_still_given(app_context):
    prefetch = {**_prefetch(), "medications": _bundle([])}
    [card] = service.cardiovascular_risk(_call(prefetch, incomplete=frozenset({"conditions", "medications"})))
    assert card.summary.startswith("10-year ASCVD risk ") and "not calculated" not in card.summary
    lines = [line for line in card.detail.splitlines() if "may be incomplete" in line]
    assert lines == [
        "Note: Conditions (diabetes, clinical ASCVD) and medications (statins, blood-pressure treatment) may be"
        " incomplete: not every page could be read from the EHR"
    ]


def test_partly_read_conditions_say_none_seen_rather_than_no(app_context):
    """A diabetes on an unread page would change the group: the card does not state "Diabetes: no" as a fact."""
    prefetch = {**_prefetch(), "medications": _bundle([])}
    [complete] = service.cardiovascular_risk(_call(prefetch))
    [partial] = service.cardiovascular_risk(_call(prefetch, incomplete=frozenset({"conditions"})))
    assert "| Diabetes | no |" in complete.detail.replace("  ", " ")
    assert "| Diabetes | no |" not in partial.detail.replace("  ", " ")
    assert "none in the pages read (incomplete)" in partial.detail
    assert partial.summary.endswith("; conditions incomplete") and len(partial.summary) < 140
    assert not complete.summary.endswith("; conditions incomplete")
    assert len(partial.suggestions) == len(complete.suggestions)  # what was read still calls for the statin


def test_no_statin_is_proposed_when_the_medications_may_be_incomplete(app_context):
    prefetch = {**_prefetch(), "medications": _bundle([])}
    [complete] = service.cardiovascular_risk(_call(prefetch))
    [partial] = service.cardiovascular_risk(_call(prefetch, incomplete=frozenset({"medications"})))
    assert len(complete.suggestions) == 1
    assert partial.suggestions == []
    assert "No statin is proposed: the medication list could not be fully read." in partial.detail.splitlines()
    assert partial.summary.endswith("high-intensity statin recommended, statin use unknown")


def test_the_fallback_also_says_which_inputs_may_be_incomplete(monkeypatch):
    monkeypatch.setattr(service, "today", lambda: TODAY)
    [card] = fallback(_call(_prefetch(), incomplete=frozenset({"conditions"})), "timed out")
    assert "Conditions (diabetes, clinical ASCVD) may be incomplete: not every page could be read" in card.detail


def test_a_prediction_from_another_backend_is_shown_with_its_name_and_version():
    [card] = build_cards(extract(), Prediction("ascvd-pce", "2013.2", {"risk": 0.081, "equation": "white-male"}))
    assert card.summary == "10-year ASCVD risk 8.1 % (intermediate): moderate-intensity statin recommended"
    assert card.source.label.endswith("(ascvd-pce 2013.2)")


# ---- Synthea ------------------------------------------------------------------------------------------------------


def _synthea_rows():
    if not (SYNTHEA / "pce_patients.csv").is_file():
        return []
    with open(SYNTHEA / "pce_patients.csv", newline="") as handle:
        return list(csv.DictReader(handle))


RACE_FROM_CODE = {"2106-3": "white", "2054-5": "african-american"}
# Angelic Mueller has two lipid panels at the very same instant (2020-04-13T06:19:07) that disagree: TC 176.2 and
# 291.2 mg/dL, HDL 64.6 and 27.5 mg/dL (risk 1.0 % or 11.6 %). The table took the first in bundle order; the
# service refuses to choose and says so.
CONFLICTING_LIPIDS = {"2ec622d5-095b-44d4-9cb2-c0e7e451cd74"}


@pytest.mark.parametrize("row", _synthea_rows() or [None], ids=lambda r: r["patient_id"][:8] if r else "absent")
def test_synthea_patients_are_read_as_the_reference_table_says(row):
    if row is None:
        pytest.skip(f"Synthea sample data not found at {SYNTHEA}")
    bundle = json.loads((SYNTHEA / "bundles" / row["file"]).read_text())
    resources = [entry["resource"] for entry in bundle["entry"]]
    resources.reverse()  # the latest first is not guaranteed: don't rely on the bundle's order

    def of(kind):
        return [r for r in resources if r["resourceType"] == kind]

    [pt] = of("Patient")
    inputs = extract_inputs(pt, of("Observation"), of("Condition"), of("MedicationRequest"), TODAY)
    found = inputs.findings
    measured = [
        ("total_cholesterol", "total_chol_mg_dl", "total_chol_date"),
        ("hdl", "hdl_mg_dl", "hdl_date"),
        ("systolic_bp", "sbp_mm_hg", "sbp_date"),
    ]
    if row["patient_id"] in CONFLICTING_LIPIDS:
        for name, value_column, date_column in measured[:2]:
            assert name not in found
            [message] = [p.message for p in inputs.blocking if p.input == name]
            assert f"on {row[date_column]} disagree" in message
            assert f"{float(row[value_column]):.1f}" in message
        measured = measured[2:]
    for name, value_column, date_column in measured:
        assert found[name].value == pytest.approx(float(row[value_column]), abs=1e-6), name
        assert found[name].date == date.fromisoformat(row[date_column]), name
    assert found["smoker"].value is False  # no current smokers among them (README)
    assert found["smoker"].date == date.fromisoformat(row["smoking_date"])
    assert found["diabetes"].value is bool(row["diabetes_snomed"])
    assert found["treated_hypertension"].value is bool(row["bp_lowering_active"])
    assert found["race"].value == RACE_FROM_CODE.get(row["race_code"], "other")
    assert found["sex"].value == row["sex"]
    assert found["age"].value == int(row["age_2021_04_01"])
    if row["patient_id"] in CONFLICTING_LIPIDS:
        assert card_for(inputs).summary.startswith("10-year ASCVD risk not calculated: total cholesterol results")
        return
    assert inputs.blocking == []
    risk = predict(inputs).outputs["risk"]
    assert 0 < risk < 1
    if inputs.ascvd:  # secondary prevention: the equations' number is not shown
        assert card_for(inputs).summary.startswith("Clinical ASCVD on record: ")
    else:
        assert card_for(inputs).summary.startswith(f"10-year ASCVD risk {risk * 100:.1f} % ")


def test_the_synthea_reference_table_has_45_patients():
    rows = _synthea_rows()
    if not rows:
        pytest.skip(f"Synthea sample data not found at {SYNTHEA}")
    assert len(rows) == 45


def test_a_diabetic_still_gets_the_moderate_intensity_proposal_when_the_model_is_down(monkeypatch):
    """Section 4.3: diabetes at 40-75 calls for a moderate-intensity statin whatever the risk, which only raises it
    to high intensity; a model outage must not take the proposal away."""
    monkeypatch.setattr(service, "today", lambda: TODAY)
    prefetch = {**_prefetch(), "conditions": _bundle([condition("44054006", "Type 2 diabetes")])}
    [card] = fallback(_call(prefetch), "timed out")
    assert card.summary == "Diabetes at 40-75, risk not calculated: moderate-intensity statin recommended"
    assert card.suggestions and "moderate-intensity" in card.suggestions[0].label
    assert card.overrideReasons and card.selectionBehavior == "at-most-one"
    assert len(card.summary) < 140
