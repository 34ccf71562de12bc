"""Where a Bundle entry's resource lives (its ``fullUrl``), and references whose ``type`` contradicts them: neither
may bring another server's or another kind of data into a card (issue 9 item 2)."""

from __future__ import annotations

import pytest

from app.cds.prefetch import screen
from app.cds.request import HookRequest
from app.fhir.compartment import Compartment, entry_base, shared_base

SERVER = "https://ehr.example.org/fhir/R4"
EVIL = "http://evil.example/fhir"
A = Compartment("A", SERVER)


def observation(subject="Patient/A", oid="o1"):
    return {"resourceType": "Observation", "id": oid, "status": "final", "subject": {"reference": subject}}


def searchset(*entries):
    return {"resourceType": "Bundle", "type": "searchset", "entry": list(entries)}


def request(fhir_server=SERVER):
    return HookRequest(
        hook="patient-view",
        hook_instance="0b8f9a3e-2b5c-4a53-9d3c-3c0c6a3a6f10",
        context={"userId": "Practitioner/d1", "patientId": "A"},
        fhir_server=fhir_server,
        prefetch={},
    )


@pytest.mark.parametrize(
    "full_url",
    [
        f"{EVIL}/Observation/attacker-1",
        "https://ehr.example.org/fhir/R5/Observation/o1",  # another base on the context's host
        "http://ehr.example.org/fhir/R4/Observation/o1",  # another scheme
        f"{SERVER}/Observation/o1?x=1",
        f"{SERVER}/Observation",  # not Type/id: no base can be told
        f"{SERVER}/x/../Observation/o1",
    ],
)
def test_an_entry_from_another_server_is_not_used_even_when_its_relative_subject_is_the_context_patient(full_url):
    assert not A.holds(observation(), full_url)
    screened, dropped = A.screen(searchset({"fullUrl": full_url, "resource": observation()}))
    assert dropped == 1 and "entry" not in screened


def test_a_patient_entry_from_another_server_is_not_the_context_patient():
    entry = {"fullUrl": f"{EVIL}/Patient/A", "resource": {"resourceType": "Patient", "id": "A"}}
    assert A.screen(searchset(entry))[1] == 1


@pytest.mark.parametrize(
    "full_url",
    [
        None,
        f"{SERVER}/Observation/o1",
        f"{SERVER}/Observation/o1/_history/2",
        "HTTPS://EHR.example.org:443/fhir/R4/Observation/o1",
        "urn:uuid:9d1a1bd0-7c3b-4b5b-9c1b-0f7a7f2b9d11",
    ],
)
def test_an_entry_on_the_context_server_or_inside_the_bundle_is_used(full_url):
    assert A.holds(observation(), full_url)
    bundle = searchset({"fullUrl": full_url, "resource": observation()})
    assert A.screen(bundle) == (bundle, 0)


def test_without_a_fhir_server_entries_are_used_when_every_absolute_full_url_names_one_server():
    agreeing = {
        "labs": searchset(
            {"fullUrl": f"{EVIL}/Observation/1", "resource": observation(oid="1")},
            {"fullUrl": f"{EVIL}/Observation/2", "resource": observation(f"{EVIL}/Patient/A", oid="2")},
        )
    }
    assert screen(agreeing, request(None)) == (agreeing, {})


def test_without_a_fhir_server_entries_of_two_servers_are_not_used():
    mixed = {
        "labs": searchset(
            {"fullUrl": f"{SERVER}/Observation/1", "resource": observation(oid="1")},
            {"resource": observation(oid="2")},
        ),
        "more": searchset({"fullUrl": f"{EVIL}/Observation/3", "resource": observation(oid="3")}),
    }
    screened, dropped = screen(mixed, request(None))
    assert [e["resource"]["id"] for e in screened["labs"]["entry"]] == ["2"]
    assert dropped == {"labs": 1, "more": 1}


def test_the_hook_screens_entries_against_the_requests_fhir_server():
    prefetch = {"labs": searchset({"fullUrl": f"{EVIL}/Observation/1", "resource": observation()})}
    assert screen(prefetch, request())[1] == {"labs": 1}


@pytest.mark.parametrize(
    ("full_url", "base"),
    [
        (f"{SERVER}/Observation/o1", SERVER),
        (f"{SERVER}/Observation/o1/_history/3", SERVER),
        ("urn:uuid:9d1a1bd0-7c3b-4b5b-9c1b-0f7a7f2b9d11", None),
        (f"{SERVER}/Observation", None),
        (f"{SERVER}/Observation/o1/extra", None),
    ],
)
def test_an_entry_base_is_the_full_url_without_type_and_id(full_url, base):
    assert entry_base(full_url) == base


def test_the_shared_base_is_none_when_full_urls_disagree_or_are_malformed():
    one = searchset({"fullUrl": f"{SERVER}/Patient/A"}, {"fullUrl": "urn:uuid:x"}, {})
    assert shared_base([one, None]) == SERVER
    assert shared_base([one, searchset({"fullUrl": f"{EVIL}/Patient/A"})]) is None
    assert shared_base([one, searchset({"fullUrl": f"{SERVER}/Patient"})]) is None
    assert shared_base([searchset({"fullUrl": "urn:uuid:x"})]) is None


@pytest.mark.parametrize("kind", ["Group", "Practitioner", "", 5])
def test_a_reference_whose_type_contradicts_it_names_nobody(kind):
    subject = {"reference": "Patient/A", "type": kind}
    assert not A.holds({"resourceType": "Observation", "subject": subject})
    assert not A.holds({"resourceType": "AllergyIntolerance", "patient": subject})
    assert not A.of_encounter("E1").holds(
        {**observation(), "encounter": {"reference": "Encounter/E1", "type": "EpisodeOfCare"}}
    )


def test_a_type_that_agrees_and_an_identifier_beside_the_reference_are_kept():
    agreeing = {"reference": "Patient/A", "type": "Patient"}
    assert A.holds({"resourceType": "Observation", "subject": agreeing})
    assert A.holds({"resourceType": "AllergyIntolerance", "patient": agreeing})
    # An identifier cannot be checked without reading the Patient: the reference decides.
    with_identifier = {"reference": "Patient/A", "identifier": {"system": "urn:mrn", "value": "B-123"}}
    assert A.holds({"resourceType": "Observation", "subject": with_identifier})


def test_an_answer_whose_full_urls_name_several_servers_keeps_them_to_be_checked():
    from app.fhir.compartment import as_read_from

    one = {"fullUrl": "http://a.example/fhir/Condition/1", "resource": {"resourceType": "Condition", "id": "1"}}
    two = {"fullUrl": "http://b.example/fhir/Condition/2", "resource": {"resourceType": "Condition", "id": "2"}}
    same = {"fullUrl": "http://a.example/fhir/Condition/3", "resource": {"resourceType": "Condition", "id": "3"}}
    mixed = {"resourceType": "Bundle", "type": "searchset", "entry": [one, two]}
    assert as_read_from(mixed) == mixed  # a facade over several servers: each entry's server is checked
    single = as_read_from({"resourceType": "Bundle", "type": "searchset", "entry": [one, same]})
    assert [e.get("fullUrl") for e in single["entry"]] == [None, None]  # one server's answer: its own
