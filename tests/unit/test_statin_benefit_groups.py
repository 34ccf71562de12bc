"""The 2018 AHA/ACC cholesterol guideline's statin benefit groups in the cardiovascular-risk service: the decision
at its exact boundaries (a pure function), and the card and proposal each group gives for patients built as FHIR."""

from __future__ import annotations

from datetime import date

import flask
import pytest

import app.ai
from app.ai.models.pce import BORDERLINE, HIGH, INTERMEDIATE, LOW, risk_category
from app.cds.proposals import OVERRIDE_REASON_SYSTEM, OVERRIDE_REASONS
from app.cds.request import HookRequest
from app.cds.service import ServiceCall
from app.config import ConfigError, load_config
from cds_services import cardiovascular_risk as service
from cds_services.cardiovascular_risk import (
    Advice,
    CardOptions,
    Decision,
    Facts,
    Group,
    build_cards,
    decide,
    extract_inputs,
    needs_risk,
)
from tests.support.fhir_builders import SNOMED, bp_panel, bundle, condition, medication_request, observation
from tests.support.models import model_app

TODAY = date(2026, 3, 1)
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def at(age: int, **facts) -> Decision | None:
    return decide(Facts(age=age, **facts))


# ---- the decision at its boundaries (pure) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (39, None),
        (40, Decision(Group.PRIMARY, Advice.MODERATE)),
        (75, Decision(Group.PRIMARY, Advice.MODERATE)),
        (76, Decision(Group.OLDER, Advice.CLINICIAN)),
        (79, Decision(Group.OLDER, Advice.CLINICIAN)),
        (80, None),
    ],
)
def test_primary_prevention_ages(age, expected):
    assert at(age, risk=0.10) == expected


@pytest.mark.parametrize(
    ("percent", "advice"),
    [
        (4.9, Advice.LIFESTYLE),
        (5.0, Advice.DISCUSS),
        (7.4, Advice.DISCUSS),
        (7.5, Advice.MODERATE),
        (19.9, Advice.MODERATE),
        (20.0, Advice.HIGH),
    ],
)
def test_primary_prevention_by_risk(percent, advice):
    assert at(55, risk=percent / 100) == Decision(Group.PRIMARY, advice)


def test_the_advice_follows_the_figure_shown_and_agrees_with_the_category_everywhere():
    expected = {LOW: Advice.LIFESTYLE, BORDERLINE: Advice.DISCUSS, INTERMEDIATE: Advice.MODERATE, HIGH: Advice.HIGH}
    assert at(55, risk=0.07496).advice is Advice.MODERATE  # shown as 7.5 %: intermediate, a moderate statin
    assert at(55, risk=0.04949).advice is Advice.LIFESTYLE  # shown as 4.9 %
    for tenth in range(0, 400):
        for risk in (tenth / 1000, tenth / 1000 + 0.00049, tenth / 1000 + 0.0005):
            assert at(55, risk=risk).advice is expected[risk_category(risk)], risk


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (19, None),
        (20, Decision(Group.ASCVD, Advice.HIGH)),
        (60, Decision(Group.ASCVD, Advice.HIGH)),
        (75, Decision(Group.ASCVD, Advice.HIGH)),
        (76, Decision(Group.ASCVD, Advice.CLINICIAN)),
        (78, Decision(Group.ASCVD, Advice.CLINICIAN)),
        (80, None),
    ],
)
def test_clinical_ascvd_whatever_the_risk(age, expected):
    assert at(age, ascvd=True, risk=0.01) == expected
    assert at(age, ascvd=True, diabetes=True, ldl=250.0) == expected  # ASCVD comes first


@pytest.mark.parametrize(
    ("age", "ldl", "expected"),
    [
        (30, 189.9, None),
        (30, 190.0, Decision(Group.SEVERE, Advice.HIGH)),
        (19, 250.0, None),
        (20, 190.0, Decision(Group.SEVERE, Advice.HIGH)),
        (55, 189.0, Decision(Group.PRIMARY, Advice.LIFESTYLE)),
        (55, 190.0, Decision(Group.SEVERE, Advice.HIGH)),
        (75, 190.0, Decision(Group.SEVERE, Advice.HIGH)),
        (76, 190.0, Decision(Group.OLDER, Advice.CLINICIAN)),
    ],
)
def test_ldl_190_or_more_needs_no_risk_estimate(age, ldl, expected):
    assert at(age, ldl=ldl, risk=0.03) == expected


def test_ldl_190_at_20_75_needs_no_risk_even_when_the_equations_could_not_run():
    assert at(55, ldl=195.0) == Decision(Group.SEVERE, Advice.HIGH)
    assert at(30, ldl=195.0, ascvd=None, diabetes=None) == Decision(Group.SEVERE, Advice.HIGH)


@pytest.mark.parametrize(
    ("age", "percent", "expected"),
    [
        (39, 3.0, None),
        (40, 3.0, Decision(Group.DIABETES, Advice.MODERATE)),
        (55, 4.9, Decision(Group.DIABETES, Advice.MODERATE)),  # under 7.5 %: moderate whatever the risk
        (55, 19.9, Decision(Group.DIABETES, Advice.MODERATE)),
        (55, 20.0, Decision(Group.DIABETES, Advice.HIGH)),
        (55, None, Decision(Group.DIABETES, Advice.MODERATE)),  # the risk could not be calculated
        (75, 30.0, Decision(Group.DIABETES, Advice.HIGH)),
        (76, 30.0, Decision(Group.OLDER, Advice.CLINICIAN)),
    ],
)
def test_diabetes_at_40_75(age, percent, expected):
    risk = percent / 100 if percent is not None else None
    assert at(age, diabetes=True, risk=risk) == expected
    assert at(age, diabetes=True, risk=risk, ldl=60.0) == expected  # the LDL-C floor is for non-diabetics only


def test_ldl_under_70_leaves_a_risk_based_statin_to_the_clinician():
    assert at(55, risk=0.10, ldl=69.9) == Decision(Group.PRIMARY, Advice.CLINICIAN)
    assert at(55, risk=0.10, ldl=70.0) == Decision(Group.PRIMARY, Advice.MODERATE)
    assert at(55, risk=0.10, ldl=None) == Decision(Group.PRIMARY, Advice.MODERATE)  # unknown: by the risk
    assert at(55, risk=0.03, ldl=60.0) == Decision(Group.PRIMARY, Advice.LIFESTYLE)


def test_what_is_unknown_is_not_guessed():
    assert at(55) == Decision(Group.PRIMARY, Advice.NOT_CALCULATED)
    assert at(77) == Decision(Group.OLDER, Advice.NOT_CALCULATED)
    assert decide(Facts(age=None)) == Decision(None, Advice.NOT_CALCULATED)
    assert at(55, ascvd=None, diabetes=None, risk=0.1) == Decision(None, Advice.NOT_CALCULATED)
    assert at(30, ascvd=None, diabetes=None) is None  # under 40 only ASCVD or LDL-C 190 would apply
    assert decide(Facts(age=60, deceased=True, ascvd=True)) is None


def test_only_the_groups_that_use_the_risk_run_the_equations():
    assert [g for g in Group if Decision(g, Advice.HIGH).uses_risk] == [Group.DIABETES, Group.PRIMARY, Group.OLDER]


# ---- patients as FHIR, end to end ------------------------------------------------------------------------------


def patient(age: int, gender: str = "male", **extra) -> dict:
    """A white patient who turned ``age`` on 1 January of TODAY's year."""
    race = {
        "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
        "extension": [
            {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3"}},
            {"url": "text", "valueString": "White"},
        ],
    }
    born = date(TODAY.year - age, 1, 1).isoformat()
    return {"resourceType": "Patient", "id": "p1", "gender": gender, "birthDate": born, "extension": [race], **extra}


def labs(tc=213, hdl=50, sbp=120, ldl=None, smoker=False, when="2026-01-10"):
    answer = ("449868002", "Smokes tobacco daily") if smoker else ("266919005", "Never smoker")
    found = [
        observation("2093-3", tc, "mg/dL", when),
        observation("2085-9", hdl, "mg/dL", when),
        bp_panel(sbp, when=when),
        observation("72166-2", {"coding": [{"system": SNOMED, "code": answer[0]}], "text": answer[1]}, when=when),
    ]
    if ldl is not None:
        found.append(observation("13457-7", ldl, "mg/dL", when))
    return found


DIABETES_T2 = condition("44054006", "Diabetes mellitus type 2")
MI = condition("22298006", "Myocardial infarction")
SIMVASTATIN = medication_request("Simvastatin 20 MG Oral Tablet", "312961")


def cards(pt, obs=None, conditions=(), meds=(), options: CardOptions | None = None):
    inputs = extract_inputs(pt, labs() if obs is None else obs, list(conditions), list(meds), TODAY)
    inputs.patient_id = "p1"
    with model_app().app_context():
        prediction = app.ai.infer("ascvd-pce", inputs.model_inputs()) if needs_risk(inputs) else None
    return build_cards(inputs, prediction, options)


def proposal(card) -> tuple[str, str] | None:
    """The proposed drug's RxNorm code and label, or None."""
    if not card.suggestions:
        return None
    [suggestion] = card.suggestions
    [action] = suggestion.actions
    return action.resource["medicationCodeableConcept"]["coding"][0]["code"], suggestion.label


HIGH_STATIN = ("617311", "Propose atorvastatin 40 mg daily (high-intensity statin)")
MODERATE_STATIN = ("617310", "Propose atorvastatin 20 mg daily (moderate-intensity statin)")


@pytest.mark.parametrize(
    ("case", "make", "summary", "expected"),
    [
        (
            "low risk",
            lambda: cards(patient(50, "female"), labs(tc=180, hdl=60, sbp=115)),
            "10-year ASCVD risk 0.8 % (low): lifestyle advice, no statin indicated",
            None,
        ),
        (
            "borderline",
            lambda: cards(patient(55)),
            "10-year ASCVD risk 5.4 % (borderline): discuss a statin if risk enhancers are present",
            None,
        ),
        (
            "intermediate",
            lambda: cards(patient(60), labs(sbp=140)),
            "10-year ASCVD risk 10.6 % (intermediate): moderate-intensity statin recommended",
            MODERATE_STATIN,
        ),
        (
            "high",
            lambda: cards(patient(65), labs(tc=250, hdl=40, sbp=150)),
            "10-year ASCVD risk 21.6 % (high): high-intensity statin recommended",
            HIGH_STATIN,
        ),
        (
            "intermediate, LDL-C under 70",
            lambda: cards(patient(60), labs(sbp=140, ldl=65)),
            "10-year ASCVD risk 10.6 % (intermediate): LDL-C under 70 mg/dL, statin is the clinician's call",
            None,
        ),
        (
            "diabetic under 7.5 %",
            lambda: cards(patient(50, "female"), labs(tc=180, hdl=60, sbp=115), [DIABETES_T2]),
            "10-year ASCVD risk 1.5 % (low) with diabetes: moderate-intensity statin recommended",
            MODERATE_STATIN,
        ),
        (
            "diabetic at 20 % or more",
            lambda: cards(patient(65), labs(tc=250, hdl=40, sbp=150), [DIABETES_T2]),
            "10-year ASCVD risk 37.4 % (high) with diabetes: high-intensity statin recommended",
            HIGH_STATIN,
        ),
        (
            "diabetic without HDL",
            lambda: cards(patient(50, "female"), labs()[:1] + labs()[2:], [DIABETES_T2]),
            "Diabetes at 40-75, risk not calculated: moderate-intensity statin recommended",
            MODERATE_STATIN,
        ),
        (
            "ASCVD at 60",
            lambda: cards(patient(60), labs(), [MI]),
            "Clinical ASCVD on record: high-intensity statin recommended",
            HIGH_STATIN,
        ),
        (
            "ASCVD at 78",
            lambda: cards(patient(78), labs(), [MI]),
            "Clinical ASCVD on record at age 78: statin is the clinician's call",
            None,
        ),
        (
            "ASCVD without the equations' inputs",
            lambda: cards(patient(60), [], [MI]),
            "Clinical ASCVD on record: high-intensity statin recommended",
            HIGH_STATIN,
        ),
        (
            "LDL 189 at 50",
            lambda: cards(patient(50), labs(tc=280, ldl=189)),
            "10-year ASCVD risk 5.0 % (borderline): discuss a statin if risk enhancers are present",
            None,
        ),
        (
            "LDL 190 at 50",
            lambda: cards(patient(50), labs(tc=280, ldl=190)),
            "LDL-C 190 mg/dL (190 or more): high-intensity statin recommended",
            HIGH_STATIN,
        ),
        (
            "LDL 201 at 30, no other input",
            lambda: cards(patient(30), [observation("18262-6", 5.2, "mmol/L", "2026-01-10")]),
            "LDL-C 201.1 mg/dL (190 or more): high-intensity statin recommended",
            HIGH_STATIN,
        ),
        (
            "age 40",
            lambda: cards(patient(40), labs(sbp=140)),
            "10-year ASCVD risk 1.5 % (low): lifestyle advice, no statin indicated",
            None,
        ),
        (
            "age 75",
            lambda: cards(patient(75), labs(sbp=140)),
            "10-year ASCVD risk 28.9 % (high): high-intensity statin recommended",
            HIGH_STATIN,
        ),
        (
            "age 76",
            lambda: cards(patient(76), labs(sbp=140)),
            "10-year ASCVD risk 30.5 % (high) at age 76: statin is the clinician's call",
            None,
        ),
        (
            "age 79",
            lambda: cards(patient(79), labs(sbp=140)),
            "10-year ASCVD risk 35.7 % (high) at age 79: statin is the clinician's call",
            None,
        ),
        (
            "active statin",
            lambda: cards(patient(65), labs(tc=250, hdl=40, sbp=150), meds=[SIMVASTATIN]),
            "10-year ASCVD risk 21.6 % (high): statin already active",
            None,
        ),
        (
            "active statin with ASCVD",
            lambda: cards(patient(60), labs(), [MI], [SIMVASTATIN]),
            "Clinical ASCVD on record: statin already active",
            None,
        ),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 40 else "",
)
def test_each_group_gives_its_card_and_proposal(case, make, summary, expected):
    [card] = make()
    assert card.summary == summary
    assert proposal(card) == expected
    assert card.indicator == ("warning" if expected else "info")
    if expected:
        assert card.selectionBehavior == "at-most-one"
        assert [(r.system, r.code, r.display) for r in card.overrideReasons] == [
            (OVERRIDE_REASON_SYSTEM, code, display) for code, display in OVERRIDE_REASONS
        ]
    else:
        assert card.overrideReasons == [] and card.selectionBehavior is None


@pytest.mark.parametrize("age", [39, 80])
def test_no_card_at_39_or_80_without_a_group(age):
    assert cards(patient(age), labs(sbp=140)) == []
    assert cards(patient(age), labs(sbp=140), [DIABETES_T2]) == []
    [info] = cards(patient(age), labs(sbp=140), options=CardOptions(info_cards=True))
    assert info.summary == f"Cardiovascular risk not assessed: no statin benefit group applies at age {age}"


def test_an_active_statin_is_said_in_one_line_and_nothing_is_proposed():
    [card] = cards(patient(60), labs(), [MI], [SIMVASTATIN])
    lines = [line for line in card.detail.splitlines() if "Simvastatin" in line]
    assert lines == [
        "Statin already active: Simvastatin 20 MG Oral Tablet, so none is proposed; clinical ASCVD calls for high "
        "intensity."
    ]


def test_no_proposal_when_the_medication_list_could_not_be_read():
    inputs = extract_inputs(patient(60), labs(), [MI], [], TODAY, unavailable={"medications"})
    [card] = build_cards(inputs, None)
    assert card.suggestions == [] and card.indicator == "warning"
    assert card.summary == "Clinical ASCVD on record: high-intensity statin recommended, statin use unknown"
    assert "No statin is proposed: the medication list could not be fully read." in card.detail.splitlines()


def test_the_diabetes_card_without_the_risk_names_what_is_missing():
    [card] = cards(patient(50, "female"), labs()[:1] + labs()[2:], [DIABETES_T2])
    assert "The risk was not calculated (no HDL cholesterol in the record)" in card.detail


def test_ldl_in_mmol_per_litre_is_converted():
    [card] = cards(patient(30), [observation("18262-6", 5.2, "mmol/L", "2026-01-10")])
    assert "| LDL cholesterol | 201.1 mg/dL (converted from 5.2 mmol/L) | 2026-01-10 |" in card.detail


def test_blood_pressure_treatment_is_the_current_oral_treatment():
    meds = [
        medication_request("Hydrochlorothiazide 25 MG Oral Tablet", id="old", authoredOn="1968-03-01"),
        medication_request("lisinopril 10 MG Oral Tablet", id="new", authoredOn="2024-05-01"),
        medication_request("Hydrochlorothiazide 25 MG Oral Tablet", id="renewed", authoredOn="2019-02-01"),
        medication_request("1 ML furosemide 10 MG/ML Injection", id="iv", authoredOn="2025-12-24"),
    ]
    inputs = extract_inputs(patient(60), labs(), [], meds, TODAY)
    finding = inputs.findings["treated_hypertension"]
    assert finding.date == date(2024, 5, 1)  # the latest active order, not the first prescription found
    assert finding.text == (
        "Hydrochlorothiazide 25 MG Oral Tablet (thiazide diuretic); lisinopril 10 MG Oral Tablet (ACE inhibitor)"
    )


@pytest.mark.parametrize(
    "order",
    [
        medication_request("1 ML furosemide 10 MG/ML Injection"),
        medication_request(code="1719286"),  # furosemide 10 MG/ML Injection, coded only
        medication_request(
            "labetalol 5 MG/ML", dosageInstruction=[{"route": {"coding": [{"system": SNOMED, "code": "47625008"}]}}]
        ),
        medication_request("metoprolol tartrate 1 MG/ML", dosageInstruction=[{"route": {"text": "Intravenous"}}]),
        medication_request(
            "hydralazine 20 MG/ML",
            category=[
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category",
                            "code": "inpatient",
                        }
                    ]
                }
            ],
        ),
    ],
)
def test_inpatient_only_forms_are_not_chronic_blood_pressure_treatment(order):
    inputs = extract_inputs(patient(60), labs(), [], [order], TODAY)
    assert inputs.findings["treated_hypertension"].value is False


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: cards(patient(30), labs(ldl=200)), "LDL-C 190 mg/dL or more: high-intensity statin"),
        (
            lambda: cards(patient(50, "female"), labs()[:1], [DIABETES_T2]),
            "Diabetes at 40-75: moderate-intensity statin",
        ),
        (
            lambda: cards(patient(50, "female"), labs(tc=180, hdl=60, sbp=115), [DIABETES_T2]),
            "Diabetes, 10-year ASCVD risk 1.5 % (ACC/AHA Pooled Cohort Equations): moderate-intensity statin",
        ),
        (
            lambda: cards(patient(60), labs(sbp=140)),
            "10-year ASCVD risk 10.6 % (ACC/AHA Pooled Cohort Equations): moderate-intensity statin",
        ),
    ],
)
def test_the_proposal_says_why_in_its_reason(make, reason):
    [card] = make()
    [action] = card.suggestions[0].actions
    assert action.resource["reasonCode"][0]["text"].startswith(reason + " (2018 AHA/ACC cholesterol guideline, ")


def test_the_proposal_is_a_valid_draft_of_the_groups_intensity():
    from fhir.resources.R4B.medicationrequest import MedicationRequest

    [card] = cards(patient(60), labs(), [MI])
    [action] = card.suggestions[0].actions
    resource = action.resource
    MedicationRequest.model_validate(resource)
    assert resource["medicationCodeableConcept"]["coding"] == [
        {"system": RXNORM, "code": "617311", "display": "atorvastatin 40 MG Oral Tablet"}
    ]
    assert resource["dosageInstruction"][0]["text"] == "40 mg by mouth once daily"
    assert resource["reasonCode"][0]["text"] == (
        "Clinical ASCVD: high-intensity statin (2018 AHA/ACC cholesterol guideline, section 4.1)"
    )


# ---- settings: declared, validated, read from the application's config ---------------------------------------


def _call(prefetch):
    request = HookRequest(
        hook="patient-view",
        hook_instance="0b8f9a3e-2b5c-4a53-9d3c-3c0c6a3a6f10",
        context={"userId": "Practitioner/d1", "patientId": "p1"},
        prefetch=prefetch,
    )
    return ServiceCall(request=request, prefetch=prefetch)


def _app(**environ) -> flask.Flask:
    flask_app = flask.Flask(__name__)
    flask_app.config.update(load_config(environ=environ))
    app.ai.init_app(flask_app)
    return flask_app


@pytest.mark.parametrize(
    "pt", [patient(85), patient(7), patient(60, deceasedDateTime="2025-01-01")], ids=["85", "7", "deceased"]
)
def test_the_hook_is_quiet_for_patients_it_does_not_apply_to_unless_info_cards_are_on(pt, monkeypatch):
    monkeypatch.setattr(service, "today", lambda: TODAY)
    prefetch = {"patient": pt, "totalCholesterol": bundle(*labs()), "conditions": bundle(MI), "medications": bundle()}
    with _app().app_context():
        assert service.cardiovascular_risk(_call(prefetch)) == []
    with _app(CARDIOVASCULAR_RISK_INFO_CARDS="1").app_context():
        [card] = service.cardiovascular_risk(_call(prefetch))
    assert card.summary.startswith("Cardiovascular risk not assessed: ") and card.indicator == "info"


def test_the_settings_are_declared_and_validated_at_start():
    config = load_config(environ={})
    assert config["CARDIOVASCULAR_RISK_INFO_CARDS"] is False and config["CARDIOVASCULAR_RISK_OLD_AFTER_YEARS"] == 2
    with _app(CARDIOVASCULAR_RISK_OLD_AFTER_YEARS="5").app_context():
        assert CardOptions.from_config() == CardOptions(info_cards=False, old_after_years=5)
    with pytest.raises(ConfigError, match="CARDIOVASCULAR_RISK_OLD_AFTER_YEARS"):
        load_config(environ={"CARDIOVASCULAR_RISK_OLD_AFTER_YEARS": "0"})
    with pytest.raises(ConfigError, match="CARDIOVASCULAR_RISK_INFO_CARDS"):
        load_config(environ={"CARDIOVASCULAR_RISK_INFO_CARDS": "maybe"})


def test_every_decision_the_groups_can_give_has_its_words():
    from itertools import product

    from cds_services.cardiovascular_risk import GUIDANCE

    given = set()
    for age, ascvd, diabetes, ldl, risk in product(
        range(15, 86),
        (True, False, None),
        (True, False, None),
        (None, 60.0, 100.0, 195.0),
        (None, 0.03, 0.06, 0.1, 0.25),
    ):
        decision = decide(Facts(age=age, ascvd=ascvd, diabetes=diabetes, ldl=ldl, risk=risk))
        if decision is not None and decision.advice is not Advice.NOT_CALCULATED:
            given.add((decision.group, decision.advice))
    assert given == set(GUIDANCE)


def test_a_partial_birth_date_across_a_groups_age_limit_is_not_guessed():
    straddling = {**patient(60), "birthDate": str(TODAY.year - 76)}  # 75 or 76 on TODAY
    [card] = cards(straddling, labs(sbp=140))
    assert card.summary.startswith("10-year ASCVD risk not calculated: age 75 or 76 (birth date ")
    assert card.suggestions == []
    within = {**patient(60), "birthDate": str(TODAY.year - 61)}  # 60 or 61: the same group either way
    [card] = cards(within, labs(sbp=140))
    assert card.summary.startswith("10-year ASCVD risk ") and "not calculated" not in card.summary
