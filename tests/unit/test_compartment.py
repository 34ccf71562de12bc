"""Whether a resource belongs to the patient (and encounter) in context; the framework screening prefetch by it."""

from __future__ import annotations

import pytest

from app.cds.request import HookRequest
from app.cds.service import PrefetchKey, ServiceCall
from app.fhir.compartment import PATIENT_LINKS, Compartment, bundle_aliases

SERVER = "https://ehr.example.org/fhir/R4"
A = Compartment("A", SERVER)


def observation(subject=None, encounter=None, oid="o1", **extra):
    resource = {"resourceType": "Observation", "id": oid, "status": "final", **extra}
    if subject is not None:
        resource["subject"] = subject if isinstance(subject, dict) else {"reference": subject}
    if encounter is not None:
        resource["encounter"] = {"reference": encounter}
    return resource


# ---- the rule -------------------------------------------------------------------------------------------------


def test_a_patient_belongs_only_when_its_id_is_the_context_patient():
    assert A.holds({"resourceType": "Patient", "id": "A"})
    assert not A.holds({"resourceType": "Patient", "id": "B"})
    assert not A.holds({"resourceType": "Patient"})
    assert not Compartment(None, SERVER).holds({"resourceType": "Patient", "id": "A"})


@pytest.mark.parametrize(
    "reference",
    [
        "Patient/A",
        "Patient/A/_history/2",
        f"{SERVER}/Patient/A",
        f"{SERVER}/Patient/A/_history/7",
        "HTTPS://EHR.example.org:443/fhir/R4/Patient/A",
    ],
)
def test_a_reference_to_the_context_patient_belongs(reference):
    assert A.holds(observation(reference))


@pytest.mark.parametrize(
    "reference",
    [
        "Patient/B",
        "Patient/B/_history/2",
        f"{SERVER}/Patient/B",
        "https://elsewhere.example.org/fhir/R4/Patient/A",  # the same id on another server is another patient
        "https://ehr.example.org/other/Patient/A",  # another base on the same host
        "http://ehr.example.org/fhir/R4/Patient/A",  # another scheme
        f"{SERVER}/Patient/A?x=1",
        "#p1",  # a contained patient is not the patient in context
        "Group/A",
        "Patient/A/extra",
        "patient/A",
        "urn:uuid:9d1a1bd0-7c3b-4b5b-9c1b-0f7a7f2b9d11",  # no bundle entry names it
        "",
    ],
)
def test_a_reference_to_anyone_or_anything_else_does_not_belong(reference):
    assert not A.holds(observation(reference))


def test_a_resource_without_a_patient_link_does_not_belong():
    assert not A.holds(observation())
    assert not A.holds(observation({"display": "Patient A"}))
    assert not A.holds(observation({"identifier": {"system": "urn:mrn", "value": "A"}}))
    assert not A.holds(observation(["Patient/A"]))


def test_an_absolute_reference_cannot_be_checked_without_a_fhir_server():
    assert not Compartment("A", None).holds(observation(f"{SERVER}/Patient/A"))
    assert Compartment("A", None).holds(observation("Patient/A"))


def test_a_urn_uuid_reference_belongs_when_a_bundle_entry_gives_it_to_the_context_patient():
    bundle = {
        "resourceType": "Bundle",
        "entry": [
            {"fullUrl": "urn:uuid:aaa", "resource": {"resourceType": "Patient", "id": "A"}},
            {"fullUrl": "urn:uuid:bbb", "resource": {"resourceType": "Patient", "id": "B"}},
        ],
    }
    compartment = Compartment("A", SERVER, bundle_aliases([bundle]))
    assert compartment.holds(observation("urn:uuid:aaa"))
    assert not compartment.holds(observation("urn:uuid:bbb"))
    assert not compartment.holds(observation("urn:uuid:ccc"))


def test_a_urn_uuid_that_two_entries_claim_for_different_resources_names_nobody():
    bundles = [
        {
            "resourceType": "Bundle",
            "entry": [{"fullUrl": "urn:uuid:x", "resource": {"resourceType": "Patient", "id": i}}],
        }
        for i in ("A", "B")
    ]
    assert not Compartment("A", SERVER, bundle_aliases(bundles)).holds(observation("urn:uuid:x"))


@pytest.mark.parametrize(
    ("resource", "belongs"),
    [
        ({"resourceType": "Condition", "subject": {"reference": "Patient/A"}}, True),
        ({"resourceType": "Condition", "subject": {"reference": "Patient/B"}}, False),
        ({"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/A"}}, True),
        ({"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/B"}}, False),
        ({"resourceType": "Coverage", "beneficiary": {"reference": "Patient/A"}}, True),
        ({"resourceType": "Task", "for": {"reference": "Patient/B"}}, False),
        # the performer is not whose data it is: A performing B's observation does not make it A's
        (observation("Patient/B", performer=[{"reference": "Patient/A"}]), False),
        # several patient links: every one must be the context patient
        (
            {
                "resourceType": "Appointment",
                "participant": [{"actor": {"reference": "Patient/A"}}, {"actor": {"reference": "Practitioner/1"}}],
            },
            True,
        ),
        (
            {
                "resourceType": "Appointment",
                "participant": [{"actor": {"reference": "Patient/A"}}, {"actor": {"reference": "Patient/B"}}],
            },
            False,
        ),
    ],
    ids=lambda v: v if isinstance(v, bool) else v["resourceType"],
)
def test_the_patient_link_is_the_one_the_r4_patient_compartment_names(resource, belongs):
    assert A.holds(resource) is belongs


@pytest.mark.parametrize(
    "resource_type", ["Medication", "Practitioner", "Organization", "Location", "OperationOutcome", "Substance"]
)
def test_resources_that_are_not_patient_data_pass(resource_type):
    assert A.holds({"resourceType": resource_type, "id": "x"})
    assert resource_type not in PATIENT_LINKS


def test_a_malformed_resource_never_raises():
    for garbage in (None, 3, "x", [], {"resourceType": ["Observation"]}, observation({"reference": 5})):
        A.holds(garbage)
    assert not A.holds(observation({"reference": ["Patient/A"]}))


def test_by_encounter_a_resource_must_also_name_the_context_encounter():
    encounter = A.of_encounter("E1")
    assert encounter.holds(observation("Patient/A", "Encounter/E1"))
    assert encounter.holds(observation("Patient/A", f"{SERVER}/Encounter/E1/_history/3"))
    assert not encounter.holds(observation("Patient/A", "Encounter/E2"))
    assert not encounter.holds(observation("Patient/A"))  # an observation recorded in no encounter
    assert not encounter.holds(observation("Patient/B", "Encounter/E1"))
    assert A.holds(observation("Patient/A", "Encounter/E2"))  # not narrowed: any encounter of A


def test_by_encounter_the_encounter_itself_must_be_the_context_encounter_of_the_context_patient():
    encounter = A.of_encounter("E1")
    assert encounter.holds({"resourceType": "Encounter", "id": "E1", "subject": {"reference": "Patient/A"}})
    assert not encounter.holds({"resourceType": "Encounter", "id": "E2", "subject": {"reference": "Patient/A"}})
    assert not encounter.holds({"resourceType": "Encounter", "id": "E1", "subject": {"reference": "Patient/B"}})
    assert not A.of_encounter(None).holds(observation("Patient/A", "Encounter/E1"))


def test_by_encounter_types_without_an_encounter_link_keep_the_patient_rule():
    encounter = A.of_encounter("E1")
    assert encounter.holds({"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/A"}})
    assert encounter.holds({"resourceType": "Patient", "id": "A"})
    assert encounter.holds({"resourceType": "Medication", "id": "m"})


def test_screen_drops_entries_that_do_not_belong_and_counts_them():
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 3,
        "entry": [
            {"resource": observation("Patient/A", oid="a")},
            {"resource": observation("Patient/B", oid="b")},
            {"resource": {"resourceType": "OperationOutcome", "issue": []}},
            {"resource": {"resourceType": "Medication", "id": "m"}},
            {"search": {"mode": "match"}},
        ],
    }
    screened, dropped = A.screen(bundle)
    assert dropped == 1
    assert [e.get("resource", {}).get("id") for e in screened["entry"]] == ["a", None, "m", None]
    assert screened["total"] == 3 and screened["type"] == "searchset"
    assert len(bundle["entry"]) == 5  # the request's own value is not changed


def test_screen_keeps_a_value_that_holds_only_what_belongs_as_it_is():
    bundle = {"resourceType": "Bundle", "entry": [{"resource": observation("Patient/A")}]}
    assert A.screen(bundle) == (bundle, 0)
    assert A.screen(None) == (None, 0)


def test_screen_turns_a_lone_resource_that_does_not_belong_into_none():
    assert A.screen({"resourceType": "Patient", "id": "B"}) == (None, 1)


# ---- the framework: a ServiceCall only ever holds what belongs -------------------------------------------------


def call(prefetch, context=None, fhir_server=SERVER, encounter_keys=frozenset()):
    request = HookRequest(
        hook="patient-view",
        hook_instance="0b8f9a3e-2b5c-4a53-9d3c-3c0c6a3a6f10",
        context=context or {"userId": "Practitioner/d1", "patientId": "A"},
        fhir_server=fhir_server,
        prefetch=prefetch,
    )
    return ServiceCall(request=request, prefetch=prefetch, encounter_keys=encounter_keys)


def searchset(*resources):
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def test_a_service_call_never_shows_a_service_another_patients_resources():
    prefetch = {
        "patient": {"resourceType": "Patient", "id": "B"},
        "labs": searchset(observation("Patient/A", oid="a"), observation("Patient/B", oid="b")),
    }
    made = call(prefetch)
    assert made.resources("patient") == []
    assert [r["id"] for r in made.resources("labs")] == ["a"]
    assert made.prefetch["patient"] is None
    assert [e["resource"]["id"] for e in made.request.prefetch["labs"]["entry"]] == ["a"]
    assert made.dropped == {"patient": 1, "labs": 1}


def test_a_service_call_narrows_encounter_scoped_keys_to_the_context_encounter():
    context = {"userId": "Practitioner/d1", "patientId": "A", "encounterId": "E1"}
    labs = searchset(observation("Patient/A", "Encounter/E1", oid="here"), observation("Patient/A", "Encounter/E2"))
    made = call({"visit": labs, "all": labs}, context=context, encounter_keys=frozenset({"visit"}))
    assert [r["id"] for r in made.resources("visit")] == ["here"]
    assert len(made.resources("all")) == 2
    assert made.dropped == {"visit": 1}


def test_prefetch_keys_know_whether_they_read_one_encounter():
    assert PrefetchKey("Condition?patient={{context.patientId}}&encounter={{ context.encounterId }}").encounter_scoped
    assert not PrefetchKey("Condition?patient={{context.patientId}}").encounter_scoped
