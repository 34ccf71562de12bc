"""What a CDS service declares to score a population (``@cds_service(..., population=Population(...))``).

The batch hands the service one patient's resources at a time, read from a Bulk Data export, and the service
answers with the same code its hook runs: :class:`Scored` (a probability, its category, the model, the resources
it used, and the action it would propose) or :class:`NotScored` (why not). What to export is derived from the
service's prefetch templates, so the batch reads what the hook reads and nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any
from urllib.parse import parse_qsl, urlencode

# Search parameters that only scope or order a hook's query: a patient-level export does both itself.
_SCOPE_PARAMS = frozenset({"patient", "subject", "_sort", "_count", "_elements", "_summary", "_total"})


@dataclass
class PatientResources:
    """One patient's resources from the export (any types, export order), scored as of ``today``."""

    patient_id: str
    resources: list[dict[str, Any]]
    today: date
    shared: Mapping[str, dict[str, Any]] = field(default_factory=dict)  # Medication etc. by "Type/id"

    def of_type(self, resource_type: str) -> list[dict[str, Any]]:
        return [r for r in self.resources if r.get("resourceType") == resource_type]

    @property
    def patient(self) -> dict[str, Any] | None:
        return next(iter(self.of_type("Patient")), None)


@dataclass(frozen=True)
class Scored:
    """A patient scored: ``probability`` (0..1) in the service's ``category``, by ``model`` ``version``, from the
    resources in ``basis`` ("Type/id"); ``action`` is what the service proposes (the worklist's line), if any."""

    probability: float
    category: str
    model: str
    version: str
    basis: tuple[str, ...] = ()
    action: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class NotScored:
    """A patient not scored: ``reason`` a short stable code (counted in the report), ``message`` for people;
    ``action`` what the service proposes all the same (a statin for clinical ASCVD needs no risk estimate), which
    puts the patient on the worklist."""

    reason: str
    message: str
    action: str | None = None


Outcome = Scored | NotScored
ScoreFunction = Callable[[PatientResources], Outcome]


@dataclass(frozen=True)
class Population:
    """A service's population scoring: ``score`` one patient; the RiskAssessment's ``outcome`` and ``method``
    texts; ``categories`` in report order; ``reasons`` labels the NotScored codes; ``extra_types`` are exported
    although no prefetch template names them (e.g. Medication, which MedicationRequests refer to)."""

    score: ScoreFunction
    outcome: str
    method: str
    categories: tuple[str, ...] = ()
    reasons: Mapping[str, str] = field(default_factory=dict)
    extra_types: tuple[str, ...] = ()


def export_scope(templates: Iterable[str], extra_types: Iterable[str] = ()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``_type`` and ``_typeFilter`` for the resources that prefetch ``templates`` read.

    ``Patient/{{context.patientId}}`` reads Patient; ``Observation?patient=...&code=a,b&_sort=-date`` reads
    Observations filtered by ``code=a,b``. A type read once without a filter is exported whole (filters for one
    type are alternatives: any one of them selects a resource). Templates that need more context than the
    patient (an encounter) cannot be run over a population: ValueError.
    """
    filters: dict[str, list[str] | None] = {}
    for template in templates:
        path, _, query = template.partition("?")
        resource_type = path.split("/", 1)[0]
        params = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k not in _SCOPE_PARAMS]
        if "{{" in path.replace("{{context.patientId}}", "") or any("{{" in v for _, v in params):
            raise ValueError(f"prefetch template {template!r} needs more than the patient: not batchable")
        if "/" in path or not params:
            filters[resource_type] = None
        elif filters.get(resource_type, []) is not None:
            found = filters.setdefault(resource_type, [])
            search = f"{resource_type}?{urlencode(params, safe=',|:/')}"
            if search not in found:
                found.append(search)
    for resource_type in extra_types:
        filters[resource_type] = None
    types = tuple(filters)
    return types, tuple(f for found in filters.values() if found for f in found)
