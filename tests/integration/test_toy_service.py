"""The CDS framework itself, through toy services and the real app: declaration, discovery, prefetch sent and
fetched, a card function that raises, a fallback that raises, no fallback, a service's own budget, and a service
that brings its own model, explanation page and setting."""

from __future__ import annotations

import json

import pytest

from app import results
from app.ai import model_guard
from app.cds import service as service_registry
from app.clock import SystemClock
from app.config import ConfigError, load_config
from app.smart.pages import LaunchContext, render_result
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


# ---- a service that brings its own model, explanation page and setting ------------------------------------------


def explained(app, call) -> tuple[dict, dict]:
    """One toy-explained card and its smart link."""
    card = only_card(call(app, toy.EXPLAINED, hook_body()))
    (link,) = card["links"]
    return card, link


def test_a_service_serves_its_own_model_reading_its_own_setting(make_app, toys, call):
    app = make_app(TOY_GREETING_NUMBER="7")
    assert app.config["TOY_GREETING_NUMBER"] == 7
    card, _ = explained(app, call)
    assert card["summary"] == "Toy doubled 7"
    assert model_guard(app, toy.TOY_MODEL) is not app.extensions["ai_guard"]  # its own guard, its own breaker
    card, _ = explained(make_app(), call)
    assert card["summary"] == "Toy doubled 21"  # the declared default


def test_the_framework_stores_the_result_and_links_the_services_own_page(app, call):
    card, link = explained(app, call)
    assert (link["label"], link["type"], link["url"]) == (
        "How the toy answered",
        "smart",
        PUBLIC_BASE_URL + "/smart/launch",
    )
    app.extensions["results_writer"].flush()
    result = results.load(app.extensions["db"], link["appContext"])
    assert result.kind == toy.EXPLAINED and result.patient_id == PATIENT_ID
    assert result.data == {"number": 21, "doubled": 42, "model": "0.1"}
    context = LaunchContext(
        patient={"resourceType": "Patient", "id": PATIENT_ID, "name": [{"text": "Toy Patient"}]},
        need_patient_banner=True,
        user="Practitioner/toy",
        granted_scopes=frozenset(),
    )
    page = render_result(result, context, csrf_token="tok")
    assert "<title>Toy: how this was made – Clinical AI gateway</title>" in page  # the common frame ...
    assert "Toy Patient" in page and 'name="csrf_token" value="tok"' in page
    assert "21 doubled is <strong>42</strong>" in page  # ... around the service's own template


def test_a_bad_value_of_a_declared_setting_stops_the_start_naming_it(toys):
    with pytest.raises(ConfigError, match=r"^TOY_GREETING_NUMBER must be between 1 and 1000 \(got 0\)$"):
        load_config(environ={}, overrides={"TOY_GREETING_NUMBER": "0"})
    with pytest.raises(ConfigError, match=r"^TOY_GREETING_NUMBER must be a whole number"):
        load_config(environ={}, overrides={"TOY_GREETING_NUMBER": "many"})


def test_the_real_services_settings_keep_their_names_defaults_and_bounds():
    settings = load_config(environ={})
    assert (settings["DISCHARGE_SUMMARY_TTL_S"], settings["LLM_TIMEOUT_S"], settings["LLM_MODEL"]) == (
        86400,
        60,
        "gpt-4o-mini",
    )
    assert settings["LLM_URL"] is None and settings["LLM_API_KEY"] is None
    with pytest.raises(ConfigError, match=r"^DISCHARGE_SUMMARY_TTL_S must be between 60 and 2592000 \(got 5\)$"):
        load_config(environ={"DISCHARGE_SUMMARY_TTL_S": "5"})
    with pytest.raises(ConfigError, match=r"^LLM_URL must be an absolute http/https URL"):
        load_config(environ={"LLM_URL": "ftp://llm"})


def test_only_a_declared_service_with_an_explanation_names_a_result(app):
    engine = app.extensions["db"]
    for kind in ("job", toy.ECHO, "nobody"):  # the old kind, a service without a page, no service at all
        with pytest.raises(ValueError, match="not a declared service with an explanation"):
            results.save(engine, kind, {}, client_iss=None, fhir_server=None, patient_id="p", ttl_seconds=60)
