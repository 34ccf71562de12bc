"""The ``cardiovascular-risk`` service (patient-view): 10-year ASCVD risk from the ACC/AHA Pooled Cohort Equations.

The record is read into the equations' inputs by pure functions (``extract_inputs``, over ``app.fhir.record`` and
``app.cds.inputs``), each input with its value, unit, date and source; the risk comes from the ``ascvd-pce`` model
through ``app.ai.infer``; ``build_cards`` turns both into one card that says what was used, what was missing and how
old each value is, with a statin proposal when the 2018 ACC/AHA cholesterol guideline threshold (7.5 %) is met and
no statin is active. This module holds the clinical rules and the card's words; the rest is shared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any

from app.ai import InvalidModelInput, Prediction, infer
from app.ai.models.pce import BORDERLINE, HIGH, INTERMEDIATE, LOW, VALID_RANGES, out_of_range, risk_category
from app.batch.scoring import NotScored, PatientResources, Population, Scored
from app.cds.cards import Card, Indicator, Link, Source, Suggestion, escape_markdown, fit_summary, with_link
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
    problem_bullets,
    problem_notes,
)
from app.cds.proposals import ProposedMedication, medication_proposal, suggest_creating
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
    SMOKING_STATUS,
    SMOKING_UNKNOWN,
    STATIN,
    SYSTOLIC_BP,
    TOTAL_CHOLESTEROL,
    US_CORE_RACE,
    classify,
)
from app.fhir.record import (
    CHOLESTEROL,
    Read,
    Record,
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
ESTIMATOR_URL = "https://tools.acc.org/ascvd-risk-estimator-plus/"
ESTIMATOR_LABEL = "ACC/AHA ASCVD Risk Estimator Plus"
GUIDELINE_LABEL = "ACC/AHA Pooled Cohort Equations 2013"
EXPLANATION_LABEL = "Explain this result: inputs, dates, model"
OLD_AFTER_YEARS = 2

# The observation searches sort newest first, so their first page holds the values used: no next page is read.
# Conditions and medications need every page (diabetes, ASCVD or a statin may be on any of them).
PREFETCH = {
    "patient": PrefetchKey("Patient/{{context.patientId}}", required=True),
    "totalCholesterol": latest_observations(TOTAL_CHOLESTEROL),
    "hdl": latest_observations(HDL),
    "bloodPressure": latest_observations(BP_PANEL | SYSTOLIC_BP),
    "smoking": latest_observations(SMOKING_STATUS),
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
AGE_RANGE = VALID_RANGES["age"][:2]

# Moderate-intensity statin proposed at >= 7.5 % (2018 ACC/AHA cholesterol guideline).
STATIN_PROPOSAL = ProposedMedication(rxnorm="617310", display="atorvastatin 20 MG Oral Tablet", dose=20)
STATIN_LABEL = "Propose atorvastatin 20 mg daily (moderate-intensity statin)"


def today() -> date:
    """Today's date; a separate function so that pure tests can pass or patch another day."""
    return date.today()


@dataclass
class PceInputs(Inputs):
    """What the record gave for each input of the equations, what it did not, and the statins and clinical ASCVD
    that decide whether a statin is proposed."""

    statins: list[Finding] = field(default_factory=list)
    ascvd: list[Finding] = field(default_factory=list)
    statin_status_known: bool = True
    first = ("patient", "deceased", "age", "sex")  # a deceased patient, then age, then sex

    def model_inputs(self) -> dict[str, Any]:
        """The ``ascvd-pce`` inputs; only meaningful when nothing is blocking."""
        return self.values(MODEL_INPUTS)


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
    ObservedInput("systolic_bp", "bloodPressure", SYSTOLIC_BP, quantity("mm[Hg]"), "mm Hg"),
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


def _read_patient(inputs: PceInputs, patient: dict[str, Any] | None, today: date) -> None:
    if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
        inputs.problems.append(Problem("patient", "the patient record could not be read"))
        return
    inputs.patient_id = patient.get("id") if isinstance(patient.get("id"), str) else inputs.patient_id
    if deceased(patient):
        inputs.problems.append(Problem("deceased", "the patient is recorded as deceased"))
    inputs.add("age", age_input(patient.get("birthDate"), today, AGE_RANGE))
    gender = patient.get("gender")
    if gender in ("female", "male"):
        inputs.findings["sex"] = Finding(gender, "", None, "Patient.gender")
    else:
        shown = f"recorded as {short(gender, 12)!r}" if isinstance(gender, str) else "not recorded"
        inputs.problems.append(Problem("sex", f"sex {shown}: the equations need female or male"))
    _race(inputs, patient)


# ---- conditions and medications ------------------------------------------------------------------------------


def _read_conditions(inputs: PceInputs, record: Record, unavailable: bool) -> None:
    inputs.ascvd = [condition_finding(c) for c in record.active_conditions(ASCVD)]
    if unavailable:
        inputs.problems.append(Problem("diabetes", "conditions could not be fetched, so diabetes is unknown"))
        return
    diabetic = [condition_finding(c) for c in record.active_conditions(DIABETES)]
    inputs.findings["diabetes"] = any_of(diabetic, "Condition", "no active diabetes condition")


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
    inputs.findings["treated_hypertension"] = any_of(lowering, "MedicationRequest", none)


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
    inputs.read_observations(READINGS, record, years_before(today, OLD_AFTER_YEARS), unavailable)
    _read_conditions(inputs, record, "conditions" in unavailable)
    _read_medications(inputs, record, "medications" in unavailable)
    for name in ("age", "total_cholesterol", "hdl", "systolic_bp"):
        if name in inputs.findings:
            inputs.problems += [Problem(name, reason) for reason in out_of_range({name: inputs.findings[name].value})]
    partial = incomplete - unavailable
    if "medications" in partial:  # a statin may be on a page that could not be read: none is proposed then
        inputs.statin_status_known = False
    note = incomplete_note(partial, KEY_WORDS)
    if note is not None:
        inputs.problems.append(note)
    return inputs


def inputs_from_call(call: ServiceCall, today: date) -> PceInputs:
    """``extract_inputs`` over a hook call's resolved prefetch."""
    patient = Record.from_call(call, ("patient",)).patient
    record = Record.from_call(call, (*OBSERVATION_KEYS, "conditions", "medications"))
    inputs = _extract(patient, record, today, set(call.unavailable), set(call.incomplete))
    inputs.patient_id = call.request.patient_id  # suggestions name the patient in context, whatever a resource says
    return inputs


# ---- cards ---------------------------------------------------------------------------------------------------


def _shown(name: str, finding: Finding, esc: Callable[[str], str]) -> str:
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


# The inputs as the card and the explanation page show them; ``loinc`` lists the codes that can carry each
# observation-based input, stored with the result so that the page can look for values newer than the card.
DISPLAY = InputDisplay(
    labels=LABELS,
    shown=_shown,
    old_after_years=OLD_AFTER_YEARS,
    date_verbs={"diabetes": "since", "treated_hypertension": "since", "smoker": "recorded"},
    loinc={
        "total_cholesterol": TOTAL_CHOLESTEROL.in_system(LOINC),
        "hdl": HDL.in_system(LOINC),
        "systolic_bp": SYSTOLIC_BP.in_system(LOINC) + BP_PANEL.in_system(LOINC),
        "smoker": SMOKING_STATUS.in_system(LOINC),
    },
)


def _statin_line(inputs: PceInputs) -> str:
    if inputs.statins:
        names = "; ".join(f"{escape_markdown(s.text)} ({escape_markdown(s.source)})" for s in inputs.statins)
        return f"- **Statin:** already active: {names}"
    if not inputs.statin_status_known:
        return "- **Statin:** unknown (some medications could not be seen)"
    return "- **Statin:** none active"


def _findings_section(inputs: PceInputs) -> list[str]:
    """One line per input found (value, unit, date, source notes), the statin status, and a word on old values."""
    lines = [*DISPLAY.lines(inputs), _statin_line(inputs)]
    if any(f.old for f in inputs.findings.values()):
        lines.append(
            f"\nValues measured more than {OLD_AFTER_YEARS} years ago are marked old: consider measuring "
            "them again before acting on this estimate."
        )
    return lines


def _ascvd_lines(inputs: PceInputs) -> list[str]:
    if not inputs.ascvd:
        return []
    names = "; ".join(escape_markdown(c.text) for c in inputs.ascvd)
    return [
        f"\n**Clinical ASCVD is on record ({names}).** The Pooled Cohort Equations are for primary prevention; "
        "this estimate does not apply, and statin therapy follows secondary-prevention guidance."
    ]


def statin_proposal(patient_id: str, risk_text: str) -> dict[str, Any]:
    """A draft MedicationRequest (intent ``proposal``) for the moderate-intensity statin, citing the risk."""
    reason = f"10-year ASCVD risk {risk_text} (ACC/AHA Pooled Cohort Equations)"
    return medication_proposal(patient_id, STATIN_PROPOSAL, reason)


def _risk_detail(inputs: PceInputs, prediction: Prediction, risk_text: str, category: str) -> str:
    lines = [f"**10-year risk of a first ASCVD event: {risk_text} ({category}).**", "", "Inputs used:"]
    lines += _findings_section(inputs) + _ascvd_lines(inputs)
    lines += problem_notes(inputs.notes)
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
    drug = STATIN_PROPOSAL
    description = f"Propose {drug.display} {drug.frequency.words}, as a draft for the clinician to review and sign"
    return suggest_creating(STATIN_LABEL, description, statin_proposal(patient_id, risk_text))


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
    more = f" (+{len(blocking) - 1} more)" if len(blocking) > 1 else ""
    summary = fit_summary("10-year ASCVD risk not calculated: ", blocking[0].message, more)
    lines = ["**Why the risk was not calculated:**"] + problem_bullets(blocking)
    if inputs.findings:
        lines += ["", "**Found in the record:**"] + _findings_section(inputs)
    lines += problem_notes(inputs.notes)
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
            lines += ["", "**Missing or not usable:**"] + problem_bullets(inputs.blocking)
        lines += problem_notes(p for p in inputs.notes if p.input == INCOMPLETE)
    except Exception:  # the fallback must answer even when the record cannot be read
        inputs = None
        lines.append("\nThe record's values could not be listed.")
    card = _card(summary, "info", "\n".join(lines), f"AI result unavailable: {short(reason, 40)}")
    data = explanation(inputs, None, made_at=made_at, fallback_reason=str(reason))
    return with_link([card], call.explain(data))


# ---- what the explanation page shows (stored under an opaque id that the card's SMART link carries) ----------


def _statin_entry(inputs: PceInputs) -> dict[str, Any]:
    if inputs.statins:
        return {"status": "active", "items": [s.cited() for s in inputs.statins]}
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
        **DISPLAY.explained(inputs, blocking),
        "statin": _statin_entry(inputs),
        "ascvd": [c.cited() for c in inputs.ascvd],
        "model": model,
        "guideline": {"label": GUIDELINE_LABEL, "url": GUIDELINE_URL},
        "estimator": {"label": ESTIMATOR_LABEL, "url": ESTIMATOR_URL},
        "fallback": fallback_reason is not None,
        "fallback_reason": fallback_reason,
        **DISPLAY.codes(),
    }


# ---- the explanation page (cds_services/templates/smart/cardiovascular_risk.html) ------------------------------

CATEGORY_WORDS = {
    LOW: "low (under 5 %)",
    BORDERLINE: "borderline (5 % to under 7.5 %)",
    INTERMEDIATE: "intermediate (7.5 % to under 20 %)",
    HIGH: "high (20 % or more)",
}


def explanation_view(result: StoredResult, context: LaunchContext) -> dict[str, Any]:
    """The page's ``risk``: the stored explanation, in words, with the values recorded since the card."""
    data = result.data if isinstance(result.data, dict) else {}
    guideline, estimator, statin = (section(data, name) for name in ("guideline", "estimator", "statin"))
    return {
        "risk": {
            **result_view(result, context),
            "risk_text": data.get("risk_text"),
            "category": CATEGORY_WORDS.get(data.get("category"), data.get("category")),
            "statin_status": statin.get("status"),
            "statins": dated(statin.get("items")),
            "ascvd": dated(data.get("ascvd")),
            "model_equation": section(data, "model").get("equation"),
            "guideline_label": guideline.get("label") or GUIDELINE_LABEL,
            "guideline_url": guideline.get("url") or "",
            "estimator_label": estimator.get("label") or "",
            "estimator_url": estimator.get("url") or "",
        }
    }


# ---- population scoring (gateway batch): the hook's own reading, model and suggestion rule, per patient --------


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
        basis=inputs.basis(MODEL_INPUTS),  # the resources the estimate used, the patient first
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
    cards = build_cards(inputs, prediction)
    return with_link(cards, call.explain(explanation(inputs, prediction, made_at=made_at)))
