"""The ``cardiovascular-risk`` service (patient-view): the statin benefit groups of the 2018 AHA/ACC cholesterol
guideline, with the 10-year ASCVD risk from the ACC/AHA Pooled Cohort Equations where a group needs it.

The record is read into inputs by pure functions (``extract_inputs``, over ``app.fhir.record`` and
``app.cds.inputs``), each with its value, unit, date and source. ``decide`` (pure, no wording) places the patient
in a benefit group and says what the group calls for; the risk comes from the ``ascvd-pce`` model through
``app.ai.infer`` only when the group depends on it. ``build_cards`` words the decision as one short card, with a
statin proposal of the group's intensity when no statin is active, and no card at all when the service does not
apply (unless CARDIOVASCULAR_RISK_INFO_CARDS is on). This module holds the clinical rules and the card's words.

Guideline: Grundy SM et al. 2018 AHA/ACC/AACVPR/AAPA/ABC/ACPM/ADA/AGS/APhA/ASPC/NLA/PCNA Guideline on the
Management of Blood Cholesterol. Circulation 2019;139:e1082-e1143. Section, figure and table numbers are its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any

from flask import current_app, has_app_context

from app.ai import InvalidModelInput, Prediction, infer
from app.ai.models.pce import BORDERLINE, HIGH, INTERMEDIATE, LOW, VALID_RANGES, risk_category
from app.batch.scoring import NotScored, PatientResources, Population, Scored
from app.cds.cards import Card, Link, Source, Suggestion, fit_summary, with_link
from app.cds.inputs import (
    INCOMPLETE,
    Finding,
    InputDisplay,
    Inputs,
    ObservedInput,
    Problem,
    age_input,
    condition_finding,
    incomplete_note,
    inline_markdown,
    latest_observations,
    markdown_table,
)
from app.cds.proposals import ProposedMedication, medication_proposal, override_reasons, suggest_creating
from app.cds.service import Explanation, PrefetchKey, ServiceCall, Setting, cds_service
from app.fhir.codes import (
    ASCVD,
    BP_LOWERING,
    BP_PANEL,
    CURRENT_SMOKER,
    DIABETES,
    HDL,
    INPATIENT,
    LDL,
    LOINC,
    MEDICATION_REQUEST_CATEGORY,
    NON_SMOKER,
    OMB_BLACK,
    OMB_HISPANIC,
    OMB_WHITE,
    PARENTERAL_ROUTE,
    PARENTERAL_ROUTE_WORDS,
    SMOKING_STATUS,
    SMOKING_UNKNOWN,
    STATIN,
    SYSTOLIC_BP,
    TOTAL_CHOLESTEROL,
    US_CORE_RACE,
    all_text,
    classify,
    codes_in,
)
from app.fhir.record import (
    CHOLESTEROL,
    MedicationUse,
    Read,
    Record,
    age_on,
    answer,
    concept_text,
    deceased,
    number,
    quantity,
    short,
    us_core_category,
    years_before,
)
from app.results import StoredResult
from app.smart.pages import LaunchContext, dated, result_view, section

MODEL = "ascvd-pce"
GUIDELINE_URL = "https://doi.org/10.1161/01.cir.0000437741.48606.98"
GUIDELINE_LABEL = "ACC/AHA Pooled Cohort Equations 2013"
CHOLESTEROL_GUIDELINE_URL = "https://doi.org/10.1161/CIR.0000000000000625"
CHOLESTEROL_GUIDELINE_LABEL = "2018 AHA/ACC cholesterol guideline"
ESTIMATOR_URL = "https://tools.acc.org/ascvd-risk-estimator-plus/"
ESTIMATOR_LABEL = "ACC/AHA ASCVD Risk Estimator Plus"
EXPLANATION_LABEL = "Explain this result: inputs, dates, model"

# Declared settings (environment variables, validated at start; documented in the README).
INFO_CARDS = "CARDIOVASCULAR_RISK_INFO_CARDS"  # also a card for patients the service does not apply to
OLD_AFTER_YEARS = "CARDIOVASCULAR_RISK_OLD_AFTER_YEARS"  # values measured longer ago are flagged as old
SETTINGS = {INFO_CARDS: Setting(bool, False), OLD_AFTER_YEARS: Setting(int, 2, 1, 50)}


@dataclass(frozen=True)
class CardOptions:
    """What a site chose: informational cards for patients the service does not apply to, and the age in years
    at which a value is flagged as old."""

    info_cards: bool = False
    old_after_years: int = 2

    @classmethod
    def from_config(cls) -> CardOptions:
        """The settings of the running application (the defaults outside one)."""
        if not has_app_context():
            return cls()
        config = current_app.config
        return cls(bool(config.get(INFO_CARDS, False)), int(config.get(OLD_AFTER_YEARS) or 2))


# The observation searches sort newest first, so their first page holds the values used: no next page is read.
# Conditions and medications need every page (diabetes, ASCVD or a statin may be on any of them).
PREFETCH = {
    "patient": PrefetchKey("Patient/{{context.patientId}}", required=True),
    "totalCholesterol": latest_observations(TOTAL_CHOLESTEROL),
    "hdl": latest_observations(HDL),
    "ldl": latest_observations(LDL),
    "bloodPressure": latest_observations(BP_PANEL | SYSTOLIC_BP),
    "smoking": latest_observations(SMOKING_STATUS),
    "conditions": PrefetchKey("Condition?patient={{context.patientId}}", required=False),
    "medications": PrefetchKey("MedicationRequest?patient={{context.patientId}}&status=active", required=False),
}
OBSERVATION_KEYS = ("totalCholesterol", "hdl", "ldl", "bloodPressure", "smoking")
# How the card names a prefetch key that may be incomplete (not every page of it could be read).
KEY_WORDS = {
    "patient": "the patient record",
    "totalCholesterol": "total cholesterol results",
    "hdl": "HDL results",
    "ldl": "LDL results",
    "bloodPressure": "blood-pressure results",
    "smoking": "smoking status results",
    "conditions": "conditions (diabetes, clinical ASCVD)",
    "medications": "medications (statins, blood-pressure treatment)",
}
LABELS = {
    "age": "Age",
    "sex": "Sex",
    "race": "Race",
    "total_cholesterol": "Total cholesterol",
    "hdl": "HDL cholesterol",
    "ldl": "LDL cholesterol",
    "systolic_bp": "Systolic blood pressure",
    "smoker": "Smoking status",
    "diabetes": "Diabetes",
    "treated_hypertension": "Blood-pressure treatment",
}
# The equations' inputs (LDL cholesterol is not one of them: it places the patient in a group).
MODEL_INPUTS = (
    "age",
    "sex",
    "race",
    "total_cholesterol",
    "hdl",
    "systolic_bp",
    "smoker",
    "diabetes",
    "treated_hypertension",
)
AGE_RANGE = VALID_RANGES["age"][:2]
# Units as clinicians write them, for the equations' range messages.
UNIT_WORDS = {"mm Hg": "mmHg"}


def today() -> date:
    """Today's date; a separate function so that pure tests can pass or patch another day."""
    return date.today()


@dataclass
class PceInputs(Inputs):
    """What the record gave for each input of the equations and of the benefit groups (LDL cholesterol, clinical
    ASCVD, active statins), and what it did not. ``age`` is the age in whole years the groups are told by (None
    when it cannot be known); the equations' age, with its range check, is ``findings["age"]``."""

    statins: list[Finding] = field(default_factory=list)
    ascvd: list[Finding] = field(default_factory=list)
    statin_status_known: bool = True
    conditions_read: bool = True
    conditions_partial: bool = False  # some pages of the conditions were read: a "no" means "none seen"
    age: int | None = None
    first = ("patient", "deceased", "age", "sex")  # a deceased patient, then age, then sex

    def model_inputs(self) -> dict[str, Any]:
        """The ``ascvd-pce`` inputs; only meaningful when nothing is blocking."""
        return self.values(MODEL_INPUTS)


# ---- the 2018 guideline's statin benefit groups: the decision, pure and without words --------------------------

ADULT_AGE = 20  # the youngest group: LDL-C >= 190 mg/dL at 20-75 (section 4.2)
EQUATION_AGES = (40, 79)  # the Pooled Cohort Equations' ages (Goff 2013); diabetes and risk groups start at 40
STATIN_AGE_LIMIT = 75  # sections 4.1 (ASCVD: high intensity at 75 or younger), 4.2, 4.3 and 4.4.2 (to 75)
OLDEST_AGE = EQUATION_AGES[1]  # over 79 no group applies: the equations stop there (section 4.4.4: 76-80)
LDL_SEVERE = 190.0  # mg/dL: severe hypercholesterolemia, high intensity without a risk estimate (4.2, Figure 2)
LDL_FLOOR = 70.0  # mg/dL: the risk-based recommendations are for LDL-C 70-189 mg/dL (4.4.2, Figure 2)
# 10-year risk, percent to 0.1 as the card shows it (section 4.4.2, Figure 2): >= 20 high (high intensity),
# 7.5 to < 20 intermediate (moderate intensity), 5 to < 7.5 borderline (discussion), < 5 low (lifestyle).
RISK_HIGH, RISK_INTERMEDIATE, RISK_BORDERLINE = 20.0, 7.5, 5.0
# Diabetes at 40-75: moderate intensity whatever the risk; at 20 % or more a maximally tolerated (high-intensity)
# statin, with ezetimibe if needed, to lower LDL-C by 50 % or more (section 4.3).
DIABETES_HIGH_RISK = 20.0
# Where an age changes the group: a partial birth date with these on both sides cannot place the patient.
AGE_LIMITS = (ADULT_AGE, EQUATION_AGES[0], STATIN_AGE_LIMIT + 1, OLDEST_AGE + 1)


class Group(StrEnum):
    """The statin benefit groups (section 4), and adults over 75 without clinical ASCVD (section 4.4.4)."""

    ASCVD = "clinical ASCVD"
    SEVERE = "LDL-C 190 mg/dL or more"
    DIABETES = "diabetes at 40-75"
    PRIMARY = "primary prevention at 40-75"
    OLDER = "primary prevention over 75"


class Advice(StrEnum):
    """What the group calls for: a statin of an intensity (proposed when none is active), a discussion, lifestyle,
    the clinician's own call (no automatic proposal), or nothing yet because data is missing."""

    HIGH = "high-intensity statin"
    MODERATE = "moderate-intensity statin"
    DISCUSS = "risk discussion"
    LIFESTYLE = "lifestyle"
    CLINICIAN = "clinician's call"
    NOT_CALCULATED = "not calculated"


# Groups whose advice depends on the 10-year risk: the only ones for which the equations are run and shown.
RISK_GROUPS = (Group.DIABETES, Group.PRIMARY, Group.OLDER)


@dataclass(frozen=True)
class Facts:
    """What the decision needs: age in years, whether the patient is deceased, clinical ASCVD and diabetes (None:
    unknown, the conditions could not be read), LDL-C in mg/dL and the 10-year risk (0-1) when known."""

    age: int | None
    deceased: bool = False
    ascvd: bool | None = False
    diabetes: bool | None = False
    ldl: float | None = None
    risk: float | None = None


@dataclass(frozen=True)
class Decision:
    """The patient's group (None: eligible, but which group cannot be told yet) and what it calls for."""

    group: Group | None
    advice: Advice

    @property
    def uses_risk(self) -> bool:
        return self.group in RISK_GROUPS

    @property
    def calls_for_statin(self) -> bool:
        return self.advice in (Advice.HIGH, Advice.MODERATE)


def shown_percent(risk: float) -> float:
    """The risk as the card shows it, in percent to 0.1 (as ``risk_category`` rounds it): the figure decides."""
    return round(risk * 1000) / 10


def decide(facts: Facts) -> Decision | None:
    """The statin benefit group and its advice; None when the service does not apply (deceased, or outside every
    group's ages). Without the risk, a group that needs it says NOT_CALCULATED (diabetes: moderate intensity)."""
    age = facts.age
    if facts.deceased:
        return None
    if age is None:
        return Decision(None, Advice.NOT_CALCULATED)
    if not ADULT_AGE <= age <= OLDEST_AGE:
        return None
    if facts.ascvd:  # section 4.1, Figure 1: high intensity at 75 or younger; older, the clinician weighs it
        return Decision(Group.ASCVD, Advice.HIGH if age <= STATIN_AGE_LIMIT else Advice.CLINICIAN)
    if facts.ldl is not None and facts.ldl >= LDL_SEVERE and age <= STATIN_AGE_LIMIT:  # section 4.2
        return Decision(Group.SEVERE, Advice.HIGH)
    if age < EQUATION_AGES[0]:  # 20-39: only the two groups above (section 4.4.4: lifetime risk, lifestyle)
        return None
    if facts.ascvd is None or facts.diabetes is None:
        return Decision(None, Advice.NOT_CALCULATED)
    percent = shown_percent(facts.risk) if facts.risk is not None else None
    if age > STATIN_AGE_LIMIT:  # section 4.4.4 (older adults): the number, and a decision with the patient
        return Decision(Group.OLDER, Advice.CLINICIAN if percent is not None else Advice.NOT_CALCULATED)
    if facts.diabetes:  # section 4.3
        high = percent is not None and percent >= DIABETES_HIGH_RISK
        return Decision(Group.DIABETES, Advice.HIGH if high else Advice.MODERATE)
    if percent is None:
        return Decision(Group.PRIMARY, Advice.NOT_CALCULATED)
    if percent >= RISK_INTERMEDIATE and facts.ldl is not None and facts.ldl < LDL_FLOOR:
        return Decision(Group.PRIMARY, Advice.CLINICIAN)
    if percent >= RISK_HIGH:
        return Decision(Group.PRIMARY, Advice.HIGH)
    if percent >= RISK_INTERMEDIATE:
        return Decision(Group.PRIMARY, Advice.MODERATE)
    if percent >= RISK_BORDERLINE:
        return Decision(Group.PRIMARY, Advice.DISCUSS)
    return Decision(Group.PRIMARY, Advice.LIFESTYLE)


def facts_of(inputs: PceInputs, risk: float | None = None) -> Facts:
    """The decision's facts from what the record gave (LDL-C to the 0.1 mg/dL shown on the card)."""
    diabetes, ldl = inputs.findings.get("diabetes"), inputs.findings.get("ldl")
    return Facts(
        age=inputs.age,
        deceased=any(p.input == "deceased" for p in inputs.problems),
        ascvd=bool(inputs.ascvd) if inputs.conditions_read else None,
        diabetes=bool(diabetes.value) if diabetes is not None and inputs.conditions_read else None,
        ldl=round(float(ldl.value), 1) if ldl is not None else None,
        risk=risk,
    )


def needs_risk(inputs: PceInputs) -> bool:
    """Whether the patient's group depends on the 10-year risk and every input of the equations is there."""
    scope = decide(facts_of(inputs))
    return scope is not None and scope.uses_risk and not inputs.blocking


# ---- observations --------------------------------------------------------------------------------------------


def _smoking_status(concept: dict[str, Any]) -> Read | str:
    text = short(concept_text(concept) or "no text", 60)
    if CURRENT_SMOKER.matches(concept):
        return Read(True, text)
    if NON_SMOKER.matches(concept):
        return Read(False, text)
    if SMOKING_UNKNOWN.matches(concept):
        return "status unknown (266927001)"
    return f"answer {text!r} is not a recognised smoking status"


READINGS = (
    ObservedInput("total_cholesterol", "totalCholesterol", TOTAL_CHOLESTEROL, quantity("mg/dL", CHOLESTEROL), "mg/dL"),
    ObservedInput("hdl", "hdl", HDL, quantity("mg/dL", CHOLESTEROL), "mg/dL"),
    ObservedInput("ldl", "ldl", LDL, quantity("mg/dL", CHOLESTEROL), "mg/dL"),
    ObservedInput("systolic_bp", "bloodPressure", SYSTOLIC_BP, quantity("mm[Hg]"), "mmHg"),
    ObservedInput("smoker", "smoking", SMOKING_STATUS, answer(_smoking_status)),
)


# ---- the patient ---------------------------------------------------------------------------------------------


def _race(inputs: PceInputs, patient: dict[str, Any]) -> None:
    codes, text = us_core_category(patient, US_CORE_RACE)
    shown = short(text or ", ".join(codes) or "not recorded", 60)
    if OMB_BLACK in codes:
        note = "" if set(codes) == {OMB_BLACK} else "several races recorded: the African-American equations are used"
        inputs.findings["race"] = Finding("african-american", "", None, "Patient US Core race", shown, note)
    elif codes and set(codes) == {OMB_WHITE}:
        inputs.findings["race"] = Finding("white", "", None, "Patient US Core race", shown)
    else:
        if OMB_HISPANIC in codes:
            why = f"race recorded as {OMB_HISPANIC}, which is an ethnicity (Hispanic or Latino), not a race"
        else:
            listed = short(", ".join(codes), 40)
            why = f"race code {listed} is neither white nor African American" if codes else "no race recorded"
        note = f"{why}: the equations for white individuals are used"
        inputs.findings["race"] = Finding("other", "", None, "Patient US Core race", shown, note)


def _group_age(inputs: PceInputs, birth_date: Any, day: date) -> None:
    """The age the groups are told by: the age certainly reached, unless a partial birth date leaves a group's age
    limit between the ages it allows (then None, and a blocking problem says so)."""
    age = age_on(birth_date, day)
    if isinstance(age, str):
        return
    if any(age.least < limit <= age.most for limit in AGE_LIMITS):
        if not any(p.input == "age" for p in inputs.problems):
            message = f"age {age.least} or {age.most} (birth date {age.written} is partial): the statin group differs"
            inputs.problems.append(Problem("age", message))
        return
    inputs.age = age.least


def _read_patient(inputs: PceInputs, patient: dict[str, Any] | None, today: date) -> None:
    if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
        inputs.problems.append(Problem("patient", "the patient record could not be read"))
        return
    inputs.patient_id = patient.get("id") if isinstance(patient.get("id"), str) else inputs.patient_id
    if deceased(patient):
        inputs.problems.append(Problem("deceased", "the patient is recorded as deceased"))
    inputs.add("age", age_input(patient.get("birthDate"), today, AGE_RANGE))
    _group_age(inputs, patient.get("birthDate"), today)
    gender = patient.get("gender")
    if gender in ("female", "male"):
        inputs.findings["sex"] = Finding(gender, "", None, "Patient.gender")
    else:
        shown = f"recorded as {short(gender, 12)!r}" if isinstance(gender, str) else "not recorded"
        inputs.problems.append(Problem("sex", f"sex {shown}: the equations need female or male"))
    _race(inputs, patient)


# ---- conditions and medications ------------------------------------------------------------------------------


def _all_of(found: list[Finding], source: str, none: str, latest: bool = False) -> Finding:
    """A yes/no input: yes, naming each record once and dated by the earliest (or ``latest``) of them, or no."""
    if not found:
        return Finding(False, "", None, source, none)
    days = [f.date for f in found if f.date]
    when = (max(days) if latest else min(days)) if days else None
    names = "; ".join(dict.fromkeys(f.text for f in found))
    return Finding(True, "", when, ", ".join(dict.fromkeys(f.source for f in found)), names)


def _read_conditions(inputs: PceInputs, record: Record, unavailable: bool) -> None:
    if unavailable:
        inputs.conditions_read = False
        message = "conditions could not be fetched, so diabetes and clinical ASCVD are unknown"
        inputs.problems.append(Problem("diabetes", message))
        return
    inputs.ascvd = [condition_finding(c) for c in record.active_conditions(ASCVD)]
    diabetic = [condition_finding(c) for c in record.active_conditions(DIABETES)]
    inputs.findings["diabetes"] = _all_of(diabetic, "Condition", "no active diabetes condition")


def _inpatient_only(use: MedicationUse) -> bool:
    """An order given in hospital (category inpatient) or by injection (IV, IM, SC route): acute treatment."""
    request = use.request
    categories = request.get("category") if isinstance(request.get("category"), list) else []
    if any(INPATIENT in codes_in(c, MEDICATION_REQUEST_CATEGORY) for c in categories):
        return True
    for dosage in request.get("dosageInstruction") or ():
        route = dosage.get("route") if isinstance(dosage, dict) else None
        words = all_text(route).lower()
        if PARENTERAL_ROUTE.matches(route) or any(w in words for w in PARENTERAL_ROUTE_WORDS):
            return True
    return False


def _read_medications(inputs: PceInputs, record: Record, unavailable: bool) -> None:
    if unavailable:
        inputs.statin_status_known = False
        message = "medications could not be fetched, so blood-pressure treatment and statins are unknown"
        inputs.problems.append(Problem("treated_hypertension", message))
        return
    lowering = []
    for use in record.medication_requests():
        if use.concept is None:
            inputs.statin_status_known = False
            message = (
                "an active medication order names no readable medication: whether it treats blood pressure or is a "
                "statin is unknown"
            )
            inputs.problems.append(Problem("treated_hypertension", message, blocking=False, source=use.ref))
            continue
        day = use.start.day if use.start else None
        name = short(use.text or "unnamed medication", 80)
        if use.is_a(STATIN):
            inputs.statins.append(Finding(True, date=day, source=use.ref, text=name))
        drug_class = None if _inpatient_only(use) else classify(use.concept, BP_LOWERING)
        if drug_class:
            lowering.append(Finding(True, date=day, source=use.ref, text=f"{name} ({drug_class.name})"))
    none = "no active blood-pressure-lowering medication"
    # Dated by the latest active order: the treatment in force now, not the first prescription ever made.
    inputs.findings["treated_hypertension"] = _all_of(lowering, "MedicationRequest", none, latest=True)


# ---- extraction ----------------------------------------------------------------------------------------------


def _out_of_range(name: str, value: float) -> list[Problem]:
    """The equations' valid ranges (Goff 2013), worded with the units clinicians write."""
    low, high, unit = VALID_RANGES[name]
    if low <= value <= high:
        return []
    label = "age" if name == "age" else LABELS[name].lower().replace("hdl", "HDL")
    shown = UNIT_WORDS.get(unit, unit)
    return [Problem(name, f"{label} {number(value)} {shown} is outside {number(low)}–{number(high)}")]


def extract_inputs(
    patient: dict[str, Any] | None,
    observations: Iterable[dict[str, Any]],
    conditions: Iterable[dict[str, Any]],
    medications: Iterable[dict[str, Any]],
    today: date,
    unavailable: Iterable[str] = (),
    incomplete: Iterable[str] = (),
    old_after_years: int = 2,
) -> PceInputs:
    """Read every input of the equations and of the benefit groups from FHIR resources, in any order, as of
    ``today``; values measured more than ``old_after_years`` before it are marked old.

    ``observations`` may mix cholesterol, HDL, LDL, blood-pressure and smoking-status Observations;
    ``medications`` holds MedicationRequests and any Medications they refer to. ``unavailable`` names prefetch
    keys that could not be fetched, so that a gap is reported as unseen rather than as absent; ``incomplete`` names
    keys of which only some pages could be read: what they hold is used, and the card says they may be incomplete.
    """
    record = Record([*observations, *conditions, *medications])
    return _extract(patient, record, today, set(unavailable), set(incomplete), old_after_years)


def _extract(
    patient: dict[str, Any] | None,
    record: Record,
    today: date,
    unavailable: set[str],
    incomplete: set[str],
    old_after_years: int,
) -> PceInputs:
    inputs = PceInputs()
    _read_patient(inputs, patient, today)
    inputs.read_observations(READINGS, record, years_before(today, old_after_years), unavailable)
    # LDL cholesterol is not an input of the equations: without it the risk is still calculated.
    inputs.problems = [Problem(p.input, p.message, False, p.source) if p.input == "ldl" else p for p in inputs.problems]
    _read_conditions(inputs, record, "conditions" in unavailable)
    _read_medications(inputs, record, "medications" in unavailable)
    for name in ("age", "total_cholesterol", "hdl", "systolic_bp"):
        if name in inputs.findings:
            inputs.problems += _out_of_range(name, inputs.findings[name].value)
    partial = incomplete - unavailable
    if "medications" in partial:  # a statin may be on a page that could not be read: none is proposed then
        inputs.statin_status_known = False
    # Diabetes or ASCVD on an unread page could only move the patient to a group of higher intensity: the groups
    # are decided on what was read, and the card says the conditions may be incomplete.
    inputs.conditions_partial = "conditions" in partial
    note = incomplete_note(partial, KEY_WORDS)
    if note is not None:
        inputs.problems.append(note)
    return inputs


def inputs_from_call(call: ServiceCall, today: date, old_after_years: int = 2) -> PceInputs:
    """``extract_inputs`` over a hook call's resolved prefetch."""
    patient = Record.from_call(call, ("patient",)).patient
    record = Record.from_call(call, (*OBSERVATION_KEYS, "conditions", "medications"))
    inputs = _extract(patient, record, today, set(call.unavailable), set(call.incomplete), old_after_years)
    inputs.patient_id = call.request.patient_id  # suggestions name the patient in context, whatever a resource says
    return inputs


# ---- the explanation page's words for each input (stored with the result) --------------------------------------


def _shown(name: str, finding: Finding, esc: Callable[[str], str]) -> str:
    """The finding's value in words; ``esc`` neutralises record text (nothing for stored data)."""
    value = finding.value
    if name in ("total_cholesterol", "hdl", "ldl", "systolic_bp"):
        return f"{number(value)} {finding.unit}"
    if name == "age":
        return f"{value} years (birth date {esc(finding.text)})"
    if name == "race":
        return f"{esc(finding.text)}: {value} equations" if value != "other" else esc(finding.text)
    if name == "smoker":
        return f"{'current smoker' if value else 'not a current smoker'} ({esc(finding.text)})"
    if name in ("diabetes", "treated_hypertension"):
        return f"{'yes' if value else 'no'} ({esc(finding.text)})" if finding.text else str(value)
    return esc(str(value))


# The inputs as the explanation page shows them; ``loinc`` lists the codes that can carry each observation-based
# input, stored with the result so that the page can look for values newer than the card.
DISPLAY = InputDisplay(
    labels=LABELS,
    shown=_shown,
    old_after_years=2,
    date_verbs={"diabetes": "since", "treated_hypertension": "prescribed", "smoker": "recorded"},
    loinc={
        "total_cholesterol": TOTAL_CHOLESTEROL.in_system(LOINC),
        "hdl": HDL.in_system(LOINC),
        "ldl": LDL.in_system(LOINC),
        "systolic_bp": SYSTOLIC_BP.in_system(LOINC) + BP_PANEL.in_system(LOINC),
        "smoker": SMOKING_STATUS.in_system(LOINC),
    },
)


# ---- the card's words -----------------------------------------------------------------------------------------

# Guideline Table 3 (statin intensity): high = atorvastatin 40-80 mg or rosuvastatin 20-40 mg; moderate =
# atorvastatin 10-20 mg, rosuvastatin 5-10 mg, simvastatin 20-40 mg... RxNorm codes as in the NLM VSAC value sets
# High Intensity Statin Therapy (2.16.840.1.113883.3.526.3.1572) and Moderate (2.16.840.1.113883.3.526.3.1575).
ATORVASTATIN_40 = ProposedMedication(rxnorm="617311", display="atorvastatin 40 MG Oral Tablet", dose=40)
ATORVASTATIN_20 = ProposedMedication(rxnorm="617310", display="atorvastatin 20 MG Oral Tablet", dose=20)
PROPOSALS = {Advice.HIGH: ATORVASTATIN_40, Advice.MODERATE: ATORVASTATIN_20}
# Where each group's advice is in the guideline.
SECTIONS = {
    Group.ASCVD: "section 4.1",
    Group.SEVERE: "section 4.2",
    Group.DIABETES: "section 4.3",
    Group.PRIMARY: "section 4.4.2",
    Group.OLDER: "section 4.4.4",
}
CATEGORY_WORDS = {
    LOW: "low (under 5 %)",
    BORDERLINE: "borderline (5 % to under 7.5 %)",
    INTERMEDIATE: "intermediate (7.5 % to under 20 %)",
    HIGH: "high (20 % or more)",
}
UNKNOWN_STATIN = "Whether a statin is active is unknown: the medication list could not be fully read."
TABLE_HEADER = ("Input", "Value", "Date")
RISK_ROWS = ("patient", "total_cholesterol", "hdl", "ldl", "systolic_bp", "treated_hypertension", "smoker", "diabetes")
GROUP_ROWS = {Group.ASCVD: ("patient", "ascvd", "ldl"), Group.SEVERE: ("patient", "ldl")}


def _percent(risk: float) -> str:
    return f"{shown_percent(risk):.1f} %"


def _cite(group: Group) -> str:
    return f"({CHOLESTEROL_GUIDELINE_LABEL}, {SECTIONS[group]})"


def _risk_missing(inputs: PceInputs) -> str:
    """Why the risk was not calculated, in a few words (the first blocking problem, or the model's silence)."""
    blocking = inputs.blocking
    return blocking[0].message if blocking else "the model gave no result"


# What each group's advice means, in words: the card's first line, before the guideline section.
GUIDANCE = {
    (Group.ASCVD, Advice.HIGH): (
        "Clinical ASCVD at 75 or younger: a high-intensity statin, to lower LDL-C by 50 % or more. The risk "
        "equations estimate a first event, so no estimate is made"
    ),
    (Group.ASCVD, Advice.CLINICIAN): (
        "Clinical ASCVD over 75: a moderate- or high-intensity statin is reasonable after weighing benefit, adverse "
        "effects, interactions, frailty and preferences; none is proposed automatically"
    ),
    (Group.SEVERE, Advice.HIGH): (
        "LDL-C of 190 mg/dL or more at 20-75: a high-intensity statin without a risk estimate; look for secondary "
        "causes and familial hypercholesterolemia"
    ),
    (Group.DIABETES, Advice.HIGH): (
        "Diabetes at 40-75 with a risk of 20 % or more: a high-intensity statin, to lower LDL-C by 50 % or more"
    ),
    (Group.DIABETES, Advice.MODERATE): (
        "Diabetes at 40-75: a moderate-intensity statin whatever the risk; high intensity is reasonable with "
        "several risk factors"
    ),
    (Group.PRIMARY, Advice.HIGH): "Risk of 20 % or more: a high-intensity statin, to lower LDL-C by 50 % or more",
    (Group.PRIMARY, Advice.MODERATE): (
        "Risk of 7.5 % to under 20 %: a moderate-intensity statin, to lower LDL-C by 30-49 %, if a risk discussion "
        "weighing risk enhancers favours it"
    ),
    (Group.PRIMARY, Advice.DISCUSS): (
        "Risk of 5 % to under 7.5 %: discuss a moderate-intensity statin if risk enhancers are present, such as "
        "premature ASCVD in the family or LDL-C of 160 mg/dL or more; none is proposed automatically"
    ),
    (Group.PRIMARY, Advice.LIFESTYLE): (
        "Risk under 5 %: emphasise a heart-healthy lifestyle; the risk alone calls for no statin"
    ),
    (Group.PRIMARY, Advice.CLINICIAN): (
        "LDL-C under 70 mg/dL: the risk-based statin recommendations are for LDL-C of 70-189 mg/dL, so none is "
        "proposed; the decision is the clinician's"
    ),
    (Group.OLDER, Advice.CLINICIAN): (
        "Over 75 without clinical ASCVD, starting a statin is decided with the patient (a moderate-intensity "
        "statin may be reasonable); none is proposed automatically"
    ),
}


def guidance(decision: Decision, inputs: PceInputs, risk: float | None) -> str:
    """What the group calls for and why, with the guideline section: the card's first line (plain text)."""
    text = GUIDANCE[decision.group, decision.advice]
    if decision.group is Group.DIABETES and risk is None:
        text = (
            "Diabetes at 40-75: a moderate-intensity statin whatever the risk. The risk was not calculated "
            f"({_risk_missing(inputs)}): at 20 % or more a high-intensity statin is advised"
        )
    return f"{text} {_cite(decision.group)}."


def _action_words(decision: Decision, inputs: PceInputs) -> str:
    """The summary's action: what the group calls for, or why nothing is proposed."""
    advice = decision.advice
    if inputs.statins:
        return "statin already active"
    if decision.calls_for_statin:
        words = f"{advice.value} recommended"
        return words if inputs.statin_status_known else f"{words}, statin use unknown"
    if advice is Advice.DISCUSS:
        return "discuss a statin if risk enhancers are present"
    if advice is Advice.LIFESTYLE:
        return "lifestyle advice, no statin indicated"
    if decision.group is Group.PRIMARY:
        return "LDL-C under 70 mg/dL, statin is the clinician's call"
    return "statin is the clinician's call"


def _used(decision: Decision) -> tuple[str, ...]:
    """The dated inputs the card's advice rests on (their age is flagged in the summary)."""
    if decision.group is Group.ASCVD:
        return ()
    if decision.group is Group.SEVERE:
        return ("ldl",)
    ldl = ("ldl",) if decision.advice is Advice.CLINICIAN and decision.group is Group.PRIMARY else ()
    return ("total_cholesterol", "hdl", "systolic_bp", "smoker", *ldl)


def _old_flag(inputs: PceInputs, names: Iterable[str], options: CardOptions) -> str:
    found = [inputs.findings[n] for n in names if n in inputs.findings]
    return f"; values over {options.old_after_years} years old" if any(f.old for f in found) else ""


def summary(decision: Decision, inputs: PceInputs, risk: float | None, options: CardOptions) -> str:
    """One sentence under 140 characters: the number (or the group), its category, the action, old values."""
    group = decision.group
    if group is Group.ASCVD:
        head = "Clinical ASCVD on record" + (f" at age {inputs.age}" if decision.advice is Advice.CLINICIAN else "")
    elif group is Group.SEVERE:
        head = f"LDL-C {number(inputs.findings['ldl'].value)} mg/dL (190 or more)"
    elif risk is None:  # diabetes without the risk
        head = "Diabetes at 40-75, risk not calculated"
    else:
        head = f"10-year ASCVD risk {_percent(risk)} ({risk_category(risk)})"
        head += {Group.DIABETES: " with diabetes", Group.OLDER: f" at age {inputs.age}"}.get(group, "")
    partial = "; conditions incomplete" if inputs.conditions_partial and group is not Group.ASCVD else ""
    return fit_summary(
        f"{head}: ", _action_words(decision, inputs), _old_flag(inputs, _used(decision), options) + partial
    )


def _cell(name: str, inputs: PceInputs) -> tuple[str, str]:
    """An input's value and date as the card's table shows them (record text unescaped: the table escapes)."""
    if name == "patient":
        age, sex, race = (inputs.findings.get(n) for n in ("age", "sex", "race"))
        parts = [f"{inputs.age if inputs.age is not None else age.value} years" if age else "age unknown"]
        parts += [sex.value] if sex else []
        if race:
            parts.append(race.text if race.value != "other" else f"{race.text} (white equations)")
        return ", ".join(parts), ""
    if name == "ascvd":
        days = [c.date for c in inputs.ascvd if c.date]
        names = "; ".join(dict.fromkeys(c.text for c in inputs.ascvd))
        return names, f"since {min(days).isoformat()}" if days else ""
    finding = inputs.findings.get(name)
    if finding is None:
        problem = next((p for p in inputs.problems if p.input == name), None)
        if problem is None or problem.message.startswith("no "):
            return "not on record", ""
        return problem.message, ""
    when = finding.date.isoformat() if finding.date else ""
    if name in ("total_cholesterol", "hdl", "ldl", "systolic_bp"):
        value = f"{number(finding.value)} {finding.unit}" + (f" ({finding.note})" if finding.note else "")
        return value, when
    if name == "smoker":
        return f"{'current smoker' if finding.value else 'not a current smoker'} ({finding.text})", when
    verb = DISPLAY.date_verb(name)
    if finding.value:
        return f"yes: {finding.text}", f"{verb} {when}" if when else ""
    return (
        ("none in the pages read (incomplete)", "") if name == "diabetes" and inputs.conditions_partial else ("no", "")
    )


def _table(inputs: PceInputs, names: Iterable[str]) -> list[str]:
    rows = [(LABELS.get(n, "Patient" if n == "patient" else "Clinical ASCVD"), *_cell(n, inputs)) for n in names]
    return markdown_table(TABLE_HEADER, rows)


def _statin_names(inputs: PceInputs) -> str:
    return "; ".join(dict.fromkeys(s.text for s in inputs.statins))


def _statin_line(decision: Decision, inputs: PceInputs) -> list[str]:
    """One line on statins: already active (so none proposed), unknown, or none active when one is called for."""
    if inputs.statins:
        line = f"Statin already active: {_statin_names(inputs)}"
        line += ", so none is proposed" if decision.calls_for_statin else ""
        if decision.advice is Advice.HIGH:
            line += f"; {decision.group.value} calls for high intensity"
        elif decision.uses_risk:
            line += "; the cholesterol values used may be on treatment"
        return [inline_markdown(line + ".")]
    if not inputs.statin_status_known:
        if decision.calls_for_statin:
            return ["No statin is proposed: the medication list could not be fully read."]
        return [UNKNOWN_STATIN]
    return ["No statin is active."] if decision.calls_for_statin else []


def _statin_status(inputs: PceInputs) -> list[str]:
    """The fallback card's statin line: active, unknown or none."""
    if inputs.statins:
        return [inline_markdown(f"Statin already active: {_statin_names(inputs)}.")]
    return [UNKNOWN_STATIN if not inputs.statin_status_known else "No statin is active."]


def _bullets(problems: Iterable[Problem]) -> list[str]:
    return [f"- {inline_markdown(p.message)}" for p in problems]


def _notes(inputs: PceInputs) -> list[str]:
    """Notes that bear on the card (incomplete data, newer values not used, unreadable orders); LDL's are in the
    table."""
    return [inline_markdown(f"Note: {p.message}") for p in inputs.notes if p.input != "ldl"]


def _source(decision: Decision, prediction: Prediction | None, note: str = "") -> Source:
    if decision.uses_risk or decision.group is None:
        shown = f"{prediction.model} {prediction.version}" if prediction is not None else note
        return Source(label=f"{GUIDELINE_LABEL} ({shown})", url=GUIDELINE_URL)
    return Source(label=CHOLESTEROL_GUIDELINE_LABEL, url=CHOLESTEROL_GUIDELINE_URL)


def _statin_suggestion(decision: Decision, inputs: PceInputs, risk: float | None) -> Suggestion:
    """A draft MedicationRequest of the group's intensity (Table 3), citing why."""
    drug, intensity, group = PROPOSALS[decision.advice], decision.advice.value, decision.group
    why = group.value[0].upper() + group.value[1:]
    if risk is not None:
        why = f"10-year ASCVD risk {_percent(risk)} (ACC/AHA Pooled Cohort Equations)"
        why = f"Diabetes, {why}" if group is Group.DIABETES else why
    reason = f"{why}: {intensity} {_cite(group)}"
    label = f"Propose atorvastatin {drug.dose} mg daily ({intensity})"
    description = f"Propose {drug.display} {drug.frequency.words}, as a draft for the clinician to review and sign"
    return suggest_creating(label, description, medication_proposal(inputs.patient_id, drug, reason))


def _group_card(decision: Decision, inputs: PceInputs, prediction: Prediction | None, options: CardOptions) -> Card:
    risk = risk_of(prediction)
    rows = GROUP_ROWS.get(decision.group, RISK_ROWS)
    lines = [inline_markdown(guidance(decision, inputs, risk)), "", *_table(inputs, rows), ""]
    lines += _statin_line(decision, inputs) + _notes(inputs)
    suggest = decision.calls_for_statin and not inputs.statins and inputs.statin_status_known and inputs.patient_id
    suggestions = [_statin_suggestion(decision, inputs, risk)] if suggest else []
    action_needed = decision.calls_for_statin and not inputs.statins
    links = []
    if decision.uses_risk:
        links = [
            Link(label=ESTIMATOR_LABEL, url=ESTIMATOR_URL),
            Link(CHOLESTEROL_GUIDELINE_LABEL, CHOLESTEROL_GUIDELINE_URL),
        ]
    return Card(
        summary=summary(decision, inputs, risk, options),
        indicator="warning" if action_needed else "info",
        detail="\n".join(lines).strip(),
        source=_source(decision, prediction, "risk not calculated"),
        suggestions=suggestions,
        selectionBehavior="at-most-one" if suggestions else None,
        overrideReasons=override_reasons() if suggestions else [],
        links=links,
    )


def _not_calculated_card(inputs: PceInputs) -> Card:
    """An eligible patient whose group or risk needs data the record does not give: what is missing, briefly."""
    blocking = inputs.blocking or [Problem("model", "the model gave no result")]
    more = f" (+{len(blocking) - 1} more)" if len(blocking) > 1 else ""
    text = fit_summary("10-year ASCVD risk not calculated: ", blocking[0].message, more)
    notes = _notes(inputs)
    lines = ["Missing or not usable:", *_bullets(blocking), *([""] + notes if notes else [])]
    source = Source(label=f"{GUIDELINE_LABEL} (not calculated)", url=GUIDELINE_URL)
    links = [Link(label=ESTIMATOR_LABEL, url=ESTIMATOR_URL)]
    return Card(summary=text, indicator="info", detail="\n".join(lines), source=source, links=links)


def _not_applicable_card(inputs: PceInputs) -> Card:
    """For a site that wants to see it: why the service says nothing for this patient."""
    facts = facts_of(inputs)
    if facts.deceased:
        reason = "the patient is recorded as deceased"
        why = "The service gives no advice for a deceased patient."
    else:
        reason = f"no statin benefit group applies at age {facts.age}"
        why = (
            f"The {CHOLESTEROL_GUIDELINE_LABEL}'s statin groups cover ages {ADULT_AGE}-{STATIN_AGE_LIMIT} "
            f"(under {EQUATION_AGES[0]}: clinical ASCVD or LDL-C of 190 mg/dL or more only) and the risk equations "
            f"ages {EQUATION_AGES[0]}-{OLDEST_AGE}."
        )
    source = Source(label=f"{GUIDELINE_LABEL} (not applicable)", url=GUIDELINE_URL)
    return Card(summary=f"Cardiovascular risk not assessed: {reason}", indicator="info", detail=why, source=source)


def risk_of(prediction: Prediction | None) -> float | None:
    return float(prediction.outputs["risk"]) if prediction is not None and "risk" in prediction.outputs else None


def build_cards(inputs: PceInputs, prediction: Prediction | None, options: CardOptions | None = None) -> list[Card]:
    """The card for the patient's benefit group (with the risk when the group uses it), a short card saying what
    is missing when the group or its risk cannot be told, or none when the service does not apply (an
    informational card instead when the site asked for them)."""
    options = options or CardOptions()
    decision = decide(facts_of(inputs, risk_of(prediction)))
    if decision is None:
        return [_not_applicable_card(inputs)] if options.info_cards else []
    if decision.advice is Advice.NOT_CALCULATED:
        return [_not_calculated_card(inputs)]
    return [_group_card(decision, inputs, prediction, options)]


def fallback(call: ServiceCall, reason: str) -> list[Card]:
    """Without the model: for a patient whose group needs the risk, what to do instead and the values the record
    holds for the calculator; the ordinary card for a group that needs no risk; nothing when the service does not
    apply."""
    made_at = datetime.now(UTC)
    options = CardOptions.from_config()
    shown = short(str(reason).replace("-", " "), 40)
    lines = [
        f"The 10-year ASCVD risk could not be calculated now ({inline_markdown(shown)}). Estimate it with the "
        f"{ESTIMATOR_LABEL} (link below)."
    ]
    inputs = None
    try:
        inputs = inputs_from_call(call, today(), options.old_after_years)
        scope = decide(facts_of(inputs))
        # No model needed (clinical ASCVD, LDL-C >= 190), or a diabetic at 40-75, whose moderate-intensity statin
        # the risk only raises to high (section 4.3): the ordinary card, which says the risk is not calculated.
        no_model = scope is None or not (scope.uses_risk or scope.group is None) or scope.group is Group.DIABETES
        if no_model:
            cards = build_cards(inputs, None, options)
            if not cards:
                return []
            return with_link(cards, call.explain(explanation(inputs, None, made_at=made_at, options=options)))
        found = [n for n in RISK_ROWS if n == "patient" or n in inputs.findings]
        lines += ["", *_table(inputs, found), "", *_statin_status(inputs)]
        if inputs.blocking:
            lines += ["", "Missing or not usable:", *_bullets(inputs.blocking)]
        lines += [inline_markdown(f"Note: {p.message}") for p in inputs.notes if p.input == INCOMPLETE]
        old = _old_flag(inputs, ("total_cholesterol", "hdl", "systolic_bp", "smoker"), options)
    except Exception:  # the fallback must answer even when the record cannot be read
        inputs, old = None, ""
        lines.append("\nThe record's values could not be listed.")
    text = fit_summary(f"Cardiovascular risk unavailable ({shown}): ", "estimate with the ACC/AHA risk calculator", old)
    source = Source(label=f"{GUIDELINE_LABEL} (AI result unavailable: {short(reason, 40)})", url=GUIDELINE_URL)
    card = Card(
        summary=text,
        indicator="info",
        detail="\n".join(lines),
        source=source,
        links=[Link(label=ESTIMATOR_LABEL, url=ESTIMATOR_URL)],
    )
    data = explanation(inputs, None, made_at=made_at, fallback_reason=str(reason), options=options)
    return with_link([card], call.explain(data))


# ---- what the explanation page shows (stored under an opaque id that the card's SMART link carries) ----------


def _statin_entry(inputs: PceInputs) -> dict[str, Any]:
    if inputs.statins:
        return {"status": "active", "items": [s.cited() for s in inputs.statins]}
    return {"status": "none" if inputs.statin_status_known else "unknown", "items": []}


NO_RISK_REASONS = {
    Group.ASCVD: "clinical ASCVD is on record, and the equations estimate the risk of a first event",
    Group.SEVERE: "with LDL-C of 190 mg/dL or more a high-intensity statin is advised without a risk estimate",
}


def explanation(
    inputs: PceInputs | None,
    prediction: Prediction | None,
    *,
    made_at: datetime,
    fallback_reason: str | None = None,
    options: CardOptions | None = None,
) -> dict[str, Any]:
    """Everything the explanation page shows for one card, as plain JSON (the record's own words, unescaped)."""
    options = options or CardOptions()
    record_read = inputs is not None
    inputs = inputs if inputs is not None else PceInputs(statin_status_known=False)
    risk = risk_of(prediction)
    decision = decide(facts_of(inputs, risk)) if record_read else None
    blocking = inputs.blocking
    if decision is not None and decision.group in NO_RISK_REASONS:
        blocking = []  # no risk is needed: what the equations would have lacked is beside the point
    elif risk is None and record_read and not blocking and fallback_reason is None and decision and decision.uses_risk:
        blocking = [Problem("model", "the model gave no result")]
    model: dict[str, Any] = {"name": MODEL, "version": None, "equation": None, "notes": []}
    if prediction is not None:
        model = {
            "name": prediction.model,
            "version": prediction.version,
            "equation": prediction.outputs.get("equation"),
            "notes": [str(n) for n in prediction.outputs.get("notes") or ()],
        }
    advice = None
    if decision is not None and decision.group is not None and decision.advice is not Advice.NOT_CALCULATED:
        advice = {
            "group": decision.group.value,
            "advice": decision.advice.value,
            "text": guidance(decision, inputs, risk),
            "no_risk_reason": NO_RISK_REASONS.get(decision.group),
        }
    return {
        "made_at": made_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "risk": risk,
        "risk_text": _percent(risk) if risk is not None else None,
        "category": risk_category(risk) if risk is not None else None,
        "record_read": record_read,
        "decision": advice,
        "old_after_years": options.old_after_years,
        **DISPLAY.explained(inputs, blocking),
        "statin": _statin_entry(inputs),
        "ascvd": [c.cited() for c in inputs.ascvd],
        "model": model,
        "guideline": {"label": GUIDELINE_LABEL, "url": GUIDELINE_URL},
        "cholesterol_guideline": {"label": CHOLESTEROL_GUIDELINE_LABEL, "url": CHOLESTEROL_GUIDELINE_URL},
        "estimator": {"label": ESTIMATOR_LABEL, "url": ESTIMATOR_URL},
        "fallback": fallback_reason is not None,
        "fallback_reason": fallback_reason,
        **DISPLAY.codes(),
    }


# ---- the explanation page (cds_services/templates/smart/cardiovascular_risk.html) ------------------------------


def explanation_view(result: StoredResult, context: LaunchContext) -> dict[str, Any]:
    """The page's ``risk``: the stored explanation, in words, with the values recorded since the card."""
    data = result.data if isinstance(result.data, dict) else {}
    guideline, estimator, statin = (section(data, name) for name in ("guideline", "estimator", "statin"))
    cholesterol, decision = section(data, "cholesterol_guideline"), section(data, "decision")
    old_after = data.get("old_after_years")
    return {
        "risk": {
            **result_view(result, context),
            "risk_text": data.get("risk_text"),
            "category": CATEGORY_WORDS.get(data.get("category"), data.get("category")),
            "recommendation": decision.get("text") or "",
            "group": decision.get("group") or "",
            "no_risk_reason": decision.get("no_risk_reason") or "",
            "old_after_years": old_after if isinstance(old_after, int) else 2,
            "statin_status": statin.get("status"),
            "statins": dated(statin.get("items")),
            "ascvd": dated(data.get("ascvd")),
            "model_equation": section(data, "model").get("equation"),
            "guideline_label": guideline.get("label") or GUIDELINE_LABEL,
            "guideline_url": guideline.get("url") or "",
            "cholesterol_label": cholesterol.get("label") or CHOLESTEROL_GUIDELINE_LABEL,
            "cholesterol_url": cholesterol.get("url") or "",
            "estimator_label": estimator.get("label") or "",
            "estimator_url": estimator.get("url") or "",
        }
    }


# ---- population scoring (gateway batch): the hook's own reading, decision, model and proposal, per patient ----


def _not_scored(inputs: PceInputs, decision: Decision | None) -> NotScored:
    """Why a patient has no risk: not applicable, a group that needs none, or what is missing."""
    if decision is None:
        facts = facts_of(inputs)
        if facts.deceased:
            return NotScored("deceased", "the patient is recorded as deceased")
        return NotScored("age", f"no statin benefit group applies at age {facts.age}")
    if decision.group in NO_RISK_REASONS:
        return NotScored("ascvd" if decision.group is Group.ASCVD else "ldl", NO_RISK_REASONS[decision.group])
    problem = (inputs.blocking or [Problem("model", "the model gave no result")])[0]
    return NotScored(problem.input, problem.message)


def _with_action(outcome: NotScored, cards: list[Card]) -> NotScored:
    """The outcome with the action the hook's card proposes without a risk (clinical ASCVD, LDL-C >= 190)."""
    action = next((s.label for card in cards for s in card.suggestions), None)
    return replace(outcome, action=action) if action else outcome


def score_patient(patient: PatientResources) -> Scored | NotScored:
    """One patient of a population: the inputs as the hook reads them, the risk through ``app.ai.infer`` when the
    group uses it, and the action the hook's card would propose; NotScored when the card shows no risk. A model
    that is unavailable raises (the batch pauses the part)."""
    medications = patient.of_type("MedicationRequest") + list(patient.shared.values())
    options = CardOptions.from_config()
    inputs = extract_inputs(
        patient.patient,
        patient.of_type("Observation"),
        patient.of_type("Condition"),
        medications,
        patient.today,
        old_after_years=options.old_after_years,
    )
    inputs.patient_id = patient.patient_id
    if not needs_risk(inputs):
        return _with_action(_not_scored(inputs, decide(facts_of(inputs))), build_cards(inputs, None, options))
    try:
        prediction = infer(MODEL, inputs.model_inputs())
    except InvalidModelInput as exc:
        return NotScored("model", f"the model did not accept these inputs: {exc}")
    risk = risk_of(prediction)
    if risk is None:
        return _with_action(_not_scored(inputs, decide(facts_of(inputs))), build_cards(inputs, prediction, options))
    [card] = build_cards(inputs, prediction, options)
    return Scored(
        probability=risk,
        category=risk_category(risk),
        model=prediction.model,
        version=prediction.version,
        basis=inputs.basis(MODEL_INPUTS),  # the resources the estimate used, the patient first
        action=card.suggestions[0].label if card.suggestions else None,
        note=card.summary,
    )


POPULATION = Population(
    score=score_patient,
    outcome="First atherosclerotic cardiovascular disease (ASCVD) event within 10 years",
    method=GUIDELINE_LABEL,
    categories=(LOW, BORDERLINE, INTERMEDIATE, HIGH),
    reasons={
        **LABELS,
        "patient": "No usable patient record",
        "deceased": "Deceased",
        "age": "No statin benefit group at this age",
        "ascvd": "Clinical ASCVD (secondary prevention, no risk estimate)",
        "ldl": "LDL-C 190 mg/dL or more (no risk estimate needed)",
        "model": "Model refused",
    },
)


@cds_service(
    id="cardiovascular-risk",
    hook="patient-view",
    title="Cardiovascular risk and statin benefit groups (ACC/AHA)",
    description=(
        "The 2018 AHA/ACC cholesterol guideline's statin benefit groups (clinical ASCVD, LDL-C 190 mg/dL or more, "
        "diabetes at 40-75, primary prevention by the 10-year ASCVD risk from the 2013 Pooled Cohort Equations), "
        "with the inputs used and their dates, and a statin proposal of the group's intensity when none is active."
    ),
    prefetch=PREFETCH,
    fallback=fallback,
    explanation=Explanation(
        label=EXPLANATION_LABEL,
        title="Cardiovascular risk: how this estimate was made",
        template="smart/cardiovascular_risk.html",
        view=explanation_view,
    ),
    settings=SETTINGS,
    population=POPULATION,
)
def cardiovascular_risk(call: ServiceCall) -> list[Card]:
    made_at = datetime.now(UTC)
    options = CardOptions.from_config()
    inputs = inputs_from_call(call, today(), options.old_after_years)
    prediction = infer(MODEL, inputs.model_inputs()) if needs_risk(inputs) else None
    cards = build_cards(inputs, prediction, options)
    if not cards:
        return []
    return with_link(cards, call.explain(explanation(inputs, prediction, made_at=made_at, options=options)))
