"""What a hook reads stays on the request's FHIR server, against the real FHIR test server behind a recording
proxy: next links elsewhere on the same origin (another tenant, a ``..;`` climb) are never requested, a search
note is an answer, entries whose ``fullUrl`` is on another server are not used, and lone surrogates are refused."""

from __future__ import annotations

import copy
import json

import pytest

from app.fhir.client import Client, FhirError, pooled_session
from tests.conftest import PUBLIC_BASE_URL
from tests.support.http_servers import FhirProxy

SERVICE = "/cds-services/cardiovascular-risk"
FIXTURE_SERVER = "http://localhost:8081/fhir"  # the fixture's fhirServer, and the base of its entries' fullUrls
A = "gw-test-patient-1"


@pytest.fixture
def proxy(fhir_server):
    """The FHIR test server behind a proxy at ``{proxy.url}/fhir/R4`` that records every path asked for."""
    with FhirProxy(fhir_server.base_url) as running:
        running.paths = []
        running.before = lambda _method, path: running.paths.append(path)
        yield running


@pytest.fixture
def call(make_app, signing_key):
    app = make_app()

    def invoke(body: dict):
        token = signing_key.token(PUBLIC_BASE_URL + SERVICE)
        return app.test_client().post(
            SERVICE,
            data=json.dumps(body),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )

    return invoke


def on_server(hook_body: dict, base: str) -> dict:
    """The fixture's request with ``base`` as its fhirServer, its entries' fullUrls moved there, and a token."""
    body = json.loads(json.dumps(hook_body).replace(FIXTURE_SERVER, base))
    body["fhirAuthorization"] = {
        "access_token": "hook-token",
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/Condition.rs",
        "subject": "cds-service",
    }
    return body


@pytest.mark.parametrize(
    "next_path",
    [
        "/tenantB/fhir/Condition?patient=gw-test-patient-1&page=2",  # another tenant on the same origin
        "/fhir/R4/..;/admin/Condition?page=2",  # Tomcat reads "..;" as ".."
        "/fhir/R4/%2e%2e;/admin?page=2",
        "/fhir/R4/%252e%252e/admin?page=2",
    ],
)
def test_a_next_link_outside_the_fhir_server_is_not_requested_and_the_sent_page_is_used(
    proxy, call, hook_body, audit_records, next_path
):
    body = on_server(hook_body, f"{proxy.url}/fhir/R4")
    body["prefetch"]["conditions"]["link"] = [{"relation": "next", "url": proxy.url + next_path}]

    response = call(body)

    assert response.status_code == 200
    card = response.get_json()["cards"][0]
    assert "not calculated" not in card["summary"]
    assert "Conditions" in card["detail"] and "may be incomplete" in card["detail"]
    assert proxy.paths == []
    (record,) = audit_records("hook")
    assert record["prefetch_incomplete"] == ["conditions"]


def test_a_search_whose_only_entry_is_a_note_is_an_empty_answer_not_a_failure(proxy, call, hook_body, audit_records):
    body = on_server(hook_body, f"{proxy.url}/fhir/R4")
    body["prefetch"]["conditions"] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 0,
        "entry": [
            {
                "resource": {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "information", "code": "informational", "diagnostics": "no matches"}],
                },
                "search": {"mode": "outcome"},
            }
        ],
    }

    response = call(body)

    card = response.get_json()["cards"][0]
    assert "not calculated" not in card["summary"]
    assert "| Diabetes | no |  |" in card["detail"] and "may be incomplete" not in card["detail"]
    assert proxy.paths == []  # not fetched again: the client's answer stands
    assert audit_records("fhir.fetch") == []


def test_entries_whose_full_url_is_on_another_server_are_not_used_and_are_counted(
    fhir_server, call, hook_body, audit_records, tmp_path
):
    body = on_server(hook_body, fhir_server.base_url)
    newest = copy.deepcopy(body["prefetch"]["totalCholesterol"]["entry"][0]["resource"])
    newest.update(id="attacker-1", effectiveDateTime="2026-07-01T09:00:00Z")
    newest["valueQuantity"]["value"] = 287  # subject: the relative Patient/<A>, as on A's own observations
    body["prefetch"]["totalCholesterol"]["entry"].append(
        {"fullUrl": "http://evil.example/fhir/Observation/attacker-1", "resource": newest}
    )
    body["prefetch"]["conditions"]["entry"].append(
        {
            "fullUrl": f"http://evil.example/fhir/Patient/{A}",
            "resource": {"resourceType": "Patient", "id": A, "birthDate": "1930-01-01"},
        }
    )

    response = call(body)

    card = response.get_json()["cards"][0]
    assert "| Total cholesterol | 213 mg/dL | 2026-06-02 |" in card["detail"] and "287" not in card["detail"]
    (record,) = audit_records("hook")
    assert record["prefetch_dropped_by_key"] == {"totalCholesterol": 1, "conditions": 1}
    assert "evil.example" not in (tmp_path / "audit.jsonl").read_text()


def test_the_fhir_servers_own_search_answers_pass_the_screen(fhir_server, call, hook_body, audit_records):
    """The real server's fullUrls (absolute, on its base) are the common case: every entry is kept."""
    fhir_server.put(
        [{"resourceType": "Patient", "id": A}, *[e["resource"] for e in hook_body["prefetch"]["hdl"]["entry"]]]
    )
    body = on_server(hook_body, fhir_server.base_url)
    body["prefetch"]["hdl"] = fhir_server.get_json("Observation", {"patient": A, "code": "2085-9"})
    assert all(e["fullUrl"].startswith(fhir_server.base_url + "/") for e in body["prefetch"]["hdl"]["entry"])

    call(body)

    (record,) = audit_records("hook")
    assert record["prefetch_dropped"] == 0


def test_the_discharge_jobs_paging_never_follows_a_climb_out_of_the_base(proxy):
    """``Client.complete_bundle(..., allow_url=client.holds)``, as the discharge-summary job pages its searches."""
    session = pooled_session()
    client = Client(f"{proxy.url}/fhir/R4", "job-token", session)
    page = {"resourceType": "Bundle", "link": [{"relation": "next", "url": f"{proxy.url}/fhir/R4/..;/admin"}]}
    try:
        with pytest.raises(FhirError, match="outside the allowed FHIR server"):
            client.complete_bundle(page, allow_url=client.holds)
    finally:
        session.close()
    assert proxy.paths == []


def test_a_lone_surrogate_from_the_fhir_server_is_refused_by_name(fhir_server):
    body = '{"resourceType":"Patient","id":"lone-surrogate","name":[{"text":"Ann \\ud800"}]}'
    fhir_server.session.put(
        f"{fhir_server.base_url}/Patient/lone-surrogate",
        data=body.encode(),
        headers={"Content-Type": "application/fhir+json"},
        timeout=10,
    ).raise_for_status()
    session = pooled_session()
    try:
        with pytest.raises(FhirError, match="lone surrogate"):
            Client(fhir_server.base_url, None, session).get("Patient/lone-surrogate")
    finally:
        session.close()


def test_a_hook_request_with_a_lone_surrogate_is_refused_with_400_not_a_broken_card(call, hook_body):
    text = json.dumps(hook_body).replace('"Essential hypertension"', '"Essential hypertension \\ud800"')
    assert "\\ud800" in text  # a condition's text, which the card would show

    response = call(json.loads(text))

    assert response.status_code == 400
    assert "surrogate" in response.get_data(as_text=True)


def test_what_the_service_reads_behind_a_proxy_is_used_whatever_base_the_server_prints(
    proxy, fhir_server, call, hook_body, audit_records
):
    """A server behind a proxy prints its own (internal) base in fullUrl: our own read of it is its answer."""
    fhir_server.put(
        [{"resourceType": "Patient", "id": A}, *[e["resource"] for e in hook_body["prefetch"]["hdl"]["entry"]]]
    )
    base = proxy.url + "/fhir/R4"
    body = on_server(hook_body, base)
    del body["prefetch"]["hdl"]  # fetched by the service through the proxy
    answer = fhir_server.get_json("Observation", {"patient": A, "code": "2085-9"})
    assert answer["entry"] and not answer["entry"][0]["fullUrl"].startswith(base)  # the server's own base

    call(body)

    (record,) = audit_records("hook")
    assert record["prefetch_dropped"] == 0 and any("Observation" in p for p in proxy.paths)


def test_a_next_link_to_a_stored_bundle_cannot_bring_in_another_servers_patient(
    fhir_server, call, hook_body, audit_records
):
    """A client's next link may name any URL under fhirServer, such as a stored collection of another hospital's
    resources whose relative Patient/<A> is that hospital's patient: only search answers are pages."""
    foreign = {
        "resourceType": "Condition",
        "id": "x-diab",
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}], "text": "Type 2 diabetes X"},
        "subject": {"reference": f"Patient/{A}"},
    }
    entry = {"fullUrl": "http://other-hospital.example/fhir/Condition/x-diab", "resource": foreign}
    fhir_server.put([{"resourceType": "Bundle", "id": "laundered", "type": "collection", "entry": [entry]}])
    body = on_server(hook_body, fhir_server.base_url)
    body["prefetch"]["conditions"] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": [{"relation": "next", "url": f"{fhir_server.base_url}/Bundle/laundered"}],
    }

    card = call(body).get_json()["cards"][0]

    assert "Type 2 diabetes X" not in card["detail"] and "with diabetes" not in card["summary"]
    assert "may be incomplete" in card["detail"]  # the link was not a search's next page
    (record,) = audit_records("hook")
    assert record["prefetch_incomplete"] == ["conditions"]
