"""Code sets as named, immutable objects, and the code sets our services read.

A ``CodeSet`` is a name, one or more code systems and their codes (or code prefixes, for ICD-10 chapters); a
``DrugClass`` is a medication class known by RxNorm codes and by ingredient and brand names matched as whole
words in a concept's text and displays. Both match a CodeableConcept or a Coding given as plain FHIR JSON.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
ICD10 = ("http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10")
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
US_CORE_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
US_CORE_ETHNICITY = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
# OMB categories (CDC race and ethnicity code system, urn:oid:2.16.840.1.113883.6.238) that services test for.
OMB_WHITE = "2106-3"
OMB_BLACK = "2054-5"
OMB_HISPANIC = "2135-2"  # an ethnicity, sometimes recorded as a race


def codings(concept: Any) -> list[dict[str, Any]]:
    """The Codings of a CodeableConcept, or the Coding itself; malformed members (not an object, a system or code
    that is not a string, a ``coding`` that is not a list) are left out, so no input can make a match raise."""
    if not isinstance(concept, dict):
        return []
    if "coding" not in concept and ("code" in concept or "system" in concept):
        found = [concept]
    else:
        found = concept.get("coding")
        found = found if isinstance(found, list) else []
    return [c for c in found if isinstance(c, dict) and _well_formed(c)]


def _well_formed(coding: dict[str, Any]) -> bool:
    return all(isinstance(coding.get(key), str | None) for key in ("system", "code"))


def codes_in(concept: Any, system: str) -> set[str]:
    """The codes of ``system`` in a CodeableConcept or Coding."""
    return {c["code"] for c in codings(concept) if c.get("system") == system and c.get("code")}


@dataclass(frozen=True)
class CodeSet:
    """A named set of codes, by system, in the order listed; ``prefixes`` match codes that start with them."""

    name: str
    codes: Mapping[str, tuple[str, ...]]
    prefixes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, system: str | Sequence[str], codes: Iterable[str] = (), prefixes: Iterable[str] = ()):
        """A code set in one system (or several systems sharing the same codes, such as ICD-10 and ICD-10-CM)."""
        systems = (system,) if isinstance(system, str) else tuple(system)
        listed, starts = tuple(dict.fromkeys(codes)), tuple(prefixes)
        return cls(name, {s: listed for s in systems}, {s: starts for s in systems} if starts else {})

    def __or__(self, other: CodeSet) -> CodeSet:
        def merge(a: Mapping[str, tuple[str, ...]], b: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
            return {s: tuple(dict.fromkeys(a.get(s, ()) + b.get(s, ()))) for s in dict.fromkeys([*a, *b])}

        return CodeSet(
            f"{self.name} or {other.name}", merge(self.codes, other.codes), merge(self.prefixes, other.prefixes)
        )

    def __post_init__(self) -> None:
        pairs = frozenset((system, code) for system, codes in self.codes.items() for code in codes)
        object.__setattr__(self, "_pairs", pairs)  # (system, code) lookups on the hook path

    def __hash__(self) -> int:
        return hash((self.name, self._pairs))

    def in_system(self, system: str) -> tuple[str, ...]:
        """This set's codes in ``system``, in the order listed (for search parameters)."""
        return self.codes.get(system, ())

    def search_token(self) -> str:
        """The set as a FHIR token search value, ``system|code`` joined by commas (prefixes are not searchable)."""
        return ",".join(f"{system}|{code}" for system, codes in self.codes.items() for code in codes)

    def matches_coding(self, coding: Any) -> bool:
        """True when the Coding is in this set; a malformed Coding (see ``codings``) matches nothing."""
        if not isinstance(coding, dict) or not coding.get("code") or not _well_formed(coding):
            return False
        system, code = coding.get("system"), coding["code"]
        if (system, code) in self._pairs:
            return True
        starts = self.prefixes.get(system) if self.prefixes else None
        return bool(starts) and code.upper().startswith(starts)

    def matches(self, concept: Any) -> bool:
        """True when any Coding of the CodeableConcept (or the Coding itself) is in this set."""
        return any(self.matches_coding(c) for c in codings(concept))


@dataclass(frozen=True)
class DrugClass:
    """A medication class: RxNorm codes (ingredients and clinical drugs), and names matched as whole words."""

    name: str
    codes: CodeSet
    names: tuple[str, ...]
    # Dose forms that take a drug out of the class (timolol eye drops are no blood-pressure treatment).
    excluded_forms: tuple[str, ...] = ()

    def matches(self, concept: Any) -> bool:
        return classify(concept, (self,)) is self


def all_text(concept: Any) -> str:
    """A concept's text and every display, joined: what names are searched in."""
    parts = [concept.get("text")] if isinstance(concept, dict) else []
    parts += [c.get("display") for c in codings(concept)]
    return " ".join(p for p in parts if isinstance(p, str))


def _words(names: Iterable[str]) -> re.Pattern[str] | None:
    names = list(names)
    return re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b", re.IGNORECASE) if names else None


# Compiled name patterns per group of classes, keyed by the classes' identities (code sets are fixed at import).
_PATTERNS: dict[tuple[int, ...], tuple[re.Pattern | None, re.Pattern | None, dict[str, DrugClass]]] = {}


def classify(concept: Any, classes: Sequence[DrugClass]) -> DrugClass | None:
    """The class of a medication: the first name (leftmost in its text and displays) of any class, else the class
    of its first RxNorm coding in a class; None when it names an excluded dose form or no class matches."""
    key = tuple(map(id, classes))
    if key not in _PATTERNS:
        by_name = {n.lower(): c for c in reversed(classes) for n in c.names}
        excluded = _words(sorted({f for c in classes for f in c.excluded_forms}))
        _PATTERNS[key] = (_words(by_name), excluded, by_name)
    names, excluded, by_name = _PATTERNS[key]
    words = all_text(concept)
    if excluded and excluded.search(words):
        return None
    match = names.search(words) if names else None
    if match:
        return by_name[match.group(1).lower()]
    for coding in codings(concept):
        for drug_class in classes:
            if drug_class.codes.matches_coding(coding):
                return drug_class
    return None


# ---- the code sets our services read --------------------------------------------------------------------------

# Mass and molar concentrations of cholesterol; systolic pressure alone or as a component of the panels 55284-4
# and 85354-9; smoking status.
TOTAL_CHOLESTEROL = CodeSet.of("total cholesterol", LOINC, ("2093-3", "14647-2"))
HDL = CodeSet.of("HDL cholesterol", LOINC, ("2085-9", "14646-4"))
# LDL cholesterol measured (2089-1, 18262-6 direct assay), calculated (13457-7), or in mmol/L (22748-8).
LDL = CodeSet.of("LDL cholesterol", LOINC, ("13457-7", "18262-6", "2089-1", "22748-8"))
SYSTOLIC_BP = CodeSet.of("systolic blood pressure", LOINC, ("8480-6",))
BP_PANEL = CodeSet.of("blood pressure panel", LOINC, ("55284-4", "85354-9"))
SMOKING_STATUS = CodeSet.of("smoking status", LOINC, ("72166-2",))

# Smoking status (72166-2) answers, SNOMED CT.
CURRENT_SMOKER = CodeSet.of(
    "current smoker",
    SNOMED,
    ("449868002", "428041000124106", "77176002", "65568007", "428071000124103", "428061000124105"),
)
NON_SMOKER = CodeSet.of("former or never smoker", SNOMED, ("8517006", "266919005"))
SMOKING_UNKNOWN = CodeSet.of("smoking status unknown", SNOMED, ("266927001",))

# Diabetes mellitus: SNOMED CT (the disorder, its types, and the complications seen in Synthea data), and the
# ICD-10 categories. Prediabetes (15777000, 714628002) is not diabetes and is never in it.
DIABETES = CodeSet.of(
    "diabetes",
    SNOMED,
    (
        "73211009",  # diabetes mellitus
        "44054006",  # type 2
        "46635009",  # type 1
        "368581000119106",  # neuropathy due to type 2 diabetes
        "127013003",  # disorder of kidney due to diabetes
        "422034002",  # retinopathy due to type 2 diabetes
        "1551000119108",  # nonproliferative retinopathy due to type 2 diabetes
        "1501000119109",  # proliferative retinopathy due to type 2 diabetes
        "97331000119101",  # macular oedema and retinopathy due to type 2 diabetes
        "157141000119108",  # proteinuria due to type 2 diabetes
        "90781000119102",  # microalbuminuria due to type 2 diabetes
        "60951000119105",  # blindness due to type 2 diabetes
        "4855003",  # diabetic retinopathy
    ),
) | CodeSet.of("diabetes (ICD-10)", ICD10, prefixes=("E08", "E09", "E10", "E11", "E13"))

# Clinical ASCVD, SNOMED CT.
ASCVD = CodeSet.of(
    "clinical ASCVD",
    SNOMED,
    (
        "22298006",  # myocardial infarction
        "399211009",  # history of myocardial infarction
        "401303003",  # acute ST-elevation myocardial infarction
        "401314000",  # acute non-ST-elevation myocardial infarction
        "53741008",  # coronary arteriosclerosis (coronary heart disease)
        "414545008",  # ischaemic heart disease
        "194828000",  # angina
        "230690007",  # cerebrovascular accident
        "422504002",  # ischaemic stroke
        "266257000",  # transient ischaemic attack
        "399957001",  # peripheral arterial occlusive disease
    ),
)


def _names(words: str) -> tuple[str, ...]:
    return tuple(words.split())


def _rxnorm(name: str, codes: Iterable[str]) -> CodeSet:
    return CodeSet.of(name, RXNORM, codes)


# RxNorm: ingredients, and the clinical drugs seen in the Synthea sample data.
STATIN = DrugClass(
    "statin",
    _rxnorm(
        "statin",
        (
            "83367",  # atorvastatin
            "36567",  # simvastatin
            "301542",  # rosuvastatin
            "42463",  # pravastatin
            "6472",  # lovastatin
            "41127",  # fluvastatin
            "861634",  # pitavastatin
            "312961",  # simvastatin 20 MG Oral Tablet
            "316672",  # simvastatin 10 MG (displayed "Simvistatin 10 MG" in Synthea)
            "617310",  # atorvastatin 20 MG Oral Tablet
            "617311",  # atorvastatin 40 MG Oral Tablet
        ),
    ),
    _names(
        "atorvastatin simvastatin rosuvastatin pravastatin lovastatin fluvastatin pitavastatin "
        "lipitor zocor crestor pravachol mevacor altoprev lescol livalo zypitamag vytorin caduet"
    ),
)

_NOT_SYSTEMIC = ("ophthalmic", "otic", "topical", "shampoo", "foam")
# Dose forms given only in hospital (a furosemide injection, IV labetalol): acute treatment, not the chronic
# blood-pressure treatment the risk equations ask about.
PARENTERAL_FORMS = ("injection", "injectable", "injector", "syringe", "cartridge", "infusion", "intravenous")
# Routes of administration that make an order parenteral (SNOMED CT): intravenous, intramuscular, subcutaneous.
PARENTERAL_ROUTE = CodeSet.of("parenteral route", SNOMED, ("47625008", "78421000", "34206005"))
PARENTERAL_ROUTE_WORDS = ("intravenous", "intramuscular", "subcutaneous")
# MedicationRequest.category for orders given or consumed in hospital.
MEDICATION_REQUEST_CATEGORY = "http://terminology.hl7.org/CodeSystem/medicationrequest-category"
INPATIENT = "inpatient"


def _bp_class(name: str, names: str, codes: Iterable[str] = ()) -> DrugClass:
    return DrugClass(name, _rxnorm(name, codes), _names(names), _NOT_SYSTEMIC + PARENTERAL_FORMS)


# Blood-pressure-lowering drugs by class: RxNorm codes, ingredient names and a few common brand names.
BP_LOWERING = (
    _bp_class(
        "thiazide diuretic",
        "hydrochlorothiazide chlorthalidone chlorothiazide indapamide metolazone microzide",
        ("5487", "2409", "316049"),  # hydrochlorothiazide, chlorthalidone, hydrochlorothiazide 25 MG
    ),
    _bp_class(
        "loop diuretic",
        "furosemide bumetanide torsemide ethacrynic lasix",
        ("4603", "315971"),  # furosemide, Lasix 40mg (Synthea); never an injection (PARENTERAL_FORMS)
    ),
    _bp_class("potassium-sparing diuretic", "spironolactone eplerenone amiloride triamterene aldactone"),
    _bp_class(
        "ACE inhibitor",
        "benazepril captopril enalapril fosinopril lisinopril moexipril perindopril quinapril ramipril "
        "trandolapril zestril prinivil zestoretic vasotec altace",
        ("29046",),  # lisinopril
    ),
    _bp_class(
        "angiotensin receptor blocker",
        "azilsartan candesartan eprosartan irbesartan losartan olmesartan telmisartan valsartan cozaar hyzaar "
        "diovan benicar micardis avapro",
        ("52175", "69749"),  # losartan, valsartan
    ),
    _bp_class("renin inhibitor", "aliskiren"),
    _bp_class(
        "calcium channel blocker",
        "amlodipine levamlodipine felodipine isradipine nicardipine nifedipine nisoldipine diltiazem verapamil norvasc",
        ("17767", "197361"),  # amlodipine, amlodipine 5 MG Oral Tablet
    ),
    _bp_class(
        "beta blocker",
        "acebutolol atenolol betaxolol bisoprolol carvedilol labetalol metoprolol nadolol nebivolol pindolol "
        "propranolol timolol toprol lopressor tenormin coreg",
        ("6918", "1202", "20352", "866414"),  # metoprolol, atenolol, carvedilol, metoprolol succinate 100 MG [Toprol]
    ),
    _bp_class("alpha-1 blocker", "doxazosin prazosin terazosin"),
    _bp_class("central alpha-2 agonist", "clonidine guanfacine methyldopa catapres"),
    _bp_class("direct vasodilator", "hydralazine minoxidil"),
)
