"""What a card's suggestion proposes: draft FHIR resources that the clinician reviews, turns into orders and signs.

A decision-support service proposes, it cannot order: a proposed MedicationRequest has intent ``proposal`` and
status ``draft``, and reaches the EHR only through a suggestion the clinician accepts (a ``create`` action).

Usage: ``suggest_creating(label, description, medication_proposal(patient_id, ATORVASTATIN_20, reason))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.cds.cards import Action, Coding, Suggestion
from app.fhir.codes import RXNORM, SNOMED, UCUM

# Why a clinician declines a proposal (CDS Hooks 2.0 card.overrideReasons, R-23): one small code set for the
# product, so that feedback (app.cds.feedback stores overrideReason.reason) can be counted across services.
OVERRIDE_REASON_SYSTEM = "urn:clinical-ai-gateway:cds:override-reason"
OVERRIDE_REASONS = (
    ("patient-declines", "Patient declines"),
    ("intolerance-or-contraindication", "Intolerance or contraindication"),
    ("treated-elsewhere", "Already treated elsewhere"),
    ("not-appropriate-now", "Not appropriate now"),
    ("other", "Other"),
)


def override_reasons() -> list[Coding]:
    """The product's override reasons as Codings with system, code and display, for a card with a suggestion."""
    return [Coding(system=OVERRIDE_REASON_SYSTEM, code=code, display=display) for code, display in OVERRIDE_REASONS]


@dataclass(frozen=True)
class Route:
    """A route of administration: its SNOMED CT code and display, and how the dosage text says it."""

    code: str
    display: str
    words: str


@dataclass(frozen=True)
class Frequency:
    """How often a dose is taken (``times`` per ``period`` ``period_unit``, a UCUM time unit), and in words."""

    times: int
    period: int
    period_unit: str
    words: str


ORAL = Route("26643006", "Oral route", "by mouth")
ONCE_DAILY = Frequency(1, 1, "d", "once daily")


@dataclass(frozen=True)
class ProposedMedication:
    """A drug to propose: its RxNorm code and display, and one dose (``dose`` ``dose_unit``, UCUM) by ``route``
    at ``frequency``."""

    rxnorm: str
    display: str
    dose: int | float
    dose_unit: str = "mg"
    route: Route = ORAL
    frequency: Frequency = ONCE_DAILY

    @property
    def dosage_text(self) -> str:
        """The dosage in words: ``20 mg by mouth once daily``."""
        return f"{self.dose:g} {self.dose_unit} {self.route.words} {self.frequency.words}"


def medication_proposal(patient_id: str, medication: ProposedMedication, reason: str) -> dict[str, Any]:
    """A draft MedicationRequest (intent ``proposal``) of ``medication`` for the patient, with ``reason`` as its
    reason text; the clinician who accepts it turns it into an order in the EHR and signs it."""
    frequency = medication.frequency
    return {
        "resourceType": "MedicationRequest",
        "status": "draft",
        "intent": "proposal",
        "subject": {"reference": f"Patient/{patient_id}"},
        "medicationCodeableConcept": {
            "coding": [{"system": RXNORM, "code": medication.rxnorm, "display": medication.display}],
            "text": medication.display,
        },
        "reasonCode": [{"text": reason}],
        "dosageInstruction": [
            {
                "text": medication.dosage_text,
                "timing": {
                    "repeat": {
                        "frequency": frequency.times,
                        "period": frequency.period,
                        "periodUnit": frequency.period_unit,
                    }
                },
                "route": {
                    "coding": [{"system": SNOMED, "code": medication.route.code, "display": medication.route.display}]
                },
                "doseAndRate": [
                    {
                        "doseQuantity": {
                            "value": medication.dose,
                            "unit": medication.dose_unit,
                            "system": UCUM,
                            "code": medication.dose_unit,
                        }
                    }
                ],
            }
        ],
    }


def suggest_creating(label: str, description: str, resource: dict[str, Any], recommended: bool = True) -> Suggestion:
    """A suggestion whose one action creates ``resource`` (a draft the clinician reviews)."""
    action = Action(type="create", description=description, resource=resource)
    return Suggestion(label=label, actions=[action], isRecommended=recommended)
