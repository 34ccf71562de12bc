"""What a service reads is what its population export asks for: ``_type`` and ``_typeFilter`` from its prefetch."""

from __future__ import annotations

import pytest

from app.batch.scoring import export_scope
from app.cds.service import get_service, load_services


def test_types_and_filters_come_from_the_prefetch_templates():
    types, filters = export_scope(
        [
            "Patient/{{context.patientId}}",
            "Observation?patient={{context.patientId}}&code=http://loinc.org|2093-3&_sort=-date&_count=5",
            "Observation?patient={{context.patientId}}&code=http://loinc.org|2085-9",
            "MedicationRequest?patient={{context.patientId}}&status=active",
        ],
        extra_types=["Medication"],
    )
    assert types == ("Patient", "Observation", "MedicationRequest", "Medication")
    assert filters == (
        "Observation?code=http://loinc.org|2093-3",
        "Observation?code=http://loinc.org|2085-9",
        "MedicationRequest?status=active",
    )


def test_a_type_read_once_without_a_filter_is_exported_whole():
    types, filters = export_scope(
        ["Condition?patient={{context.patientId}}&clinical-status=active", "Condition?patient={{context.patientId}}"]
    )
    assert types == ("Condition",) and filters == ()


def test_a_template_that_needs_an_encounter_cannot_be_batched():
    with pytest.raises(ValueError, match="not batchable"):
        export_scope(["Condition?patient={{context.patientId}}&encounter={{context.encounterId}}"])


def test_the_cardiovascular_risk_service_exports_what_its_hook_prefetches():
    load_services()
    service = get_service("cardiovascular-risk")
    types, filters = service.export_scope
    assert types == ("Patient", "Observation", "Condition", "MedicationRequest")
    assert "Observation?code=http://loinc.org|72166-2" in filters
    assert not any(f.startswith("Condition") for f in filters)
    assert get_service("discharge-summary").population is None
