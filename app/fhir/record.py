"""A patient's record as services read it: FHIR R4 JSON in, values with units, dates and sources out.

Shared by every CDS service, the batch scorer and the SMART pages, so that they agree on what a concept is
called, when an observation was made, which statuses count, how units convert and which medication a request
names. Plain dict access, no ``fhir.resources`` parsing: this runs on the hook path, a malformed resource must be
skipped rather than fail the card, and model validation costs about 100 us per resource.

Usage: ``record = Record.from_call(call)``, then ``record.latest(TOTAL_CHOLESTEROL, quantity("mg/dL",
CHOLESTEROL))``, ``record.active_conditions(DIABETES)``, ``record.active_medications(STATIN)``.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from app.fhir.codes import CONDITION_CLINICAL, UCUM, US_CORE_RACE, CodeSet, DrugClass, codes_in, codings

# Observations that say they are wrong or did not happen; one definition for every reader.
RETRACTED_OBSERVATION = frozenset({"entered-in-error", "cancelled"})
# Condition verification statuses that mean the condition is not the patient's.
REFUTED_CONDITION = frozenset({"refuted", "entered-in-error"})
ACTIVE_CLINICAL = frozenset({"active", "recurrence", "relapse"})


# ---- text, codes and references -------------------------------------------------------------------------------


def text(value: Any) -> str | None:
    """A non-empty string with its whitespace collapsed, else None."""
    if not isinstance(value, str):
        return None
    return " ".join(value.split()) or None


def short(value: Any, limit: int = 40) -> str:
    """Record text on one line, cut to ``limit`` characters with an ellipsis."""
    value = " ".join(str(value).split())
    return value if len(value) <= limit else value[: limit - 1] + "…"


def number(value: float) -> str:
    """A value with one decimal, without a trailing ``.0``: 5.5, 213."""
    return f"{value:.1f}".removesuffix(".0")


def concept_text(concept: Any) -> str | None:
    """A CodeableConcept's text, else its first display, else its first code (the code beats saying nothing)."""
    if not isinstance(concept, dict):
        return None
    found = text(concept.get("text"))
    if found:
        return found
    for key in ("display", "code"):
        for coding in codings(concept):
            if text(coding.get(key)):
                return text(coding[key])
    return None


def first_code(concept: Any) -> tuple[str | None, str | None]:
    """(code, system) of a CodeableConcept's first coding that has a code."""
    for coding in codings(concept):
        if text(coding.get("code")):
            return text(coding["code"]), text(coding.get("system"))
    return None, None


def status_codes(concept: Any) -> set[str]:
    """Every code of a status CodeableConcept, whatever its system, and its text: what a status check reads."""
    found = {str(c["code"]) for c in codings(concept) if c.get("code")}
    if isinstance(concept, dict) and text(concept.get("text")):
        found.add(text(concept["text"]))
    return found


def reference_id(reference: Any) -> str | None:
    """The logical id a Reference points at: ``Type/id``, an absolute URL, ``urn:uuid:id``, with history."""
    ref = text(reference.get("reference")) if isinstance(reference, dict) else None
    if not ref:
        return None
    ref = ref.split("/_history/", 1)[0]
    if ref.startswith("urn:"):
        return ref.rsplit(":", 1)[-1]
    return ref.rstrip("/").rsplit("/", 1)[-1]


def reference_type(reference: Any) -> str | None:
    """The resource type a relative or absolute Reference names; None for ``urn:`` and contained references."""
    ref = text(reference.get("reference")) if isinstance(reference, dict) else None
    if not ref or ref.startswith(("urn:", "#")):
        return None
    parts = ref.split("/_history/", 1)[0].rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 else None


def ref(resource: dict[str, Any]) -> str:
    """``Type/id`` of a resource, as cards and explanations cite it."""
    return f"{resource.get('resourceType', 'Resource')}/{resource.get('id', '?')}"


# ---- dates --------------------------------------------------------------------------------------------------------

_FHIR_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
EFFECTIVE_FIELDS = ("effectiveDateTime", "effectiveInstant", "effectivePeriod.end", "effectivePeriod.start", "issued")


@dataclass(frozen=True)
class When:
    """A FHIR date or dateTime: an aware instant for ordering, and the calendar date as written."""

    moment: datetime
    day: date


def parse_when(value: Any) -> When | None:
    """Read a FHIR date or dateTime; None when it is not one.

    Partial dates (``2020``, ``2020-06``) fall on the first day of their year or month. A dateTime without an
    offset is read as UTC (FHIR requires an offset when a time is given; servers that omit it run in UTC). The
    calendar date is the one written, in the value's own offset, not converted to UTC.
    """
    if not isinstance(value, str):
        return None
    value = value.strip()
    match = _FHIR_DATE.match(value)
    if not match:
        return None
    try:
        day = date(int(match.group(1)), int(match.group(2) or 1), int(match.group(3) or 1))
    except ValueError:
        return None
    try:
        moment = datetime.fromisoformat(value) if "T" in value else None
    except ValueError:
        moment = None
    if moment is None:
        moment = datetime(day.year, day.month, day.day)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return When(moment, day)


def _field(resource: dict[str, Any], path: str) -> Any:
    head, _, tail = path.partition(".")
    value = resource.get(head)
    if tail:
        return value.get(tail) if isinstance(value, dict) else None
    return value


def effective_text(resource: dict[str, Any]) -> str | None:
    """When an observation was made, as written: the first non-empty of ``EFFECTIVE_FIELDS`` (period end first)."""
    for path in EFFECTIVE_FIELDS:
        value = _field(resource, path)
        if isinstance(value, str) and value:
            return value
    return None


def effective(resource: dict[str, Any]) -> When | None:
    """When an observation was made: the first readable of ``EFFECTIVE_FIELDS``."""
    for path in EFFECTIVE_FIELDS:
        parsed = parse_when(_field(resource, path))
        if parsed:
            return parsed
    return None


def years_before(day: date, years: int) -> date:
    """The same calendar day ``years`` earlier (28 February for 29 February)."""
    try:
        return day.replace(year=day.year - years)
    except ValueError:
        return day.replace(year=day.year - years, day=28)


# ---- quantities and units -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Analyte:
    """What a concentration measures, for converting between mass and molar units."""

    name: str
    mg_dl_per_mmol_l: float  # molar mass (g/mol) / 10


# Cholesterol (total, HDL, LDL): molar mass 386.65 g/mol, used by laboratories as 1 mmol/L = 38.67 mg/dL.
CHOLESTEROL = Analyte("cholesterol", 38.67)
TRIGLYCERIDES = Analyte("triglycerides", 88.57)  # as triolein, 885.7 g/mol

# UCUM units we read, keyed by their spelling lower-cased without spaces (records write "mg/dl", "mmHg").
_UNITS = {"mg/dl": "mg/dL", "mmol/l": "mmol/L", "mm[hg]": "mm[Hg]", "mmhg": "mm[Hg]", "%": "%"}
_MOLAR = {("mmol/L", "mg/dL"), ("mg/dL", "mmol/L")}


def canonical_unit(unit: str) -> str | None:
    """The UCUM code of a unit we know, however the record spelled it; None for any other."""
    return _UNITS.get(unit.lower().replace(" ", ""))


def unit_of(quantity: dict[str, Any]) -> str:
    """A Quantity's unit: its UCUM code, else its unit text, else any code."""
    if quantity.get("system") == UCUM and isinstance(quantity.get("code"), str):
        return quantity["code"].strip()
    for key in ("unit", "code"):
        if isinstance(quantity.get(key), str) and quantity[key].strip():
            return quantity[key].strip()
    return ""


def convert(value: float, unit: str, to: str, analyte: Analyte | None = None) -> float | None:
    """``value`` in ``unit`` expressed in ``to``; None when the units are unknown or cannot convert (never a guess:
    mass and molar concentrations convert only with an ``analyte``)."""
    source, target = canonical_unit(unit), canonical_unit(to)
    if source is None or target is None:
        return None
    if source == target:
        return float(value)
    if (source, target) in _MOLAR and analyte is not None:
        factor = analyte.mg_dl_per_mmol_l
        return value * factor if target == "mg/dL" else value / factor
    return None


@dataclass(frozen=True)
class Read:
    """A value read from one observation (or component): the value, its text and a note on how it was read."""

    value: Any
    text: str = ""
    note: str = ""


def exact_number(quantity: dict[str, Any]) -> float | str:
    """The quantity's value, or why it is not an exact number (absent, text, or censored such as "<20")."""
    value = quantity.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "no numeric value"
    if quantity.get("comparator"):
        return f"the value is {short(quantity['comparator'], 2)}{number(value)}, not exact"
    return float(value)


def quantity_in(quantity: dict[str, Any], to: str, analyte: Analyte | None = None) -> Read | str:
    """The quantity in unit ``to`` (with a note when converted), or why it cannot be used."""
    value, unit = exact_number(quantity), unit_of(quantity)
    if isinstance(value, str):
        return value
    converted = convert(value, unit, to, analyte)
    if converted is None:
        return f"unit {short(unit, 20)!r} is not recognised" if unit else "no unit"
    if canonical_unit(unit) == canonical_unit(to):
        return Read(converted)
    return Read(converted, "", f"converted from {number(value)} {canonical_unit(unit)}")


def quantity_text(quantity: Any) -> str | None:
    """A Quantity as written, for display: ``<20 mg/dL``; None without a numeric value."""
    if not isinstance(quantity, dict):
        return None
    value = quantity.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    unit = quantity.get("unit") or quantity.get("code") or ""
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{quantity.get('comparator') or ''}{shown} {unit}".strip()


# ---- reading observations -----------------------------------------------------------------------------------------

# How a service reads one observation (or component): a Read, the reason it is unusable, or None when the
# element does not carry this kind of value at all (then it is not a candidate).
Reader = Callable[[dict[str, Any]], Read | str | None]


def quantity(to: str, analyte: Analyte | None = None) -> Reader:
    """Read ``valueQuantity`` in unit ``to``."""

    def read(element: dict[str, Any]) -> Read | str | None:
        value = element.get("valueQuantity")
        return quantity_in(value, to, analyte) if isinstance(value, dict) else None

    return read


def answer(interpret: Callable[[dict[str, Any]], Read | str]) -> Reader:
    """Read ``valueCodeableConcept`` through ``interpret`` (which says what the answer means, or why not)."""

    def read(element: dict[str, Any]) -> Read | str | None:
        value = element.get("valueCodeableConcept")
        return interpret(value) if isinstance(value, dict) else None

    return read


def usable_observation(observation: dict[str, Any]) -> bool:
    """False for an observation entered in error or cancelled (or whose status is not even a string)."""
    status = observation.get("status")
    return isinstance(status, (str, type(None))) and status not in RETRACTED_OBSERVATION


def elements(observation: dict[str, Any], codes: CodeSet) -> list[dict[str, Any]]:
    """The parts of an observation coded in ``codes``: the observation itself, then its matching components
    (systolic pressure 8480-6 inside a blood-pressure panel 85354-9)."""
    found = [observation] if codes.matches(observation.get("code")) else []
    for component in observation.get("component") or ():
        if isinstance(component, dict) and codes.matches(component.get("code")):
            found.append(component)
    return found


class _Observed:
    """What a reading and a skipped observation both tell: which resource, and on which day."""

    resource: dict[str, Any]
    when: When | None

    @property
    def ref(self) -> str:
        return ref(self.resource)

    @property
    def day(self) -> date | None:
        return self.when.day if self.when else None


@dataclass(frozen=True)
class Reading(_Observed):
    """One observation's value, with the observation and when it was made."""

    value: Any
    text: str
    note: str
    resource: dict[str, Any]
    when: When | None


@dataclass(frozen=True)
class Skipped(_Observed):
    """An observation newer than the one used (or, when none was usable, any) whose value could not be used."""

    resource: dict[str, Any]
    when: When | None
    reason: str


@dataclass(frozen=True)
class Latest:
    """The latest usable value of a code set, the usable values at that same instant, and what was skipped."""

    reading: Reading | None
    same_time: tuple[Reading, ...] = ()
    skipped: tuple[Skipped, ...] = ()

    def conflicting(self, key: Callable[[Reading], Any] = lambda r: r.value) -> list[Reading]:
        """One reading per distinct ``key`` at the latest instant when they disagree, else []: the record has two
        answers and bundle order cannot tell which is right, so the service decides what to do."""
        distinct: dict[Any, Reading] = {}
        for reading in self.same_time:
            distinct.setdefault(key(reading), reading)
        return list(distinct.values()) if len(distinct) > 1 else []


def latest(observations: Iterable[dict[str, Any]], codes: CodeSet, read: Reader) -> Latest:
    """The latest observation in ``codes`` with a usable value, by effective time (undated ones last, ties in
    record order); the newer ones whose values were unusable are reported as skipped."""
    candidates = []
    for observation in observations:
        if not usable_observation(observation):
            continue
        for element in elements(observation, codes):
            value = read(element)
            if value is not None:
                candidates.append((effective(observation), observation, value))
                break
    _oldest = datetime.min.replace(tzinfo=UTC)
    candidates.sort(key=lambda c: c[0].moment if c[0] else _oldest, reverse=True)
    skipped = []
    for when, observation, value in candidates:
        if isinstance(value, str):
            skipped.append(Skipped(observation, when, value))
            continue
        reading = Reading(value.value, value.text, value.note, observation, when)
        same = [
            Reading(v.value, v.text, v.note, o, w)
            for w, o, v in candidates
            if when and w and w.moment == when.moment and not isinstance(v, str)
        ]
        return Latest(reading, tuple(same) or (reading,), tuple(skipped))
    return Latest(None, (), tuple(skipped))


# ---- conditions -------------------------------------------------------------------------------------------------


def refuted(condition: dict[str, Any]) -> bool:
    """True when the condition's verification status says it is refuted or entered in error."""
    return bool(status_codes(condition.get("verificationStatus")) & REFUTED_CONDITION)


def active_condition(condition: dict[str, Any]) -> bool:
    """Not refuted, and clinically active (active, recurrence, relapse); without a clinical status, not abated."""
    if refuted(condition):
        return False
    clinical = codes_in(condition.get("clinicalStatus"), CONDITION_CLINICAL)
    if clinical:
        return bool(clinical & ACTIVE_CLINICAL)
    return not any(key.startswith("abatement") for key in condition)


def onset(condition: dict[str, Any]) -> When | None:
    """When a condition began: ``onsetDateTime``, else when it was recorded."""
    return parse_when(condition.get("onsetDateTime")) or parse_when(condition.get("recordedDate"))


# ---- medications ------------------------------------------------------------------------------------------------


def active_request(request: dict[str, Any]) -> bool:
    """An active order for the patient: status active, not a do-not-perform, not a mere proposal."""
    return (
        request.get("status") == "active"
        and request.get("doNotPerform") is not True
        and request.get("intent") != "proposal"
    )


def referenced_medication(request: dict[str, Any], medications: Mapping[str, dict[str, Any]]) -> tuple[Any, str]:
    """The Medication a request's ``medicationReference`` names (contained, or among ``medications`` by id),
    or None and why it cannot be seen."""
    reference = request.get("medicationReference")
    target = text(reference.get("reference")) if isinstance(reference, dict) else None
    if not target:
        return None, "names no medication"
    if target.startswith("#"):
        for contained in request.get("contained") or ():
            if (
                isinstance(contained, dict)
                and contained.get("resourceType") == "Medication"
                and contained.get("id") == target[1:]
            ):
                return contained, ""
        return None, f"refers to contained {short(target, 40)}, which is not there"
    kind = reference_type(reference)
    found = medications.get(reference_id(reference) or "") if kind in (None, "Medication") else None
    if found is not None:
        return found, ""
    return None, f"refers to {short(target, 60)}, which was not in the data received"


def medication_concept(request: dict[str, Any], medications: Mapping[str, dict[str, Any]]) -> tuple[Any, str]:
    """The code (a CodeableConcept) of the drug a request orders, or None and why it cannot be seen."""
    if isinstance(request.get("medicationCodeableConcept"), dict):
        return request["medicationCodeableConcept"], ""
    medication, why = referenced_medication(request, medications)
    if medication is None:
        return None, why
    if not isinstance(medication.get("code"), dict):
        return None, f"refers to {ref(medication)}, which has no code"
    return medication["code"], ""


@dataclass(frozen=True)
class MedicationUse:
    """A medication request with the drug it orders resolved (``concept`` None, and ``why``, when it cannot be)."""

    request: dict[str, Any]
    concept: dict[str, Any] | None
    why: str
    start: When | None  # authoredOn

    @property
    def ref(self) -> str:
        return ref(self.request)

    @property
    def text(self) -> str | None:
        return concept_text(self.concept)

    def is_a(self, kind: CodeSet | DrugClass) -> bool:
        return self.concept is not None and kind.matches(self.concept)


# ---- the patient ------------------------------------------------------------------------------------------------

_BIRTH_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")


@dataclass(frozen=True)
class Age:
    """Whole years on a day from a birth date that may be partial (``1960``, ``1960-05``): the fewest and the most
    the patient can have, equal when the birth date is complete or the day rules the difference out."""

    least: int
    most: int
    written: str  # the birth date as the record wrote it


def age_on(birth_date: Any, day: date) -> Age | str:
    """The patient's age on ``day`` from ``Patient.birthDate``, or why it cannot be read."""
    written = birth_date.strip() if isinstance(birth_date, str) else ""
    match = _BIRTH_DATE.fullmatch(written)
    if not match:
        return "no usable birth date in the record"
    year, month, dom = int(match.group(1)), match.group(2), match.group(3)
    try:
        earliest = date(year, int(month or 1), int(dom or 1))
        last_month = int(month or 12)
        latest = earliest if dom else date(year, last_month, calendar.monthrange(year, last_month)[1])
    except ValueError:
        return f"birth date {short(written, 12)!r} is not a valid date"

    def years(born: date) -> int:
        return day.year - born.year - ((day.month, day.day) < (born.month, born.day))

    return Age(years(latest), years(earliest), written)


def deceased(patient: dict[str, Any]) -> bool:
    """True when the Patient is recorded as deceased (``deceasedBoolean`` true or any ``deceasedDateTime``)."""
    return patient.get("deceasedBoolean") is True or bool(patient.get("deceasedDateTime"))


def us_core_category(patient: dict[str, Any], url: str = US_CORE_RACE) -> tuple[list[str], str]:
    """The OMB category codes and the text of a US Core race (or, with ``US_CORE_ETHNICITY``, ethnicity)
    extension, in record order; ``([], "")`` when it is absent."""
    codes, written = [], ""
    for extension in patient.get("extension") or ():
        if not isinstance(extension, dict) or extension.get("url") != url:
            continue
        for part in extension.get("extension") or ():
            if not isinstance(part, dict):
                continue
            coding = part.get("valueCoding")
            if part.get("url") == "ombCategory" and isinstance(coding, dict) and text(str(coding.get("code") or "")):
                codes.append(text(str(coding["code"])))
            elif part.get("url") == "text" and isinstance(part.get("valueString"), str):
                written = part["valueString"]
    return codes, written


# ---- the record -------------------------------------------------------------------------------------------------


class Record:
    """A patient's resources (any mix, in record order), indexed by type once, read through the functions above."""

    def __init__(self, resources: Iterable[Any]):
        self.by_type: dict[str, list[dict[str, Any]]] = {}
        for resource in resources:
            if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
                self.by_type.setdefault(resource["resourceType"], []).append(resource)
        self.medications = {r["id"]: r for r in self.by_type.get("Medication", ()) if isinstance(r.get("id"), str)}

    @classmethod
    def from_call(cls, call: Any, keys: Sequence[str] | None = None) -> Record:
        """The resources of a hook call's prefetch, key by key in ``keys`` order (default: the prefetch's)."""
        return cls(r for key in (keys if keys is not None else list(call.prefetch)) for r in call.resources(key))

    def of_type(self, resource_type: str) -> list[dict[str, Any]]:
        return self.by_type.get(resource_type, [])

    @property
    def patient(self) -> dict[str, Any] | None:
        return next(iter(self.of_type("Patient")), None)

    def latest(self, codes: CodeSet, read: Reader) -> Latest:
        """The latest usable observation value in ``codes``: see ``latest``."""
        return latest(self.of_type("Observation"), codes, read)

    def active_conditions(self, codes: CodeSet | None = None) -> list[dict[str, Any]]:
        """Active conditions (see ``active_condition``) coded in ``codes`` (every one when None)."""
        return [
            c
            for c in self.of_type("Condition")
            if active_condition(c) and (codes is None or codes.matches(c.get("code")))
        ]

    def medication_requests(self, active: bool = True) -> list[MedicationUse]:
        """Medication requests (active ones by default) with their drug resolved, resolved or not."""
        uses = []
        for request in self.of_type("MedicationRequest"):
            if active and not active_request(request):
                continue
            concept, why = medication_concept(request, self.medications)
            uses.append(MedicationUse(request, concept, why, parse_when(request.get("authoredOn"))))
        return uses

    def active_medications(self, kind: CodeSet | DrugClass) -> list[MedicationUse]:
        """Active medication requests whose drug is in a code set or class."""
        return [use for use in self.medication_requests() if use.is_a(kind)]
