"""Whether a FHIR resource belongs to the patient (and encounter) in context: the one rule every read passes.

A resource of a type in the FHIR R4 patient compartment belongs when the element that names whose data it is
(``subject``, ``patient``, ...: the search parameter the R4 patient CompartmentDefinition lists for that type)
refers to the context patient, and to no other patient. A reference counts when it is relative (``Patient/123``,
with or without ``/_history/2``), absolute under the context's FHIR server, or a ``urn:uuid:`` that a Bundle
entry's ``fullUrl`` gives to that patient. Anything else (another patient, no patient link, a contained
``#ref``, another server, an identifier alone, a ``type`` that is not the referenced type) does not belong.
Types outside the compartment (Medication, Practitioner, Organization, OperationOutcome, ...) are not patient
data and pass. A Bundle entry whose absolute ``fullUrl`` is on another server is not used at all: its resource
lives there, and its relative references resolve there (R4 Bundle, "Resolving references in Bundles").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

# Element paths to the patient whose data a resource is, for every type of the R4 patient compartment; the
# expression of the compartment's "patient"/"subject" parameter (actors such as performer or author left out).
PATIENT_LINKS: dict[str, tuple[str, ...]] = {
    "Account": ("subject",),
    "AdverseEvent": ("subject",),
    "AllergyIntolerance": ("patient",),
    "Appointment": ("participant.actor",),
    "AppointmentResponse": ("actor",),
    "AuditEvent": ("agent.who", "entity.what"),
    "Basic": ("subject",),
    "BodyStructure": ("patient",),
    "CarePlan": ("subject",),
    "CareTeam": ("subject",),
    "ChargeItem": ("subject",),
    "Claim": ("patient",),
    "ClaimResponse": ("patient",),
    "ClinicalImpression": ("subject",),
    "Communication": ("subject",),
    "CommunicationRequest": ("subject",),
    "Composition": ("subject",),
    "Condition": ("subject",),
    "Consent": ("patient",),
    "Coverage": ("beneficiary",),
    "CoverageEligibilityRequest": ("patient",),
    "CoverageEligibilityResponse": ("patient",),
    "DetectedIssue": ("patient",),
    "DeviceRequest": ("subject",),
    "DeviceUseStatement": ("subject",),
    "DiagnosticReport": ("subject",),
    "DocumentManifest": ("subject",),
    "DocumentReference": ("subject",),
    "Encounter": ("subject",),
    "EnrollmentRequest": ("candidate",),
    "EpisodeOfCare": ("patient",),
    "ExplanationOfBenefit": ("patient",),
    "FamilyMemberHistory": ("patient",),
    "Flag": ("subject",),
    "Goal": ("subject",),
    "Group": ("member.entity",),
    "ImagingStudy": ("subject",),
    "Immunization": ("patient",),
    "ImmunizationEvaluation": ("patient",),
    "ImmunizationRecommendation": ("patient",),
    "Invoice": ("subject",),
    "List": ("subject",),
    "MeasureReport": ("subject",),
    "Media": ("subject",),
    "MedicationAdministration": ("subject",),
    "MedicationDispense": ("subject",),
    "MedicationRequest": ("subject",),
    "MedicationStatement": ("subject",),
    "MolecularSequence": ("patient",),
    "NutritionOrder": ("patient",),
    "Observation": ("subject",),
    "Person": ("link.target",),
    "Procedure": ("subject",),
    "Provenance": ("target",),
    "QuestionnaireResponse": ("subject",),
    "RelatedPerson": ("patient",),
    "RequestGroup": ("subject",),
    "ResearchSubject": ("individual",),
    "RiskAssessment": ("subject",),
    "Schedule": ("actor",),
    "ServiceRequest": ("subject",),
    "Specimen": ("subject",),
    "SupplyDelivery": ("patient",),
    "SupplyRequest": ("deliverTo",),
    "Task": ("for",),
    "VisionPrescription": ("patient",),
}
# Element paths to the encounter a resource was recorded in: the R4 "encounter" (or "context") search parameter.
ENCOUNTER_LINKS: dict[str, tuple[str, ...]] = {
    "CarePlan": ("encounter",),
    "CareTeam": ("encounter",),
    "ChargeItem": ("context",),
    "Claim": ("item.encounter",),
    "ClinicalImpression": ("encounter",),
    "Communication": ("encounter",),
    "CommunicationRequest": ("encounter",),
    "Composition": ("encounter",),
    "Condition": ("encounter",),
    "DeviceRequest": ("encounter",),
    "DiagnosticReport": ("encounter",),
    "DocumentReference": ("context.encounter",),
    "ExplanationOfBenefit": ("item.encounter",),
    "Flag": ("encounter",),
    "ImagingStudy": ("encounter",),
    "List": ("encounter",),
    "Media": ("encounter",),
    "MedicationAdministration": ("context",),
    "MedicationDispense": ("context",),
    "MedicationRequest": ("encounter",),
    "MedicationStatement": ("context",),
    "NutritionOrder": ("encounter",),
    "Observation": ("encounter",),
    "Procedure": ("encounter",),
    "QuestionnaireResponse": ("encounter",),
    "RequestGroup": ("encounter",),
    "RiskAssessment": ("encounter",),
    "ServiceRequest": ("encounter",),
    "Task": ("encounter",),
    "VisionPrescription": ("encounter",),
}

# Types whose one patient link is ``subject``: most of what a hook reads, checked first by one comparison.
_BY_SUBJECT = frozenset(kind for kind, paths in PATIENT_LINKS.items() if paths == ("subject",))
_RELATIVE = re.compile(r"([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_WEB = ("http", "https")


def _origin_and_path(url: str) -> tuple[str, str, int | None, str] | None:
    try:
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        return None
    if parts.query or parts.fragment or not parts.hostname:
        return None
    return parts.scheme.lower(), parts.hostname.lower(), port, parts.path


def _leaves(value: Any, path: list[str]) -> list[Any]:
    """Every value at a dotted element path. A list is one repeating element; FHIR never nests them, so a list
    inside a list is a value (not a reference), and no input, however deep, makes this recurse."""
    current = [value]
    for name in path:
        current = [
            element[name]
            for item in current
            for element in (item if isinstance(item, list) else (item,))
            if isinstance(element, dict) and name in element
        ]
    return [leaf for item in current for leaf in (item if isinstance(item, list) else (item,))]


def _references(resource: dict[str, Any], paths: tuple[str, ...]) -> list[Any]:
    return [leaf for path in paths for leaf in _leaves(resource, path.split("."))]


class BundleAliases(Mapping[str, "str | None"]):
    """``bundle_aliases`` of some values, worked out on first use: most calls meet no ``urn:uuid:`` reference."""

    def __init__(self, values: Iterable[Any]):
        self._values: Iterable[Any] | None = values
        self._aliases: dict[str, str | None] = {}

    def _resolved(self) -> dict[str, str | None]:
        if self._values is not None:
            self._aliases, self._values = bundle_aliases(self._values), None
        return self._aliases

    def __getitem__(self, key: str) -> str | None:
        return self._resolved()[key]

    def __iter__(self):
        return iter(self._resolved())

    def __len__(self) -> int:
        return len(self._resolved())


def bundle_aliases(values: Iterable[Any]) -> dict[str, str | None]:
    """``urn:uuid:`` fullUrls of the Bundles' entries -> the ``Type/id`` of the resource each names (None when two
    entries claim the same fullUrl for different resources: such a reference names nothing for sure)."""
    aliases: dict[str, str | None] = {}
    for bundle in values:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            continue
        entries = bundle.get("entry")
        for entry in entries if isinstance(entries, list) else ():
            full_url = entry.get("fullUrl") if isinstance(entry, dict) else None
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not (isinstance(full_url, str) and full_url.startswith("urn:uuid:") and isinstance(resource, dict)):
                continue
            kind, ident = resource.get("resourceType"), resource.get("id")
            named = f"{kind}/{ident}" if isinstance(kind, str) and isinstance(ident, str) else None
            aliases[full_url] = named if aliases.get(full_url, named) == named else None
    return aliases


def entry_base(full_url: str) -> str | None:
    """The server base of an absolute http(s) ``fullUrl``: the URL without its ``Type/id[/_history/v]``; None when
    it is not one (a ``urn:``, or a URL of another shape)."""
    if full_url.partition("://")[0].lower() not in _WEB:
        return None
    base = full_url.partition("/_history/")[0].rpartition("/")[0].rpartition("/")[0]
    return base if _RELATIVE.fullmatch(full_url[len(base) + 1 :]) else None


def shared_base(values: Iterable[Any]) -> str | None:
    """The one server base every absolute http(s) ``fullUrl`` in these Bundles names, or None (none, or several):
    where a prefetch sent without ``fhirServer`` came from, when it says so consistently."""
    bases = set()
    for bundle in values:
        entries = bundle.get("entry") if isinstance(bundle, dict) and bundle.get("resourceType") == "Bundle" else None
        for entry in entries if isinstance(entries, list) else ():
            full_url = entry.get("fullUrl") if isinstance(entry, dict) else None
            if isinstance(full_url, str) and full_url.partition("://")[0].lower() in _WEB:
                bases.add(entry_base(full_url))
    return bases.pop() if len(bases) == 1 else None


def as_read_from(bundle: Any) -> Any:
    """A Bundle the service read from ``fhirServer`` itself, without its entries' absolute ``fullUrl``s: the answer
    is that server's, whatever base it prints (one behind a proxy often prints its internal base), so its relative
    references resolve against ``fhirServer``. Entries a client sent keep theirs and are checked (ADR 0003). An
    answer whose ``fullUrl``s name several bases (a facade over several servers) keeps them, and is checked too."""
    entries = bundle.get("entry") if isinstance(bundle, dict) and bundle.get("resourceType") == "Bundle" else None
    if not isinstance(entries, list) or shared_base([bundle]) is None:
        return bundle
    kept = [{k: v for k, v in e.items() if k != "fullUrl"} if _absolute_full_url(e) else e for e in entries]
    return {**bundle, "entry": kept}


def _absolute_full_url(entry: Any) -> bool:
    full_url = entry.get("fullUrl") if isinstance(entry, dict) else None
    return isinstance(full_url, str) and full_url.partition("://")[0].lower() in _WEB


@dataclass(frozen=True)
class Compartment:
    """The patient (and, for encounter-scoped reads, the encounter) in context, and where references resolve."""

    patient_id: str | None
    fhir_server: str | None = None
    aliases: Mapping[str, str | None] = field(default_factory=dict)
    by_encounter: bool = False
    encounter_id: str | None = None
    _patient_ref: str | None = field(init=False, repr=False, compare=False)
    _server_prefix: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_patient_ref", f"Patient/{self.patient_id}" if self.patient_id else None)
        object.__setattr__(self, "_server_prefix", self.fhir_server.rstrip("/") + "/" if self.fhir_server else None)

    def of_encounter(self, encounter_id: str | None) -> Compartment:
        """The same compartment, narrowed to one encounter (with no encounter id, nothing encounter-bound holds)."""
        return replace(self, by_encounter=True, encounter_id=encounter_id)

    def target(self, reference: Any) -> str | None:
        """The ``Type/id`` a Reference names on the context's server, or None when it cannot be known to."""
        ref = reference.get("reference") if isinstance(reference, dict) else None
        if not isinstance(ref, str):
            return None
        if ref.startswith("urn:uuid:"):
            named = self.aliases.get(ref)
        else:
            if "://" in ref:
                ref = self._relative_to_server(ref)
            match = _RELATIVE.fullmatch(ref or "")
            named = f"{match[1]}/{match[2]}" if match else None
        # A ``type`` that contradicts the reference makes it name nothing for sure.
        if named is None or reference.get("type", named.partition("/")[0]) != named.partition("/")[0]:
            return None
        return named

    def _relative_to_server(self, url: str) -> str | None:
        server = _origin_and_path(self.fhir_server) if self.fhir_server else None
        here = _origin_and_path(url)
        if server is None or here is None or here[:3] != server[:3]:
            return None
        base = server[3].rstrip("/") + "/"
        return here[3][len(base) :] if here[3].startswith(base) else None

    def _lives_here(self, full_url: Any, resource: Any) -> bool:
        """Whether a Bundle entry's ``fullUrl`` leaves its resource on the context's server: a ``urn:`` (or none)
        does; an absolute http(s) one only when its base is ``fhirServer``, compared as absolute references are."""
        if not isinstance(full_url, str):
            return True
        if self._server_prefix is not None and full_url.startswith(self._server_prefix):
            named = f"{resource.get('resourceType')}/{resource.get('id')}" if isinstance(resource, dict) else None
            if full_url[len(self._server_prefix) :] == named:
                return True  # the common case, on the hook path: the server's own URL of the resource
        if full_url.partition("://")[0].lower() not in _WEB:
            return True
        rest = self._relative_to_server(full_url)
        return rest is not None and _RELATIVE.fullmatch(rest) is not None

    def _links_to(self, resource: dict[str, Any], paths: tuple[str, ...], kind: str, ident: str | None) -> bool:
        """True when the references at ``paths`` name ``kind/ident`` at least once, and nothing else of ``kind``
        nor anything unknown."""
        if not ident:
            return False
        if len(paths) == 1 and "." not in paths[0]:  # the common case, on the hook path: one plain relative link
            link = resource.get(paths[0])
            if isinstance(link, dict) and link.get("reference") == f"{kind}/{ident}" and link.get("type", kind) == kind:
                return True
        targets = [self.target(r) for r in _references(resource, paths)]
        if any(t is None for t in targets):
            return False
        of_kind = [t for t in targets if t.startswith(kind + "/")]
        return bool(of_kind) and all(t == f"{kind}/{ident}" for t in of_kind)

    def holds(self, resource: Any, full_url: Any = None) -> bool:
        """Whether a service may use this resource (with the ``fullUrl`` of its Bundle entry, if any): it is on the
        context's server, and it is not patient data or it is the context patient's (and, when narrowed, recorded
        in the context encounter)."""
        if full_url is not None and not self._lives_here(full_url, resource):
            return False
        if not isinstance(resource, dict):
            return True
        kind = resource.get("resourceType")
        if not isinstance(kind, str):
            return True  # not a FHIR resource: no service reads it as one
        if kind in _BY_SUBJECT and self._patient_ref and not self.by_encounter:
            subject = resource.get("subject")
            if isinstance(subject, dict) and subject.get("reference") == self._patient_ref and "type" not in subject:
                return True
        if kind == "Patient":
            return bool(self.patient_id) and resource.get("id") == self.patient_id
        links = PATIENT_LINKS.get(kind)
        if links is None:
            return True
        if not self._links_to(resource, links, "Patient", self.patient_id):
            return False
        if not self.by_encounter:
            return True
        if kind == "Encounter":
            return bool(self.encounter_id) and resource.get("id") == self.encounter_id
        links = ENCOUNTER_LINKS.get(kind)
        return links is None or self._links_to(resource, links, "Encounter", self.encounter_id)

    def screen(self, value: Any) -> tuple[Any, int]:
        """A prefetch-shaped value (a resource, a Bundle, or None) without what does not belong, and how many
        resources were left out. A lone resource that does not belong becomes None."""
        if not isinstance(value, dict):
            return value, 0
        if value.get("resourceType") != "Bundle":
            return (value, 0) if self.holds(value) else (None, 1)
        sent = value.get("entry")
        if sent is None:
            return value, 0
        entries = sent if isinstance(sent, list) else []  # entries that are not a list cannot be checked: none used
        kept = [e for e in entries if not isinstance(e, dict) or self.holds(e.get("resource"), e.get("fullUrl"))]
        if entries is sent and len(kept) == len(entries):
            return value, 0
        screened = {k: v for k, v in value.items() if k != "entry"}
        if kept:
            screened["entry"] = kept
        return screened, len(entries) - len(kept)
