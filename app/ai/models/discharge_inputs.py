"""FHIR R4 JSON -> the discharge-summary model's plain inputs: pure, defensive dict access, no validation models.

Plain dict access rather than ``fhir.resources``: the summariser reads a handful of fields, a malformed resource
must be skipped rather than fail the whole draft, and model validation costs about 100 us per resource.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Any

from app.fhir.codes import codings
from app.fhir.record import (
    concept_text,
    first_code,
    reference_id,
    referenced_medication,
    refuted,
    usable_observation,
)
from app.fhir.record import text as _str

__all__ = ["age_at", "concept_text", "extract_inputs", "first_code", "format_number", "reference_id"]

# v3 ActCode encounter classes, for a class Coding that carries a code but no display.
ENCOUNTER_CLASSES = {
    "IMP": "inpatient encounter",
    "ACUTE": "inpatient acute",
    "NONAC": "inpatient non-acute",
    "OBSENC": "observation encounter",
    "EMER": "emergency",
    "AMB": "ambulatory",
    "SS": "short stay",
    "HH": "home health",
    "VR": "virtual",
    "PRENC": "pre-admission",
    "FLD": "field",
}
# Records that say they are wrong or did not happen are left out of a summary (conditions and observations by
# the shared reader's rules: ``refuted``, ``usable_observation``).
SKIPPED_STATUS = {
    "Procedure": {"entered-in-error", "not-done"},
    "MedicationRequest": {"entered-in-error"},
}
FULL_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})")


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _status_code(concept: Any) -> str | None:
    code, _ = first_code(concept)
    return code or concept_text(concept)


def _first_of(resource: dict, prefix: str) -> str | None:
    """A date from a choice element: ``{prefix}DateTime``, ``{prefix}Instant``, ``{prefix}Period.start``, or
    ``{prefix}String``, as given."""
    for suffix in ("DateTime", "Instant"):
        if _str(resource.get(prefix + suffix)):
            return _str(resource[prefix + suffix])
    start = _str(_dict(resource.get(prefix + "Period")).get("start"))
    return start or _str(resource.get(prefix + "String"))


def _parse_date(value: str | None) -> date | None:
    match = FULL_DATE.match(value or "")
    if not match:
        return None
    try:
        return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None


def age_at(birth_date: Any, on: date) -> int | None:
    """Whole years from a full ``birthDate`` to ``on``; None for a partial or invalid date, or a future birth."""
    born = _parse_date(_str(birth_date))
    if born is None or born > on:
        return None
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def _encounter(encounter: dict) -> dict[str, Any]:
    cls = encounter.get("class")
    # R4 makes class one Coding; tolerate a list of Codings or CodeableConcepts (R5 and some servers).
    first = next((c for c in _list(cls) if isinstance(c, dict)), None) if isinstance(cls, list) else _dict(cls)
    first = _dict(first)
    coding = codings(first)[0] if codings(first) else first
    code = _str(coding.get("code"))
    class_text = _str(first.get("text")) or _str(coding.get("display")) or ENCOUNTER_CLASSES.get(code or "", code)
    types = [concept_text(t) for t in _list(encounter.get("type"))]
    reasons = [concept_text(r) for r in _list(encounter.get("reasonCode"))]
    reasons += [_str(_dict(r).get("display")) for r in _list(encounter.get("reasonReference"))]
    period = _dict(encounter.get("period"))
    return {
        "id": _str(encounter.get("id")),
        "class": class_text,
        "type": next((t for t in types if t), None),
        "reason": [r for r in reasons if r],
        "period": {"start": _str(period.get("start")), "end": _str(period.get("end"))},
        "hospitalization": {
            "dischargeDisposition": concept_text(_dict(encounter.get("hospitalization")).get("dischargeDisposition"))
        },
    }


def _patient(patient: dict | None, encounter: dict, today: date | None) -> dict[str, Any]:
    if patient is None:
        return {"age": None, "gender": None}
    on = _parse_date(_str(_dict(encounter.get("period")).get("end"))) or today or datetime.now(UTC).date()
    return {"age": age_at(patient.get("birthDate"), on), "gender": _str(patient.get("gender"))}


def _condition(resource: dict) -> dict[str, Any] | None:
    if refuted(resource):
        return None
    text = concept_text(resource.get("code"))
    if not text:
        return None
    code, system = first_code(resource.get("code"))
    return {
        "text": text,
        "code": code,
        "system": system,
        "onset": _first_of(resource, "onset") or _str(resource.get("recordedDate")),
        "clinicalStatus": _status_code(resource.get("clinicalStatus")),
    }


def _procedure(resource: dict) -> dict[str, Any] | None:
    if _str(resource.get("status")) in SKIPPED_STATUS["Procedure"]:
        return None
    text = concept_text(resource.get("code"))
    if not text:
        return None
    return {"text": text, "code": first_code(resource.get("code"))[0], "performed": _first_of(resource, "performed")}


def _medication_name(resource: dict, medications: dict[str, dict]) -> str | None:
    """The drug's name: medicationCodeableConcept, else the referenced (contained or supplied) Medication's code,
    else the reference's display."""
    name = concept_text(resource.get("medicationCodeableConcept"))
    if name:
        return name
    target, _ = referenced_medication(resource, medications)
    return concept_text(_dict(target).get("code")) or _str(_dict(resource.get("medicationReference")).get("display"))


def _medication(resource: dict, medications: dict[str, dict]) -> dict[str, Any] | None:
    status = _str(resource.get("status"))
    if status in SKIPPED_STATUS["MedicationRequest"]:
        return None
    text = _medication_name(resource, medications)
    if not text:
        return None
    dosage = next((_dict(d) for d in _list(resource.get("dosageInstruction"))), {})
    return {
        "text": text,
        "status": status,
        "dosage": _str(dosage.get("text")),
        "authoredOn": _str(resource.get("authoredOn")),
    }


def _value(element: dict) -> tuple[Any, str | None]:
    """(value, unit) of an Observation or component: Quantity, CodeableConcept, string, boolean or integer."""
    quantity = element.get("valueQuantity")
    if isinstance(quantity, dict):
        value = quantity.get("value")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value, _str(quantity.get("unit")) or _str(quantity.get("code"))
        return None, None
    if "valueCodeableConcept" in element:
        return concept_text(element["valueCodeableConcept"]), None
    if isinstance(element.get("valueBoolean"), bool):
        return ("yes" if element["valueBoolean"] else "no"), None
    integer = element.get("valueInteger")
    if isinstance(integer, int) and not isinstance(integer, bool):
        return integer, None
    return _str(element.get("valueString")), None


def format_number(value: int | float) -> str:
    if isinstance(value, int) or value.is_integer():
        return str(int(value))
    return f"{value:.2f}".rstrip("0").rstrip(".") if abs(value) >= 0.1 else f"{value:.3g}"


def _components(resource: dict) -> str | None:
    """A panel's components (blood pressure) as one value: ``Systolic 120 mm[Hg], Diastolic 80 mm[Hg]``."""
    parts = []
    for component in _list(resource.get("component")):
        component = _dict(component)
        name, (value, unit) = concept_text(component.get("code")), _value(component)
        if name and value is not None:
            shown = format_number(value) if isinstance(value, (int, float)) else value
            parts.append(" ".join(p for p in (name, shown, unit) if p))
    return ", ".join(parts) or None


def _result(resource: dict) -> dict[str, Any] | None:
    if not usable_observation(resource):
        return None
    text = concept_text(resource.get("code"))
    value, unit = _value(resource)
    if value is None:
        value, unit = _components(resource), None
    if not text or value is None:
        return None
    interpretation = next((concept_text(i) for i in _list(resource.get("interpretation"))), None)
    return {
        "text": text,
        "code": first_code(resource.get("code"))[0],
        "value": value,
        "unit": unit,
        "effective": _first_of(resource, "effective") or _str(resource.get("issued")),
        "interpretation": interpretation,
    }


def _belongs(resource: dict, encounter_id: str | None) -> bool:
    """False only when the resource names another encounter; one without an encounter reference is kept."""
    if not encounter_id or "encounter" not in resource:
        return True
    return reference_id(resource.get("encounter")) in (None, encounter_id)


def extract_inputs(encounter: dict, resources: dict[str, list[dict]], today: date | None = None) -> dict[str, Any]:
    """The discharge-summary inputs for ``encounter`` from FHIR R4 JSON resources.

    ``resources`` maps any key (resource type, or the caller's own grouping) to lists of resources; each resource
    is dispatched on its ``resourceType``, so Patient, Condition, Procedure, MedicationRequest, Observation and
    Medication may come under any key. Malformed resources, those marked entered-in-error (or refuted, not-done,
    cancelled), and those whose ``encounter`` reference names another encounter are skipped. ``today`` is the
    date for the patient's age when the encounter has not ended (default: the current UTC date).
    """
    encounter = _dict(encounter)
    by_type: dict[str, list[dict]] = {}
    for group in _dict(resources).values():
        for resource in _list(group):
            if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
                by_type.setdefault(resource["resourceType"], []).append(resource)
    encounter_id = _str(encounter.get("id"))
    medications = {r["id"]: r for r in by_type.get("Medication", ()) if isinstance(r.get("id"), str)}
    readers = {
        "conditions": ("Condition", _condition),
        "procedures": ("Procedure", _procedure),
        "medications": ("MedicationRequest", lambda r: _medication(r, medications)),
        "results": ("Observation", _result),
    }
    inputs: dict[str, Any] = {
        "encounter": _encounter(encounter),
        "patient": _patient(next(iter(by_type.get("Patient", ())), None), encounter, today),
    }
    for key, (resource_type, read) in readers.items():
        items = []
        for resource in by_type.get(resource_type, ()):
            if not _belongs(resource, encounter_id):
                continue
            try:
                item = read(resource)
            except (AttributeError, TypeError, ValueError):  # a shape no guard above foresaw: skip, never crash
                item = None
            if item is not None:
                items.append(item)
        inputs[key] = items
    return inputs
