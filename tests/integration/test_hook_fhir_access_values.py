"""fhirServer and fhirAuthorization values that could never be used are refused at the door (400 naming the
member), not accepted and then failing in a job's retries or in every prefetch fetch; what CDS Hooks 2.0 allows
still passes."""

from __future__ import annotations

import uuid

import pytest

from app.jobs import ledger
from tests.conftest import LOCAL_BASE_URL

SERVICE = "/cds-services/discharge-summary"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjZHMifQ.c2lnbmF0dXJl-_~+/=="


@pytest.fixture
def app(make_app):
    return make_app(PUBLIC_BASE_URL=LOCAL_BASE_URL, FHIR_ALLOW_ANONYMOUS=True)


def post(app, signing_key, fhir_server: str = "http://127.0.0.1:9/fhir/R4", **authorization):
    body = {
        "hookInstance": str(uuid.uuid4()),
        "hook": "encounter-discharge",
        "fhirServer": fhir_server,
        "context": {"userId": "Practitioner/dr-1", "patientId": "pat-1", "encounterId": "enc-1"},
    }
    if authorization:
        body["fhirAuthorization"] = {
            "access_token": TOKEN,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/Encounter.r patient/Condition.rs",
            "subject": "cds-service",
            **authorization,
        }
    token = signing_key.token(LOCAL_BASE_URL + SERVICE)
    return app.test_client().post(SERVICE, json=body, headers={"Authorization": f"Bearer {token}"})


def refused(response, member: str) -> str:
    assert response.status_code == 400, response.get_data(as_text=True)
    (issue,) = response.get_json()["issue"]
    assert issue["expression"] == [member]
    return issue["diagnostics"]


@pytest.mark.parametrize(
    "server",
    [
        "http://127.0.0.1:9/fhir?x=\u00e9#frag",
        "http://127.0.0.1:9/fhir?",
        "http://127.0.0.1:9/fhir#",
        "http://127.0.0.1:9/fhir/R4?_format=json",
        "http://127.0.0.1:99999/fhir",
        "http://127.0.0.1:0/fhir",
    ],
)
def test_a_fhir_server_with_a_query_fragment_or_bad_port_is_refused_and_makes_no_job(app, signing_key, server):
    assert "without a query or fragment" in refused(post(app, signing_key, server), "fhirServer")
    assert sum(ledger.counts(app.extensions["db"]).values()) == 0


@pytest.mark.parametrize("access_token", ["\u20ac", "abc def", "tok\u00e9n", "a=b", "=abc", "tok\nen", '"quoted"'])
def test_an_access_token_that_cannot_travel_in_a_header_is_refused(app, signing_key, access_token):
    diagnostics = refused(post(app, signing_key, access_token=access_token), "fhirAuthorization.access_token")
    assert access_token not in diagnostics


@pytest.mark.parametrize(
    ("member", "value"),
    [
        ("expires_in", 300.5),
        ("expires_in", -1),
        ("expires_in", "300"),
        ("scope", "patient/Encounter.r\tpatient/Condition.rs"),
        ("scope", "patient/\u00c9ncounter.r"),
        ("patient", "../Patient/1"),
        ("token_type", "MAC"),
    ],
    ids=repr,
)
def test_authorization_members_outside_cds_hooks_2_are_refused_naming_them(app, signing_key, member, value):
    refused(post(app, signing_key, **{member: value}), f"fhirAuthorization.{member}")


@pytest.mark.parametrize(
    "changes",
    [{}, {"expires_in": 300.0}, {"expires_in": 0}, {"token_type": "bearer"}, {"patient": "pat-1"}],
    ids=repr,
)
def test_what_cds_hooks_2_allows_is_accepted(app, signing_key, changes):
    response = post(app, signing_key, **changes)
    assert response.status_code == 200, response.get_data(as_text=True)
