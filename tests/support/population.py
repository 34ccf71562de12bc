"""A deterministic synthetic population for batch tests: Patients with what the cardiovascular-risk service reads.

Every patient comes from its own random stream, seeded by ``seed`` and its index, so patient ``syn-000042`` is the
same whatever the population size, and the same ``(n, seed, as_of)`` always gives byte-identical files. Dates are
relative to ``as_of`` (a fixed day by default, not today), so nothing depends on when the tests run.

The spread is meant to exercise the reader (``app.fhir.codes`` code sets, ``app.fhir.record``): ages 20-90, female
and male plus a few ``other``/``unknown``, US Core race white, black, other or absent; most patients complete, some
without cholesterol, blood pressure or smoking status (not scorable), some with several readings over the years,
cholesterol sometimes in mmol/L, systolic pressure alone (8480-6) or inside a vital-signs panel (85354-9); diabetes
(SNOMED, some with ICD-10 too), clinical ASCVD (some resolved), statins and blood-pressure drugs (some stopped), and
a few deceased patients.

Usage::

    counts = write_population(tmp_path, 5000, seed=1)   # Patient.ndjson ... Group.ndjson, streamed
    fhir_server.bulk_source(tmp_path)                    # export them from the FHIR test server
    for resource_type, resource in iter_population(10): ...
    patient_resources(42)                                # one patient: [("Patient", {...}), ("Observation", ...)]
    seed_population(fhir_server, 50)                     # the same resources, into the FHIR test server's store
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from app.fhir.codes import (
    CONDITION_CLINICAL,
    CONDITION_VERIFICATION,
    LOINC,
    RXNORM,
    SNOMED,
    UCUM,
    US_CORE_ETHNICITY,
    US_CORE_RACE,
)

AS_OF = date(2026, 1, 1)
ICD10_CM = "http://hl7.org/fhir/sid/icd-10-cm"
OMB = "urn:oid:2.16.840.1.113883.6.238"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
IDENTIFIER_SYSTEM = "urn:example:synthetic-population"
# One NDJSON file per resource type, named as Bulk Data exports name them.
RESOURCE_TYPES = ("Patient", "Observation", "Condition", "MedicationRequest")
GROUP_FILE = "Group.ndjson"
MG_DL_PER_MMOL_L = 38.67  # cholesterol, as app.fhir.record converts it

RACES = (  # (share, OMB code, display); the last share is "no race recorded"
    (0.66, "2106-3", "White"),
    (0.18, "2054-5", "Black or African American"),
    (0.07, "2028-9", "Asian"),
    (0.02, "1002-5", "American Indian or Alaska Native"),
    (0.02, "2076-8", "Native Hawaiian or Other Pacific Islander"),
)
SMOKING = (  # (share, SNOMED code, display): 72166-2 answers
    (0.54, "266919005", "Never smoked tobacco"),
    (0.24, "8517006", "Ex-smoker"),
    (0.16, "449868002", "Smokes tobacco daily"),
    (0.04, "428041000124106", "Occasional tobacco smoker"),
    (0.02, "266927001", "Tobacco smoking consumption unknown"),
)
DIABETES = (("44054006", "Diabetes mellitus type 2", "E11.9"), ("46635009", "Diabetes mellitus type 1", "E10.9"))
ASCVD = (
    ("22298006", "Myocardial infarction"),
    ("53741008", "Coronary arteriosclerosis"),
    ("230690007", "Cerebrovascular accident"),
    ("194828000", "Angina"),
    ("399957001", "Peripheral arterial occlusive disease"),
)
STATINS = (
    ("617310", "atorvastatin 20 MG Oral Tablet"),
    ("312961", "simvastatin 20 MG Oral Tablet"),
    ("301542", "rosuvastatin"),
)
BP_DRUGS = (
    ("29046", "lisinopril"),
    ("197361", "amlodipine 5 MG Oral Tablet"),
    ("316049", "hydrochlorothiazide 25 MG"),
    ("52175", "losartan"),
    ("866414", "24 HR metoprolol succinate 100 MG Extended Release Oral Tablet [Toprol]"),
)
# Codes the reader must not take for any input: noise a real record has.
HYPERTENSION = ("59621000", "Essential hypertension")
PREDIABETES = ("15777000", "Prediabetes")
METFORMIN = ("860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet")
GIVEN = ("Alex", "Sam", "Robin", "Kim", "Jo", "Lee", "Noor", "Ari", "Max", "Pat", "Dana", "Remy")


def patient_id(index: int, prefix: str = "syn") -> str:
    """The id of the ``index``-th patient (1-based): ``syn-000001``. Its resources' ids start with it."""
    if not re.fullmatch(r"[A-Za-z0-9.]{1,40}", prefix):
        raise ValueError("an id prefix is 1-40 letters, digits or dots")
    return f"{prefix}-{index:06d}"


def _pick(rng: random.Random, table: tuple[tuple[Any, ...], ...]) -> tuple[Any, ...] | None:
    """A row of a (share, ...) table by its share; None in the share left over."""
    roll = rng.random()
    for row in table:
        if roll < row[0]:
            return row[1:]
        roll -= row[0]
    return None


def _concept(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _instant(day: date, rng: random.Random) -> str:
    return f"{day.isoformat()}T{rng.randint(7, 17):02d}:{rng.randint(0, 59):02d}:00Z"


class _Patient:
    """One patient's resources, built from one random stream."""

    def __init__(self, index: int, seed: int, as_of: date, prefix: str):
        self.id = patient_id(index, prefix)
        self.subject = {"reference": f"Patient/{self.id}"}
        self.rng = random.Random(f"synthetic-population:{seed}:{index}")
        self.as_of = as_of
        self.resources: dict[str, list[dict[str, Any]]] = {t: [] for t in RESOURCE_TYPES}

    def _add(self, resource_type: str, resource: dict[str, Any], updated: str) -> None:
        serial = len(self.resources[resource_type]) + 1
        suffix = {"Observation": "obs", "Condition": "cond", "MedicationRequest": "med"}[resource_type]
        full = {"resourceType": resource_type, "id": f"{self.id}-{suffix}-{serial}", "meta": {"lastUpdated": updated}}
        full.update(resource)
        self.resources[resource_type].append(full)

    def build(self) -> list[tuple[str, dict[str, Any]]]:
        rng, as_of = self.rng, self.as_of
        age = rng.randint(20, 90)
        birth = as_of - timedelta(days=int((age + rng.random()) * 365.25))
        # Visits over the last eight years: most patients have one, a third several.
        visits = 1 + (rng.randint(1, 4) if rng.random() < 0.35 else 0)
        days = sorted(as_of - timedelta(days=rng.randint(10, 8 * 365)) for _ in range(visits))
        died = age >= 50 and rng.random() < 0.04
        completeness = rng.random()
        risk = {
            "diabetes": rng.random() < 0.03 + 0.003 * (age - 20),
            "ascvd": rng.random() < max(0.0, 0.0025 * (age - 35)),
        }
        sbp = rng.gauss(108 + 0.45 * age, 14)
        risk["bp_drug"] = rng.random() < (0.65 if sbp > 140 else 0.12 if age >= 45 else 0.03)
        risk["statin"] = rng.random() < (
            0.7 if risk["ascvd"] else 0.5 if risk["diabetes"] and age >= 40 else 0.12 if age >= 50 else 0.02
        )
        patient = self._patient(birth, days[-1], died)
        self._observations(days, sbp, completeness)
        self._conditions(birth, days, risk)
        self._medications(days, risk)
        out: list[tuple[str, dict[str, Any]]] = [("Patient", patient)]
        for resource_type in RESOURCE_TYPES[1:]:
            out += [(resource_type, r) for r in self.resources[resource_type]]
        return out

    def _patient(self, birth: date, last_visit: date, died: bool) -> dict[str, Any]:
        rng = self.rng
        roll = rng.random()
        gender = "female" if roll < 0.485 else "male" if roll < 0.97 else "other" if roll < 0.985 else "unknown"
        patient: dict[str, Any] = {
            "resourceType": "Patient",
            "id": self.id,
            "meta": {"lastUpdated": _instant(last_visit, rng)},
            "extension": [],
            "identifier": [{"system": IDENTIFIER_SYSTEM, "value": self.id}],
            "name": [{"family": "Synthetic", "given": [rng.choice(GIVEN)]}],
            "gender": gender,
            "birthDate": birth.isoformat(),
        }
        race = _pick(rng, RACES)
        if race:
            code, display = race
            patient["extension"].append(
                {
                    "url": US_CORE_RACE,
                    "extension": [
                        {"url": "ombCategory", "valueCoding": {"system": OMB, "code": code, "display": display}},
                        {"url": "text", "valueString": display},
                    ],
                }
            )
        if rng.random() < 0.15:
            hispanic = {"system": OMB, "code": "2135-2", "display": "Hispanic or Latino"}
            text = {"url": "text", "valueString": hispanic["display"]}
            parts = [{"url": "ombCategory", "valueCoding": hispanic}, text]
            patient["extension"].append({"url": US_CORE_ETHNICITY, "extension": parts})
        if not patient["extension"]:
            del patient["extension"]
        if died:
            died_on = min(self.as_of - timedelta(days=1), last_visit + timedelta(days=rng.randint(30, 400)))
            patient["deceasedDateTime"] = _instant(died_on, rng)
        elif rng.random() < 0.3:
            patient["deceasedBoolean"] = False
        return patient

    def _observations(self, days: list[date], sbp: float, completeness: float) -> None:
        rng = self.rng
        # About 75 % complete; the rest lack cholesterol, blood pressure, smoking status, or everything.
        has_labs = not (completeness < 0.04 or 0.04 <= completeness < 0.11)
        has_hdl = has_labs or 0.07 <= completeness < 0.11  # some lack only total cholesterol
        has_bp = not (completeness < 0.04 or 0.11 <= completeness < 0.18)
        has_smoking = not (completeness < 0.04 or 0.18 <= completeness < 0.22)
        molar = rng.random() < 0.05
        panel = rng.random() < 0.65
        total, hdl = rng.gauss(200, 36), rng.gauss(53, 14)
        smoking = _pick(rng, SMOKING) or SMOKING[0][1:]
        for visit, day in enumerate(days):
            at = _instant(day, rng)
            if has_labs:
                value = _drift(rng, total, 18, 110, 340)
                self._quantity(at, "2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", value, molar)
            if has_hdl:
                value = _drift(rng, hdl, 5, 15, 115)
                self._quantity(at, "2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma", value, molar)
            if has_bp:
                self._blood_pressure(at, _drift(rng, sbp, 9, 82, 215), panel)
            if has_smoking and (visit == len(days) - 1 or rng.random() < 0.5):
                code, display = smoking
                self._add(
                    "Observation",
                    {
                        "status": "final",
                        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "social-history"}]}],
                        "code": _concept(LOINC, "72166-2", "Tobacco smoking status"),
                        "subject": self.subject,
                        "effectiveDateTime": at,
                        "valueCodeableConcept": _concept(SNOMED, code, display),
                    },
                    at,
                )

    def _quantity(self, at: str, code: str, display: str, mg_dl: float, molar: bool) -> None:
        value, unit = (round(mg_dl / MG_DL_PER_MMOL_L, 2), "mmol/L") if molar else (round(mg_dl), "mg/dL")
        self._add(
            "Observation",
            {
                "status": "final",
                "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "laboratory"}]}],
                "code": _concept(LOINC, code, display),
                "subject": self.subject,
                "effectiveDateTime": at,
                "issued": at,
                "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
            },
            at,
        )

    def _blood_pressure(self, at: str, systolic: float, panel: bool) -> None:
        def component(code: str, display: str, value: float) -> dict[str, Any]:
            quantity = {"value": round(value), "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}
            return {"code": _concept(LOINC, code, display), "valueQuantity": quantity}

        vital = [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "vital-signs"}]}]
        diastolic = systolic * 0.62 + self.rng.gauss(0, 4)
        if panel:
            parts = [
                component("8480-6", "Systolic blood pressure", systolic),
                component("8462-4", "Diastolic blood pressure", diastolic),
            ]
            code = _concept(LOINC, "85354-9", "Blood pressure panel with all children optional")
            resource = {"status": "final", "category": vital, "code": code, "subject": self.subject}
            self._add("Observation", {**resource, "effectiveDateTime": at, "component": parts}, at)
            return
        alone = component("8480-6", "Systolic blood pressure", systolic)
        resource = {"status": "final", "category": vital, **alone, "subject": self.subject, "effectiveDateTime": at}
        self._add("Observation", resource, at)

    def _condition(self, concept: dict[str, Any], onset: date, status: str = "active") -> None:
        at = _instant(onset, self.rng)
        self._add(
            "Condition",
            {
                "clinicalStatus": {"coding": [{"system": CONDITION_CLINICAL, "code": status}]},
                "verificationStatus": {"coding": [{"system": CONDITION_VERIFICATION, "code": "confirmed"}]},
                "category": [{"coding": [{"system": CONDITION_CATEGORY, "code": "problem-list-item"}]}],
                "code": concept,
                "subject": self.subject,
                "onsetDateTime": at,
                "recordedDate": at,
            },
            at,
        )

    def _conditions(self, birth: date, days: list[date], risk: dict[str, bool]) -> None:
        rng = self.rng
        first = days[0]
        if risk["diabetes"]:
            code, display, icd = rng.choice(DIABETES)
            concept = _concept(SNOMED, code, display)
            if rng.random() < 0.3:
                concept["coding"].append({"system": ICD10_CM, "code": icd, "display": display})
            self._condition(concept, first - timedelta(days=rng.randint(0, 3000)))
        elif rng.random() < 0.08:
            self._condition(_concept(SNOMED, *PREDIABETES), first)
        if risk["ascvd"]:
            code, display = rng.choice(ASCVD)
            self._condition(_concept(SNOMED, code, display), first - timedelta(days=rng.randint(0, 2000)))
        elif rng.random() < 0.02:  # an event recorded, then resolved: not active, so not clinical ASCVD here
            code, display = rng.choice(ASCVD)
            self._condition(_concept(SNOMED, code, display), max(birth, first - timedelta(days=4000)), "resolved")
        if risk["bp_drug"]:
            self._condition(_concept(SNOMED, *HYPERTENSION), first)

    def _medication(self, code: str, display: str, day: date, status: str = "active") -> None:
        at = _instant(day, self.rng)
        self._add(
            "MedicationRequest",
            {
                "status": status,
                "intent": "order",
                "medicationCodeableConcept": _concept(RXNORM, code, display),
                "subject": self.subject,
                "authoredOn": at,
                "dosageInstruction": [{"text": "1 tablet by mouth daily"}],
            },
            at,
        )

    def _medications(self, days: list[date], risk: dict[str, bool]) -> None:
        rng = self.rng
        last = days[-1]
        if risk["bp_drug"]:
            if len(days) > 1 and rng.random() < 0.3:  # switched drugs: the first one stopped
                self._medication(*rng.choice(BP_DRUGS), days[0], "stopped")
            self._medication(*rng.choice(BP_DRUGS), last)
        if risk["statin"]:
            self._medication(*rng.choice(STATINS), last)
        elif rng.random() < 0.03:
            self._medication(*rng.choice(STATINS), days[0], "stopped")
        if risk["diabetes"] and rng.random() < 0.6:
            self._medication(*METFORMIN, last)


def _drift(rng: random.Random, centre: float, spread: float, low: float, high: float) -> float:
    """A reading around a patient's usual value, kept within what a laboratory or cuff reports."""
    return min(high, max(low, rng.gauss(centre, spread)))


def patient_resources(
    index: int, seed: int = 0, as_of: date = AS_OF, prefix: str = "syn"
) -> list[tuple[str, dict[str, Any]]]:
    """The ``index``-th patient (1-based) and its resources, as (resource type, resource), the Patient first.

    ``prefix`` changes the ids only (``{prefix}-000001``), so that several populations can share one server."""
    if index < 1:
        raise ValueError("patient indexes start at 1")
    return _Patient(index, seed, as_of, prefix).build()


def iter_population(
    n: int, seed: int = 0, as_of: date = AS_OF, prefix: str = "syn"
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every resource of a population of ``n`` patients, patient by patient (Group not included)."""
    for index in range(1, n + 1):
        yield from patient_resources(index, seed, as_of, prefix)


def population_group(n: int, group_id: str = "synthetic", prefix: str = "syn") -> dict[str, Any]:
    """The Group whose members are the ``n`` patients (built in memory: for small populations)."""
    members = [{"entity": {"reference": f"Patient/{patient_id(i, prefix)}"}} for i in range(1, n + 1)]
    return {**_group_head(n, group_id), "member": members}


def _group_head(n: int, group_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Group",
        "id": group_id,
        "type": "person",
        "actual": True,
        "name": f"Synthetic population ({n} patients)",
        "quantity": n,
    }


def _line(resource: dict[str, Any]) -> str:
    return json.dumps(resource, separators=(",", ":"), ensure_ascii=False) + "\n"


def write_population(
    directory: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    group_id: str = "synthetic",
    as_of: date = AS_OF,
    prefix: str = "syn",
) -> dict[str, int]:
    """Write ``n`` patients as Bulk Data NDJSON (``Patient.ndjson``, ``Observation.ndjson``, ``Condition.ndjson``,
    ``MedicationRequest.ndjson``) and ``Group.ndjson`` (one Group of all of them) into ``directory``; return the
    number of resources written per type. Streams patient by patient: memory does not grow with ``n``."""
    if n < 0:
        raise ValueError("n must be >= 0")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(RESOURCE_TYPES, 0)
    files = {t: (folder / f"{t}.ndjson").open("w", encoding="utf-8") for t in RESOURCE_TYPES}
    try:
        with (folder / GROUP_FILE).open("w", encoding="utf-8") as group:
            # One Group line written member by member: {...head..., "member": [m1, m2, ...]}
            group.write(json.dumps(_group_head(n, group_id), separators=(",", ":"))[:-1] + ',"member":[')
            for index in range(1, n + 1):
                for resource_type, resource in patient_resources(index, seed, as_of, prefix):
                    files[resource_type].write(_line(resource))
                    counts[resource_type] += 1
                reference = f"Patient/{patient_id(index, prefix)}"
                member = json.dumps({"entity": {"reference": reference}}, separators=(",", ":"))
                group.write(("," if index > 1 else "") + member)
            group.write("]}\n")
    finally:
        for f in files.values():
            f.close()
    return {**counts, "Group": 1}


def seed_population(
    server: Any,
    n: int,
    seed: int = 0,
    group_id: str = "synthetic",
    as_of: date = AS_OF,
    per_bundle: int = 200,
    prefix: str = "syn",
) -> dict[str, int]:
    """Load the same population into a ``FhirTestServer`` (ids kept, through ``$seed``), ``per_bundle`` patients
    per Bundle, then its Group; return the counts per type. For tests that want the repository's real searches.

    Two populations with the same ``prefix`` share ids: the second overwrites the first patient by patient and
    leaves the first one's extra resources in place. Give each its own ``prefix`` (or reset the server)."""
    counts = dict.fromkeys(RESOURCE_TYPES, 0)
    entries: list[dict[str, Any]] = []

    def flush() -> None:
        if entries:
            server.put(entries)
            entries.clear()

    for index in range(1, n + 1):
        for resource_type, resource in patient_resources(index, seed, as_of, prefix):
            entries.append(resource)
            counts[resource_type] += 1
        if index % per_bundle == 0:
            flush()
    entries.append(population_group(n, group_id, prefix))
    flush()
    return {**counts, "Group": 1}
