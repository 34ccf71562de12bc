"""The CDS framework itself, through toy services and the real app: declaration, discovery, prefetch sent and
fetched, a card function that raises, a fallback that raises, no fallback, and a service's own budget."""

from __future__ import annotations

import json

import pytest

from app.cds import service as service_registry
from app.clock import SystemClock
from tests.conftest import PUBLIC_BASE_URL
from tests.support import toy_services as toy
from tests.support.clock import FakeClock
from tests.support.fault_server import FaultModelServer

PATIENT_ID = "toy-patient-1"
PATIENT = {"resourceType": "Patient", "id": PATIENT_ID, "name": [{"family": "Fetched"}]}
SENT_PATIENT = {"resourceType": "Patient", "id": PATIENT_ID, "name": [{"family": "Sent"}]}


@pytest.fixture
def toys():
    service_registry.load_services()  # the real services first, as the app would: the registry to restore
    before = dict(service_registry._REGISTRY)
    with toy.declared():
        yield
    assert before == service_registry._REGISTRY, "the toy services were not removed"


@pytest.fixture
def app(make_app, toys):
    return make_app()


@pytest.fixture
def call(signing_key):
    def invoke(app, service_id: str, body: dict):
        path = f"/cds-services/{service_id}"
        token = signing_key.token(PUBLIC_BASE_URL + path)
        return app.test_client().post(
            path,
            data=json.dumps(body),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )

    return invoke


def hook_body(fhir_server: str | None = None, prefetch: dict | None = None) -> dict:
    body: dict = {
        "hook": "patient-view",
        "hookInstance": "0b6e3f0e-7f53-4b1e-9a57-5f2d9d7a1c11",
        "context": {"userId": "Practitioner/toy", "patientId": PATIENT_ID},
    }
    if fhir_server:
        body["fhirServer"] = fhir_server
        body["fhirAuthorization"] = {
            "access_token": "toy-token-123",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/Patient.read",
            "subject": "cds-service",
        }
    if prefetch is not None:
        body["prefetch"] = prefetch
    return body


def only_card(response) -> dict:
    assert response.status_code == 200, response.get_data(as_text=True)
    (card,) = response.get_json()["cards"]
    return card


def outcome(audit_records) -> str:
    return audit_records("hook")[-1]["outcome"]


def test_discovery_lists_the_toy_service_with_its_prefetch(app, signing_key):
    token = signing_key.token(PUBLIC_BASE_URL + "/cds-services")
    response = app.test_client().get("/cds-services", headers={"Authorization": f"Bearer {token}"})
    entries = {entry["id"]: entry for entry in response.get_json()["services"]}
    assert entries[toy.ECHO] == {
        "hook": "patient-view",
        "title": "Toy echo",
        "description": "A toy service of the test suite.",
        "id": toy.ECHO,
        "prefetch": {"patient": toy.PATIENT_TEMPLATE},
    }
    assert "prefetch" not in entries[toy.RAISES]
    assert "cardiovascular-risk" in entries, "the real services are still listed"


def test_prefetch_sent_by_the_ehr_is_used_without_calling_its_fhir_server(app, call, httpserver, audit_records):
    body = hook_body(httpserver.url_for("/fhir"), prefetch={"patient": SENT_PATIENT})
    assert only_card(call(app, toy.ECHO, body))["summary"] == "Echo: Sent"
    assert len(httpserver.log) == 0
    assert outcome(audit_records) == "cards"


def test_missing_prefetch_is_fetched_from_the_fhir_server(app, call, httpserver, audit_records):
    httpserver.expect_request(f"/fhir/Patient/{PATIENT_ID}").respond_with_json(PATIENT)
    card = only_card(call(app, toy.ECHO, hook_body(httpserver.url_for("/fhir"))))
    assert card["summary"] == "Echo: Fetched"
    (fetch,) = audit_records("fhir.fetch")
    assert (fetch["key"], fetch["outcome"]) == ("patient", "ok")
    assert httpserver.log[0][0].headers["Authorization"] == "Bearer toy-token-123"


def test_a_card_function_that_raises_gets_the_services_fallback(app, call, audit_records, caplog):
    card = only_card(call(app, toy.RAISES, hook_body()))
    assert card["summary"] == "Toy fallback: unavailable"
    assert outcome(audit_records) == "fallback:error"
    assert any("service toy-raises failed" in r.getMessage() for r in caplog.records)


def test_a_fallback_that_raises_gets_the_generic_fallback_not_a_5xx(app, call, audit_records, caplog):
    card = only_card(call(app, toy.FALLBACK_RAISES, hook_body()))
    assert card["summary"] == "Toy fallback raises: AI result unavailable"
    assert "AI result unavailable" in card["source"]["label"]
    assert outcome(audit_records) == "fallback:error"
    assert any("fallback of service toy-fallback-raises failed" in r.getMessage() for r in caplog.records)


def test_a_service_without_a_fallback_gets_the_generic_fallback(app, call, audit_records):
    card = only_card(call(app, toy.NO_FALLBACK, hook_body()))
    assert card["summary"] == "Toy no fallback: AI result unavailable"
    assert card["detail"].startswith("This decision support could not run")
    assert outcome(audit_records) == "fallback:error"


@pytest.fixture
def slow_model_app(make_app, toys):
    """The gateway on a model server that answers after 1.5 s: inside the hook budget, outside toy-budget's."""
    with FaultModelServer() as server:
        server.set_mode("slow", delay_ms=1500)
        yield make_app(AI_BACKEND="kserve", AI_URL=server.url, HOOK_BUDGET_MS=5000, LATE_RESULT_TTL_S=0)


def test_a_card_function_overrunning_its_budget_ms_gets_the_fallback(slow_model_app, call, audit_records):
    card = only_card(call(slow_model_app, toy.BUDGET, hook_body()))
    assert card["summary"] == "Toy fallback: timed out"
    assert outcome(audit_records) == "fallback:timeout"
    # The same card function under the hook's own budget waits for the model: budget_ms made the difference.
    card = only_card(call(slow_model_app, toy.UNBUDGETED, hook_body()))
    assert card["summary"].startswith("Toy model answered: ascvd-pce")
    assert outcome(audit_records) == "cards"


def test_the_app_takes_its_clock_from_the_configuration(make_app):
    clock = FakeClock()
    assert make_app(CLOCK=clock).extensions["clock"] is clock
    assert isinstance(make_app().extensions["clock"], SystemClock)


def test_removing_the_toy_services_leaves_the_registry_as_it_was():
    service_registry.load_services()
    before = dict(service_registry._REGISTRY)
    with toy.declared():
        assert service_registry.get_service(toy.ECHO) is not None
    assert before == service_registry._REGISTRY
    assert service_registry.get_service(toy.ECHO) is None
