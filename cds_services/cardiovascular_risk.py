"""The ``cardiovascular-risk`` service (patient-view): 10-year ASCVD risk from the ACC/AHA Pooled Cohort Equations.

The record is read into the equations' inputs by pure functions (``extract_inputs``, over ``app.fhir.record``),
each input with its value, unit, date and source; the risk comes from the ``ascvd-pce`` model through
``app.ai.infer``; ``build_cards`` turns both into one card that says what was used, what was missing and how old
each value is, with a statin proposal when the 2018 ACC/AHA cholesterol guideline threshold (7.5 %) is met and no
statin is active.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any

from app.ai import InvalidModelInput, Prediction, infer
from app.ai.models.pce import BORDERLINE, HIGH, INTERMEDIATE, LOW, out_of_range, risk_category
from app.batch.scoring import NotScored, PatientResources, Population, Scored
from app.cds.cards import Action, Card, Indicator, Link, Source, Suggestion, escape_markdown
from app.cds.service import Explanation, PrefetchKey, ServiceCall, cds_service
from app.fhir.codes import (
    ASCVD,
    BP_LOWERING,
    BP_PANEL,
    CURRENT_SMOKER,
    DIABETES,
    HDL,
    LOINC,
    NON_SMOKER,
    OMB_BLACK,
    OMB_HISPANIC,
    OMB_WHITE,
    RXNORM,
    SMOKING_STATUS,
    SMOKING_UNKNOWN,
    SNOMED,
    STATIN,
    SYSTOLIC_BP,
    TOTAL_CHOLESTEROL,
    UCUM,
    US_CORE_RACE,
    CodeSet,
    classify,
)
from app.fhir.record import (
    CHOLESTEROL,
    Read,
    Reader,
    Record,
    age_on,
    answer,
    concept_text,
    deceased,
    number,
    onset,
    quantity,
    ref,
    short,
    us_core_category,
    years_before,
)
from app.results import StoredResult
from app.smart.pages import LaunchContext, LiveCheckUnavailable, NewerValue, card_time, newer_values, when

MODEL = "ascvd-pce"
GUIDELINE_URL = "https://doi.org/10.1161/01.cir.0000437741.48606.98"
ESTIMATOR_URL = "https://tools.acc.org/ascvd-risk-estimator-plus/"
ESTIMATOR_LABEL = "ACC/AHA ASCVD Risk Estimator Plus"
GUIDELINE_LABEL = "ACC/AHA Pooled Cohort Equations 2013"
EXPLANATION_LABEL = "Explain this result: inputs, dates, model"
OLD_AFTER_YEARS = 2

# The LOINC codes that can carry each observation-based input, stored with the result so that the explanation
# page can look for values newer than the card.
LOINC_BY_INPUT = {
    "total_cholesterol": TOTAL_CHOLESTEROL.in_system(LOINC),
    "hdl": HDL.in_system(LOINC),
    "systolic_bp": SYSTOLIC_BP.in_system(LOINC) + BP_PANEL.in_system(LOINC),
    "smoker": SMOKING_STATUS.in_system(LOINC),
}


def _observation_search(codes: CodeSet) -> PrefetchKey:
    search = f"Observation?patient={{{{context.patientId}}}}&code={codes.search_token()}&_sort=-date&_count=5"
    return PrefetchKey(search, required=False, pages="first")


# The observation searches sort newest first, so their first page holds the values used: no next page is read.
# Conditions and medications need every page (diabetes, ASCVD or a statin may be on any of them).
PREFETCH = {
    "patient": PrefetchKey("Patient/{{context.patientId}}", required=True),
    "totalCholesterol": _observation_search(TOTAL_CHOLESTEROL),
    "hdl": _observation_search(HDL),
    "bloodPressure": _observation_search(BP_PANEL | SYSTOLIC_BP),
    "smoking": _observation_search(SMOKING_STATUS),
    "conditions": PrefetchKey("Condition?patient={{context.patientId}}", required=False),
    "medications": PrefetchKey("MedicationRequest?patient={{context.patientId}}&status=active", required=False),
}
OBSERVATION_KEYS = ("totalCholesterol", "hdl", "bloodPressure", "smoking")
# How the card names a prefetch key that may be incomplete (not every page of it could be read).
KEY_WORDS = {
    "patient": "the patient record",
    "totalCholesterol": "total cholesterol results",
    "hdl": "HDL results",
    "bloodPressure": "blood-pressure results",
    "smoking": "smoking status results",
    "conditions": "conditions",
    "medications": "medications",
}
INCOMPLETE = "incomplete"
LABELS = {
    "age": "Age",
    "sex": "Sex",
    "race": "Race",
    "total_cholesterol": "Total cholesterol",
    "hdl": "HDL cholesterol",
    "systolic_bp": "Systolic blood pressure",
    "smoker": "Smoking status",
    "diabetes": "Diabetes",
    "treated_hypertension": "Blood-pressure treatment",
}
MODEL_INPUTS = tuple(LABELS)
_FIRST_REASONS = {"patient": 0, "deceased": 1, "age": 2, "sex": 3}

# Moderate-intensity statin proposed at >= 7.5 % (2018 ACC/AHA cholesterol guideline).
STATIN_PROPOSAL = {
    "code": "617310",
    "display": "atorvastatin 20 MG Oral Tablet",
    "dose_mg": 20,
    "label": "Propose atorvastatin 20 mg daily (moderate-intensity statin)",
}


def today() -> date:
    """Today's date; a separate function so that pure tests can pass or patch another day."""
    return date.today()


@dataclass(frozen=True)
class Finding:
    """One input as found in the record. ``text`` is record text: escape it before it reaches Markdown."""

    value: Any
    unit: str = ""
    date: date | None = None
    source: str = ""
    text: str = ""
    note: str = ""
    old: bool = False


@dataclass(frozen=True)
class Problem:
    """Why an input is missing or unusable; a blocking problem prevents the risk."""

    input: str
    message: str
    blocking: bool = True


@dataclass
class PceInputs:
    """What the record gave for each input of the equations, and what it did not."""

    patient_id: str | None = None
    findings: dict[str, Finding] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    statins: list[Finding] = field(default_factory=list)
    ascvd: list[Finding] = field(default_factory=list)
    statin_status_known: bool = True

    @property
    def blocking(self) -> list[Problem]:
        """Problems that prevent the risk, the most fundamental first (a deceased patient, then age, then sex)."""
        return sorted((p for p in self.problems if p.blocking), key=lambda p: _FIRST_REASONS.get(p.input, 9))

    @property
    def notes(self) -> list[Problem]:
        return [p for p in self.problems if not p.blocking]

    def model_inputs(self) -> dict[str, Any]:
        """The ``ascvd-pce`` inputs; only meaningful when nothing is blocking."""
        return {key: self.findings[key].value for key in MODEL_INPUTS if key in self.findings}


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


@dataclass(frozen=True)
class _Reading:
    """One observation-based input: its prefetch key, code set (whose name labels it), reader and display unit."""

    name: str
    key: str
    codes: CodeSet
    read: Reader
    unit: str = ""


READINGS = (
    _Reading("total_cholesterol", "totalCholesterol", TOTAL_CHOLESTEROL, quantity("mg/dL", CHOLESTEROL), "mg/dL"),
    _Reading("hdl", "hdl", HDL, quantity("mg/dL", CHOLESTEROL), "mg/dL"),
    _Reading("systolic_bp", "bloodPressure", SYSTOLIC_BP, quantity("mm[Hg]"), "mm Hg"),
    _Reading("smoker", "smoking", SMOKING_STATUS, answer(_smoking_status)),
)


def _read_latest(inputs: PceInputs, reading: _Reading, record: Record, today: date) -> None:
    """Record the latest observation with a usable value; say which newer ones were skipped and why.

    Two usable results at the same instant that disagree are a conflict the record must resolve: no value is
    picked from them, since which one is right cannot be told (and bundle order means nothing).
    """
    label, latest = reading.codes.name, record.latest(reading.codes, reading.read)
    skipped = [f"{s.ref} ({s.day.isoformat() if s.day else 'undated'}): {s.reason}" for s in latest.skipped]
    found = latest.reading
    if found is None:
        message = f"{label} not usable: {skipped[0]}" if skipped else f"no {label} in the record"
        inputs.problems.append(Problem(reading.name, message))
        return
    if reading.unit:  # quantities agree when they agree to the decimal shown
        values = latest.conflicting(lambda r: round(r.value, 1))
        conflict = f"{' vs '.join(number(v) for v in sorted(round(r.value, 1) for r in values))} {reading.unit}"
    else:
        values = latest.conflicting()
        conflict = " vs ".join(sorted({r.text for r in latest.same_time}))
    if values:
        message = f"{label} results at the same time on {found.day.isoformat()} disagree: {conflict}"
        inputs.problems.append(Problem(reading.name, message))
        return
    old = found.day is not None and found.day < years_before(today, OLD_AFTER_YEARS)
    inputs.findings[reading.name] = Finding(
        found.value, reading.unit, found.day, found.ref, found.text, found.note, old
    )
    for reason in skipped:
        inputs.problems.append(Problem(reading.name, f"a newer {label} was not used, {reason}", False))


# ---- the patient ---------------------------------------------------------------------------------------------


def _age(inputs: PceInputs, birth_date: Any, today: date) -> None:
    age = age_on(birth_date, today)
    if isinstance(age, str):
        inputs.problems.append(Problem("age", age))
        return
    youngest, oldest, text = age.least, age.most, age.written
    if youngest == oldest:
        inputs.findings["age"] = Finding(youngest, "years", None, "Patient.birthDate", text)
        return
    # A partial birth date: the age the patient has certainly reached, used only if every possible age is valid.
    if out_of_range({"age": youngest}) or out_of_range({"age": oldest}):
        inputs.problems.append(
            Problem("age", f"age {youngest} or {oldest} (birth date {text} is partial) may be outside 40–79")
        )
        return
    note = f"at least {youngest}: the birth date ({text}) is partial"
    inputs.findings["age"] = Finding(youngest, "years", None, "Patient.birthDate", text, note)


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


def _read_patient(inputs: PceInputs, patient: dict[str, Any] | None, today: date) -> None:
    if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
        inputs.problems.append(Problem("patient", "the patient record could not be read"))
        return
    inputs.patient_id = patient.get("id") if isinstance(patient.get("id"), str) else inputs.patient_id
    if deceased(patient):
        inputs.problems.append(Problem("deceased", "the patient is recorded as deceased"))
    _age(inputs, patient.get("birthDate"), today)
    gender = patient.get("gender")
    if gender in ("female", "male"):
        inputs.findings["sex"] = Finding(gender, "", None, "Patient.gender")
    else:
        shown = f"recorded as {short(gender, 12)!r}" if isinstance(gender, str) else "not recorded"
        inputs.problems.append(Problem("sex", f"sex {shown}: the equations need female or male"))
    _race(inputs, patient)


# ---- conditions and medications ------------------------------------------------------------------------------


def _condition_finding(condition: dict[str, Any]) -> Finding:
    when = onset(condition)
    text = short(concept_text(condition.get("code")) or "unnamed condition", 80)
    return Finding(True, "", when.day if when else None, ref(condition), text)


def _any_of(found: list[Finding], source: str, none: str) -> Finding:
    """A yes/no input: yes, dated by the first record found and citing them all, or no (``none`` says what)."""
    if found:
        return Finding(True, "", found[0].date, ", ".join(f.source for f in found), "; ".join(f.text for f in found))
    return Finding(False, "", None, source, none)


def _read_conditions(inputs: PceInputs, record: Record, unavailable: bool) -> None:
    inputs.ascvd = [_condition_finding(c) for c in record.active_conditions(ASCVD)]
    if unavailable:
        inputs.problems.append(Problem("diabetes", "conditions could not be fetched, so diabetes is unknown"))
        return
    diabetic = [_condition_finding(c) for c in record.active_conditions(DIABETES)]
    inputs.findings["diabetes"] = _any_of(diabetic, "Condition", "no active diabetes condition")


def _read_medications(inputs: PceInputs, record: Record, unavailable: bool) -> None:
    if unavailable:
        inputs.statin_status_known = False
        message = "medications could not be fetched, so blood-pressure treatment is unknown"
        inputs.problems.append(Problem("treated_hypertension", message))
        return
    lowering = []
    for use in record.medication_requests():
        if use.concept is None:
            inputs.statin_status_known = False
            message = f"{use.ref} {use.why}: whether it lowers blood pressure or is a statin is unknown"
            inputs.problems.append(Problem("treated_hypertension", message, blocking=False))
            continue
        day = use.start.day if use.start else None
        name = short(use.text or "unnamed medication", 80)
        if use.is_a(STATIN):
            inputs.statins.append(Finding(True, date=day, source=use.ref, text=name))
        drug_class = classify(use.concept, BP_LOWERING)
        if drug_class:
            lowering.append(Finding(True, date=day, source=use.ref, text=f"{name} [{drug_class.name}]"))
    none = "no active blood-pressure-lowering medication"
    inputs.findings["treated_hypertension"] = _any_of(lowering, "MedicationRequest", none)


# ---- extraction ----------------------------------------------------------------------------------------------


def extract_inputs(
    patient: dict[str, Any] | None,
    observations: Iterable[dict[str, Any]],
    conditions: Iterable[dict[str, Any]],
    medications: Iterable[dict[str, Any]],
    today: date,
    unavailable: Iterable[str] = (),
    incomplete: Iterable[str] = (),
) -> PceInputs:
    """Read every input of the equations from FHIR resources, in any order, as of ``today``.

    ``observations`` may mix cholesterol, HDL, blood-pressure and smoking-status Observations; ``medications``
    holds MedicationRequests and any Medications they refer to. ``unavailable`` names prefetch keys that could
    not be fetched, so that a gap is reported as unseen rather than as absent; ``incomplete`` names keys of which
    only some pages could be read: what they hold is used, and the card says they may be incomplete.
    """
    record = Record([*observations, *conditions, *medications])
    return _extract(patient, record, today, set(unavailable), set(incomplete))


def _extract(
    patient: dict[str, Any] | None, record: Record, today: date, unavailable: set[str], incomplete: set[str]
) -> PceInputs:
    inputs = PceInputs()
    _read_patient(inputs, patient, today)
    for reading in READINGS:
        _read_latest(inputs, reading, record, today)
    for reading in READINGS:
        if reading.key in unavailable and reading.name not in inputs.findings:
            inputs.problems = [p for p in inputs.problems if p.input != reading.name]
            inputs.problems.append(Problem(reading.name, f"{reading.codes.name} could not be fetched"))
    _read_conditions(inputs, record, "conditions" in unavailable)
    _read_medications(inputs, record, "medications" in unavailable)
    for name in ("age", "total_cholesterol", "hdl", "systolic_bp"):
        if name in inputs.findings:
            inputs.problems += [Problem(name, reason) for reason in out_of_range({name: inputs.findings[name].value})]
    _note_incomplete(inputs, [key for key in KEY_WORDS if key in incomplete - unavailable])
    return inputs


def _note_incomplete(inputs: PceInputs, keys: list[str]) -> None:
    """One line naming the inputs that may be incomplete; a statin on an unread page is possible, so none is
    proposed when medications are among them."""
    if not keys:
        return
    if "medications" in keys:
        inputs.statin_status_known = False
    words = [KEY_WORDS[key] for key in keys]
    names = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
    message = f"{names[0].upper()}{names[1:]} may be incomplete: not every page could be read from the EHR"
    inputs.problems.append(Problem(INCOMPLETE, message, blocking=False))


def inputs_from_call(call: ServiceCall, today: date) -> PceInputs:
    """``extract_inputs`` over a hook call's resolved prefetch."""
    patient = Record.from_call(call, ("patient",)).patient
    record = Record.from_call(call, (*OBSERVATION_KEYS, "conditions", "medications"))
    inputs = _extract(patient, record, today, set(call.unavailable), set(call.incomplete))
    inputs.patient_id = call.request.patient_id  # suggestions name the patient in context, whatever a resource says
    return inputs


# ---- cards ---------------------------------------------------------------------------------------------------


def _shown(name: str, finding: Finding, esc: Callable[[str], str] = escape_markdown) -> str:
    """The finding's value in words; ``esc`` neutralises record text (Markdown for cards, nothing for stored data)."""
    value = finding.value
    if name in ("total_cholesterol", "hdl", "systolic_bp"):
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


def _finding_line(name: str, finding: Finding) -> str:
    parts = [f"- **{LABELS[name]}:** {_shown(name, finding)}"]
    if finding.date:
        parts.append(f", {_date_verb(name)} {finding.date.isoformat()}")
    if finding.note:
        parts.append(f"; {escape_markdown(finding.note)}")
    if finding.old:
        parts.append(f" — **older than {OLD_AFTER_YEARS} years**")
    return "".join(parts)


def _date_verb(name: str) -> str:
    return {"diabetes": "since", "treated_hypertension": "since", "smoker": "recorded"}.get(name, "measured")


def _statin_line(inputs: PceInputs) -> str:
    if inputs.statins:
        names = "; ".join(f"{escape_markdown(s.text)} ({escape_markdown(s.source)})" for s in inputs.statins)
        return f"- **Statin:** already active: {names}"
    if not inputs.statin_status_known:
        return "- **Statin:** unknown (some medications could not be seen)"
    return "- **Statin:** none active"


def _findings_section(inputs: PceInputs) -> list[str]:
    """One line per input found (value, unit, date, source notes), the statin status, and a word on old values."""
    lines = [_finding_line(name, inputs.findings[name]) for name in MODEL_INPUTS if name in inputs.findings]
    lines.append(_statin_line(inputs))
    if any(f.old for f in inputs.findings.values()):
        lines.append(
            f"\nValues measured more than {OLD_AFTER_YEARS} years ago are marked old: consider measuring "
            "them again before acting on this estimate."
        )
    return lines


def _note_lines(problems: Iterable[Problem]) -> list[str]:
    return [f"\nNote: {escape_markdown(p.message)}" for p in problems]


def _bullets(problems: Iterable[Problem]) -> list[str]:
    return [f"- {escape_markdown(p.message)}" for p in problems]


def _ascvd_lines(inputs: PceInputs) -> list[str]:
    if not inputs.ascvd:
        return []
    names = "; ".join(escape_markdown(c.text) for c in inputs.ascvd)
    return [
        f"\n**Clinical ASCVD is on record ({names}).** The Pooled Cohort Equations are for primary prevention; "
        "this estimate does not apply, and statin therapy follows secondary-prevention guidance."
    ]


def statin_proposal(patient_id: str, risk_text: str) -> dict[str, Any]:
    """A draft MedicationRequest for a moderate-intensity statin.

    Intent ``proposal``: a decision-support service proposes, it cannot order; the clinician who accepts it
    turns it into an order in the EHR and signs it.
    """
    dose = STATIN_PROPOSAL["dose_mg"]
    return {
        "resourceType": "MedicationRequest",
        "status": "draft",
        "intent": "proposal",
        "subject": {"reference": f"Patient/{patient_id}"},
        "medicationCodeableConcept": {
            "coding": [{"system": RXNORM, "code": STATIN_PROPOSAL["code"], "display": STATIN_PROPOSAL["display"]}],
            "text": STATIN_PROPOSAL["display"],
        },
        "reasonCode": [{"text": f"10-year ASCVD risk {risk_text} (ACC/AHA Pooled Cohort Equations)"}],
        "dosageInstruction": [
            {
                "text": f"{dose} mg by mouth once daily",
                "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                "route": {"coding": [{"system": SNOMED, "code": "26643006", "display": "Oral route"}]},
                "doseAndRate": [{"doseQuantity": {"value": dose, "unit": "mg", "system": UCUM, "code": "mg"}}],
            }
        ],
    }


def _risk_detail(inputs: PceInputs, prediction: Prediction, risk_text: str, category: str) -> str:
    lines = [f"**10-year risk of a first ASCVD event: {risk_text} ({category}).**", "", "Inputs used:"]
    lines += _findings_section(inputs) + _ascvd_lines(inputs)
    lines += _note_lines(inputs.notes)
    if category in (INTERMEDIATE, HIGH) and not inputs.ascvd:
        lines.append(_guidance(category, inputs))
    else:
        lines += _diabetes_line(inputs)
    lines.append(
        f"\nModel: {escape_markdown(prediction.model)} {escape_markdown(prediction.version)}, "
        f"equation {escape_markdown(prediction.outputs.get('equation', '?'))}."
    )
    lines += [f"\nModel note: {escape_markdown(n)}" for n in prediction.outputs.get("notes") or ()]
    return "\n".join(lines)


def _statin_suggestion(patient_id: str, risk_text: str) -> Suggestion:
    action = Action(
        type="create",
        description=f"Propose {STATIN_PROPOSAL['display']} once daily, as a draft for the clinician to review and sign",
        resource=statin_proposal(patient_id, risk_text),
    )
    return Suggestion(label=STATIN_PROPOSAL["label"], actions=[action], isRecommended=True)


def _card(summary: str, indicator: Indicator, detail: str, source_note: str, **more: Any) -> Card:
    """A card citing the guideline (``source_note`` in brackets) and linking to the ACC/AHA estimator."""
    source = Source(label=f"{GUIDELINE_LABEL} ({source_note})", url=GUIDELINE_URL)
    links = [Link(label=ESTIMATOR_LABEL, url=ESTIMATOR_URL)]
    return Card(summary=summary, indicator=indicator, detail=detail, source=source, links=links, **more)


def _percent(risk: float) -> str:
    return f"{risk * 100:.1f} %"


def _risk_card(inputs: PceInputs, prediction: Prediction) -> Card:
    risk = float(prediction.outputs["risk"])
    category = risk_category(risk)
    risk_text = _percent(risk)
    summary = f"10-year ASCVD risk {risk_text} ({category})"
    if inputs.ascvd:
        summary += ": not for primary prevention, ASCVD on record"
    suggestions = []
    if (
        category in (INTERMEDIATE, HIGH)
        and not inputs.statins
        and inputs.statin_status_known
        and not inputs.ascvd
        and inputs.patient_id
    ):
        suggestions.append(_statin_suggestion(inputs.patient_id, risk_text))
    return _card(
        summary,
        "info" if category in (LOW, BORDERLINE) else "warning",
        _risk_detail(inputs, prediction, risk_text, category),
        f"{prediction.model} {prediction.version}",
        suggestions=suggestions,
        selectionBehavior="at-most-one" if suggestions else None,
    )


def _guidance(category: str, inputs: PceInputs) -> str:
    if inputs.statins:
        return "\nA statin is already active, so no statin is suggested."
    text = (
        "\nAt 7.5 % or more the 2018 ACC/AHA cholesterol guideline recommends a clinician–patient discussion "
        "of a moderate-intensity statin, weighing LDL cholesterol, risk enhancers and preferences."
    )
    if category == HIGH:
        text += " At 20 % or more it favours a high-intensity statin: adjust the proposed dose."
    if not inputs.statin_status_known:
        text += " No statin is proposed because some medications could not be seen."
    return text


def _diabetes_line(inputs: PceInputs) -> list[str]:
    diabetes, age = inputs.findings.get("diabetes"), inputs.findings.get("age")
    if not (diabetes and diabetes.value and age and 40 <= age.value <= 75) or inputs.statins or inputs.ascvd:
        return []
    return [
        "\nWith diabetes at 40–75 years the 2018 ACC/AHA cholesterol guideline recommends a moderate-intensity "
        "statin whatever the estimated risk."
    ]


def _no_risk_card(inputs: PceInputs) -> Card:
    blocking = inputs.blocking
    first = blocking[0].message
    more = f" (+{len(blocking) - 1} more)" if len(blocking) > 1 else ""
    prefix = "10-year ASCVD risk not calculated: "
    room = 139 - len(prefix) - len(more)
    summary = prefix + (first if len(first) <= room else first[: room - 1] + "…") + more
    lines = ["**Why the risk was not calculated:**"] + _bullets(blocking)
    if inputs.findings:
        lines += ["", "**Found in the record:**"] + _findings_section(inputs)
    lines += _note_lines(inputs.notes)
    lines += _ascvd_lines(inputs)
    if not any(p.input == "deceased" for p in blocking):
        lines.append(f"\nOnce these are resolved, the risk can be estimated with the {ESTIMATOR_LABEL}.")
    return _card(summary, "info", "\n".join(lines), "not calculated")


def build_cards(inputs: PceInputs, prediction: Prediction | None) -> list[Card]:
    """One card: the risk with every input used, or why there is no risk and what was found."""
    if inputs.blocking:
        return [_no_risk_card(inputs)]
    if prediction is None:
        missing = Problem("model", "the model gave no result")
        return [_no_risk_card(replace(inputs, problems=[*inputs.problems, missing]))]
    return [_risk_card(inputs, prediction)]


def fallback(call: ServiceCall, reason: str) -> list[Card]:
    """Without the model: what to do instead, and the values the record holds for the calculator."""
    made_at = datetime.now(UTC)
    shown = short(str(reason).replace("-", " "), 40)
    summary = f"Cardiovascular risk unavailable ({shown}); estimate with the ACC/AHA risk calculator"
    lines = [
        f"The 10-year ASCVD risk could not be calculated now ({escape_markdown(shown)}). Estimate it with the "
        f"{ESTIMATOR_LABEL} (link below)."
    ]
    inputs = None
    try:
        inputs = inputs_from_call(call, today())
        if inputs.findings:
            lines += ["", "**Values found in the record:**"] + _findings_section(inputs)
        if inputs.blocking:
            lines += ["", "**Missing or not usable:**"] + _bullets(inputs.blocking)
        lines += _note_lines(p for p in inputs.notes if p.input == INCOMPLETE)
    except Exception:  # the fallback must answer even when the record cannot be read
        inputs = None
        lines.append("\nThe record's values could not be listed.")
    card = _card(summary, "info", "\n".join(lines), f"AI result unavailable: {short(reason, 40)}")
    return _with_explanation(call, [card], explanation(inputs, None, made_at=made_at, fallback_reason=str(reason)))


# ---- what the explanation page shows (stored under an opaque id that the card's SMART link carries) ----------


def _day(value: date | None) -> str | None:
    return value.isoformat() if value else None


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _input_entry(name: str, finding: Finding) -> dict[str, Any]:
    return {
        "name": name,
        "label": LABELS[name],
        "value": _plain(finding.value),
        "display": _shown(name, finding, str),
        "unit": finding.unit,
        "date": _day(finding.date),
        "date_kind": _date_verb(name),
        "source": finding.source,
        "note": finding.note,
        "old": finding.old,
        "loinc": list(LOINC_BY_INPUT.get(name, ())),
    }


def _cited(finding: Finding) -> dict[str, Any]:
    return {"text": finding.text, "source": finding.source, "date": _day(finding.date)}


def _statin_entry(inputs: PceInputs) -> dict[str, Any]:
    if inputs.statins:
        return {"status": "active", "items": [_cited(s) for s in inputs.statins]}
    return {"status": "none" if inputs.statin_status_known else "unknown", "items": []}


def explanation(
    inputs: PceInputs | None,
    prediction: Prediction | None,
    *,
    made_at: datetime,
    fallback_reason: str | None = None,
) -> dict[str, Any]:
    """Everything the explanation page shows for one card, as plain JSON (the record's own words, unescaped)."""
    record_read = inputs is not None
    inputs = inputs if inputs is not None else PceInputs(statin_status_known=False)
    risk = float(prediction.outputs["risk"]) if prediction is not None and "risk" in prediction.outputs else None
    blocking = inputs.blocking
    if risk is None and record_read and not blocking and fallback_reason is None:
        blocking = [Problem("model", "the model gave no result")]
    model: dict[str, Any] = {"name": MODEL, "version": None, "equation": None, "notes": []}
    if prediction is not None:
        model = {
            "name": prediction.model,
            "version": prediction.version,
            "equation": prediction.outputs.get("equation"),
            "notes": [str(n) for n in prediction.outputs.get("notes") or ()],
        }
    return {
        "made_at": made_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "risk": risk,
        "risk_text": _percent(risk) if risk is not None else None,
        "category": risk_category(risk) if risk is not None else None,
        "record_read": record_read,
        "inputs": [_input_entry(name, inputs.findings[name]) for name in MODEL_INPUTS if name in inputs.findings],
        "missing": [{"input": p.input, "label": LABELS.get(p.input, p.input), "message": p.message} for p in blocking],
        "notes": [p.message for p in inputs.notes],
        "statin": _statin_entry(inputs),
        "ascvd": [_cited(c) for c in inputs.ascvd],
        "model": model,
        "guideline": {"label": GUIDELINE_LABEL, "url": GUIDELINE_URL},
        "estimator": {"label": ESTIMATOR_LABEL, "url": ESTIMATOR_URL},
        "fallback": fallback_reason is not None,
        "fallback_reason": fallback_reason,
        "loinc_system": LOINC,
        "loinc": {name: list(codes) for name, codes in LOINC_BY_INPUT.items()},
    }


def _with_explanation(call: ServiceCall, cards: list[Card], data: dict[str, Any]) -> list[Card]:
    """Add a SMART link to the explanation page, whose ``appContext`` is the stored result's opaque id."""
    link = call.explain(data)
    if link is not None:
        for card in cards:
            card.links.append(link)
    return cards


# ---- the explanation page (cds_services/templates/smart/cardiovascular_risk.html) ------------------------------

CATEGORY_WORDS = {
    LOW: "low (under 5 %)",
    BORDERLINE: "borderline (5 % to under 7.5 %)",
    INTERMEDIATE: "intermediate (7.5 % to under 20 %)",
    HIGH: "high (20 % or more)",
}
# The fallback reasons the framework gives (app.ai.reason_text), as the end of "unavailable because ...".
FALLBACK_WHY = {
    "timed out": "the model did not answer in time",
    "unavailable": "the model could not be reached",
    "overloaded": "the model was busy with other requests",
    "not applicable": "the model did not accept these inputs",
}


def _fallback_why(reason: Any) -> str:
    if not isinstance(reason, str) or not reason.strip():
        return "of a problem with the model"
    return FALLBACK_WHY.get(reason.strip(), f"of a problem with the model ({reason.strip()})")


def _live_check(result: StoredResult, data: dict[str, Any], context: LaunchContext) -> dict[str, Any]:
    """Values recorded since the card (with the launch's token), or why they could not be looked for."""
    checkable = any(isinstance(v, list) and v for v in (data.get("loinc") or {}).values())
    try:
        return {"status": "checked" if checkable else "skipped", "message": "", "found": newer_values(result, context)}
    except LiveCheckUnavailable as exc:
        return {"status": "unavailable", "message": exc.message, "found": []}


def _dated(items: Any) -> list[dict[str, Any]]:
    return [{**item, "when": when(item.get("date"))} for item in items or () if isinstance(item, dict)]


def explanation_view(result: StoredResult, context: LaunchContext) -> dict[str, Any]:
    """The page's ``risk``: the stored explanation, in words, with the values recorded since the card."""
    data = result.data if isinstance(result.data, dict) else {}
    live = _live_check(result, data, context)
    newer: dict[str, list[NewerValue]] = {}
    for value in live["found"]:
        newer.setdefault(value.input, []).append(value)
    inputs = [{**item, "newer": newer.pop(item.get("name"), [])} for item in _dated(data.get("inputs"))]

    def part(name: str) -> dict[str, Any]:
        return data.get(name) if isinstance(data.get(name), dict) else {}

    model, guideline, estimator, statin = part("model"), part("guideline"), part("estimator"), part("statin")
    return {
        "risk": {
            "risk_text": data.get("risk_text"),
            "category": CATEGORY_WORDS.get(data.get("category"), data.get("category")),
            "made_at": when(card_time(result)),
            "record_read": data.get("record_read", True),
            "fallback": bool(data.get("fallback")),
            "fallback_why": _fallback_why(data.get("fallback_reason")),
            "inputs": inputs,
            "missing": [m for m in data.get("missing") or () if isinstance(m, dict)],
            "notes": [str(n) for n in data.get("notes") or ()],
            "statin_status": statin.get("status"),
            "statins": _dated(statin.get("items")),
            "ascvd": _dated(data.get("ascvd")),
            "model_name": model.get("name") or "unknown",
            "model_version": model.get("version"),
            "model_equation": model.get("equation"),
            "model_notes": [str(n) for n in model.get("notes") or ()],
            "guideline_label": guideline.get("label") or GUIDELINE_LABEL,
            "guideline_url": guideline.get("url") or "",
            "estimator_label": estimator.get("label") or "",
            "estimator_url": estimator.get("url") or "",
            "live": live,
            "newer_other": [v for values in newer.values() for v in values],  # inputs the card did not list
        }
    }


# ---- population scoring (gateway batch): the hook's own reading, model and suggestion rule, per patient --------


def _basis(inputs: PceInputs) -> tuple[str, ...]:
    """The resources the estimate used, as "Type/id" (the patient first)."""
    refs = [f"Patient/{inputs.patient_id}"] if inputs.patient_id else []
    for name in MODEL_INPUTS:
        finding = inputs.findings.get(name)
        for source in finding.source.split(", ") if finding else ():
            if "/" in source and source not in refs:
                refs.append(source)
    return tuple(refs)


def score_patient(patient: PatientResources) -> Scored | NotScored:
    """One patient of a population: the inputs as the hook reads them, the risk through ``app.ai.infer``, and
    the action the hook's card would propose. A model that is unavailable raises (the batch pauses the part)."""
    medications = patient.of_type("MedicationRequest") + list(patient.shared.values())
    inputs = extract_inputs(
        patient.patient,
        patient.of_type("Observation"),
        patient.of_type("Condition"),
        medications,
        patient.today,
    )
    inputs.patient_id = patient.patient_id
    if inputs.blocking:
        problem = inputs.blocking[0]
        return NotScored(problem.input, problem.message)
    try:
        prediction = infer(MODEL, inputs.model_inputs())
    except InvalidModelInput as exc:
        return NotScored("model", f"the model did not accept these inputs: {exc}")
    card = build_cards(inputs, prediction)[0]
    risk = float(prediction.outputs["risk"])
    return Scored(
        probability=risk,
        category=risk_category(risk),
        model=prediction.model,
        version=prediction.version,
        basis=_basis(inputs),
        action=card.suggestions[0].label if card.suggestions else None,
        note=card.summary,
    )


POPULATION = Population(
    score=score_patient,
    outcome="First atherosclerotic cardiovascular disease (ASCVD) event within 10 years",
    method=GUIDELINE_LABEL,
    categories=(LOW, BORDERLINE, INTERMEDIATE, HIGH),
    reasons={**LABELS, "patient": "No usable patient record", "deceased": "Deceased", "model": "Model refused"},
)


@cds_service(
    id="cardiovascular-risk",
    hook="patient-view",
    title="Cardiovascular risk (ACC/AHA Pooled Cohort Equations)",
    description=(
        "10-year risk of a first atherosclerotic cardiovascular event from the 2013 ACC/AHA Pooled Cohort "
        "Equations, with the inputs used and their dates, and a statin proposal at 7.5 % or more when no statin "
        "is active."
    ),
    prefetch=PREFETCH,
    fallback=fallback,
    explanation=Explanation(
        label=EXPLANATION_LABEL,
        title="Cardiovascular risk: how this estimate was made",
        template="smart/cardiovascular_risk.html",
        view=explanation_view,
    ),
    population=POPULATION,
)
def cardiovascular_risk(call: ServiceCall) -> list[Card]:
    made_at = datetime.now(UTC)
    inputs = inputs_from_call(call, today())
    prediction = None if inputs.blocking else infer(MODEL, inputs.model_inputs())
    return _with_explanation(call, build_cards(inputs, prediction), explanation(inputs, prediction, made_at=made_at))
