"""FHIR R4 JSON builders for tests: the few fields a reader looks at, with overridable defaults."""

from __future__ import annotations

from typing import Any

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
SUBJECT = {"reference": "Patient/p1"}


def concept(code: str | None = None, system: str = LOINC, display: str | None = None, text: str | None = None):
    """A CodeableConcept with at most one coding."""
    result: dict[str, Any] = {}
    if code is not None:
        coding = {"system": system, "code": code}
        if display is not None:
            coding["display"] = display
        result["coding"] = [coding]
    if text is not None:
        result["text"] = text
    return result


def quantity(value: Any, unit: str, ucum: bool = True) -> dict[str, Any]:
    return {"value": value, "unit": unit, **({"system": UCUM, "code": unit} if ucum else {})}


def observation(code: str, value: Any = None, unit: str = "", when: str | None = "2021-01-10", **extra: Any):
    """A final LOINC-coded Observation: ``value`` is a Quantity (number with unit) or a CodeableConcept (dict)."""
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": extra.pop("id", f"{code}-{when}"),
        "status": "final",
        "subject": SUBJECT,
        "code": concept(code),
    }
    if when is not None:
        resource["effectiveDateTime"] = when
    if isinstance(value, dict):
        resource["valueCodeableConcept"] = value
    elif value is not None:
        resource["valueQuantity"] = quantity(value, unit)
    return {**resource, **extra}


def component(code: str, value: Any, unit: str) -> dict[str, Any]:
    return {"code": concept(code), "valueQuantity": quantity(value, unit)}


def bp_panel(systolic: Any, diastolic: Any = 80, when: str = "2021-01-10", panel: str = "85354-9", **extra: Any):
    """A blood-pressure panel with systolic (8480-6) and diastolic (8462-4) components."""
    parts = [component("8462-4", diastolic, "mm[Hg]"), component("8480-6", systolic, "mm[Hg]")]
    return observation(panel, when=when, component=parts, **{"id": f"bp-{when}", **extra})


def condition(code: str, display: str = "", system: str = SNOMED, status: str | None = "active", **extra: Any):
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "id": extra.pop("id", f"c-{code}"),
        "subject": SUBJECT,
        "code": concept(code, system, display or None, display or None),
        "onsetDateTime": "2015-06-01",
    }
    if status:
        resource["clinicalStatus"] = concept(status, CLINICAL)
    return {**resource, **extra}


def medication_request(text: str | None = None, code: str | None = None, status: str = "active", **extra: Any):
    """An active order; the drug as ``medicationCodeableConcept`` unless ``medicationReference`` is given."""
    resource: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": extra.pop("id", f"m-{(text or code or 'x')[:10]}"),
        "subject": SUBJECT,
        "status": status,
        "intent": "order",
        "authoredOn": "2019-05-01",
    }
    if "medicationReference" not in extra:
        resource["medicationCodeableConcept"] = concept(code, RXNORM, text if code else None, text)
    return {**resource, **extra}


def medication(id: str, text: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"resourceType": "Medication", "id": id, "code": concept(code, RXNORM, text if code else None, text)}


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    """A searchset Bundle of the resources."""
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"fullUrl": f"{r['resourceType']}/{r.get('id')}", "resource": r} for r in resources],
    }
