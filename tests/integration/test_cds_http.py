"""The CDS Hooks endpoints over HTTP (Flask's test client), with real JWTs and a real SQLite database."""

from __future__ import annotations

import copy
import json

import pytest
import sqlalchemy as sa

from app.ai import ModelUnavailable
from app.db import engine, feedback
from tests.conftest import LOCAL_BASE_URL, PUBLIC_BASE_URL
from tests.support.assertions import assert_no_empty_members

SERVICE = "/cds-services/cardiovascular-risk"


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def auth(signing_key):
    def header(path: str, **claims) -> dict[str, str]:
        return {"Authorization": f"Bearer {signing_key.token(PUBLIC_BASE_URL + path, **claims)}"}

    return header


def post(client, path, body, headers):
    data = body if isinstance(body, bytes) else json.dumps(body)
    return client.post(path, data=data, headers={**headers, "Content-Type": "application/json"})


def assert_operation_outcome(response, status, expression=None):
    assert response.status_code == status
    body = response.get_json(force=True)
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["severity"] == "error"
    if expression:
        assert issue["expression"] == [expression]
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    return issue


def test_discovery_lists_the_declared_services_with_their_prefetch(client, auth):
    response = client.get("/cds-services", headers=auth("/cds-services"))
    assert response.status_code == 200
    services = {s["id"]: s for s in response.get_json()["services"]}
    entry = services["cardiovascular-risk"]
    assert entry["hook"] == "patient-view"
    assert entry["title"] and entry["description"]
    assert entry["prefetch"]["patient"] == "Patient/{{context.patientId}}"


def test_discovery_without_a_token_is_401_without_detail(client):
    response = client.get("/cds-services")
    issue = assert_operation_outcome(response, 401)
    assert issue["diagnostics"] == "Client authentication failed"
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ["/cds-services", SERVICE, SERVICE + "/feedback"])
def test_preflight_is_answered_without_a_token(client, path):
    response = client.options(
        path,
        headers={
            "Origin": "https://sandbox.cds-hooks.org",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]


def test_configured_origins_are_echoed_and_others_get_no_cors(make_app, auth):
    client = make_app(CORS_ALLOWED_ORIGINS="https://ehr.example.org").test_client()
    allowed = client.get("/cds-services", headers={**auth("/cds-services"), "Origin": "https://ehr.example.org"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://ehr.example.org"
    other = client.get("/cds-services", headers={**auth("/cds-services"), "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_service_call_with_full_prefetch_answers_a_risk_card(client, auth, hook_body, audit_records):
    response = post(client, SERVICE, hook_body, auth(SERVICE))
    assert response.status_code == 200
    cards = response.get_json()["cards"]
    assert len(cards) == 1
    card = cards[0]
    assert card["uuid"]
    assert card["summary"].startswith("10-year ASCVD risk")
    assert "ascvd-pce" in card["source"]["label"]
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    (record,) = audit_records("hook")
    assert record["iss"] == "https://ehr.test"
    assert record["service"] == "cardiovascular-risk"
    assert record["hookInstance"] == hook_body["hookInstance"]
    assert record["patient"] == "Patient/gw-test-patient-1"
    assert record["user"] == "Practitioner/gw-test-practitioner"
    assert record["outcome"] == "cards" and record["status"] == 200
    assert record["latency_ms"] >= 0


def test_audit_and_logs_hold_no_token_and_no_clinical_values(client, auth, hook_body, tmp_path, caplog):
    headers = auth(SERVICE)
    token = headers["Authorization"].split()[1]
    post(client, SERVICE, hook_body, headers)
    audit_text = (tmp_path / "audit.jsonl").read_text()
    for secret in (token, "213", "Testpatient", "lisinopril"):
        assert secret not in audit_text
        assert secret not in caplog.text


def test_unknown_service_is_404(client, auth):
    path = "/cds-services/no-such-service"
    assert_operation_outcome(post(client, path, {}, auth(path)), 404)


def test_malformed_json_is_400_naming_the_body(client, auth):
    assert_operation_outcome(post(client, SERVICE, b"{not json", auth(SERVICE)), 400, "body")


def test_missing_patient_id_is_400_naming_the_field(client, auth, hook_body):
    del hook_body["context"]["patientId"]
    assert_operation_outcome(post(client, SERVICE, hook_body, auth(SERVICE)), 400, "context.patientId")


def test_wrong_hook_for_the_service_is_400_naming_hook(client, auth, hook_body):
    hook_body["hook"] = "order-sign"
    assert_operation_outcome(post(client, SERVICE, hook_body, auth(SERVICE)), 400, "hook")


def test_bad_input_is_checked_after_authentication(client, hook_body):
    assert_operation_outcome(post(client, SERVICE, b"{not json", {}), 401)


def test_token_for_another_endpoint_is_rejected(client, auth, hook_body):
    assert_operation_outcome(post(client, SERVICE, hook_body, auth("/cds-services")), 401)


def test_replayed_token_is_rejected(client, auth, hook_body):
    headers = auth(SERVICE)
    assert post(client, SERVICE, hook_body, headers).status_code == 200
    assert_operation_outcome(post(client, SERVICE, hook_body, headers), 401)


def test_required_prefetch_missing_without_fhir_server_is_412_naming_the_key(client, auth, hook_body):
    del hook_body["prefetch"]["patient"]
    del hook_body["fhirServer"]
    issue = assert_operation_outcome(post(client, SERVICE, hook_body, auth(SERVICE)), 412, "prefetch.patient")
    assert "patient" in issue["diagnostics"]


def test_null_prefetch_is_passed_on_not_refetched(client, auth, hook_body):
    hook_body["prefetch"]["medications"] = None
    hook_body["fhirServer"] = "http://127.0.0.1:9"  # nothing listens: a refetch would fail the key
    response = post(client, SERVICE, hook_body, auth(SERVICE))
    assert response.status_code == 200
    assert "could not" not in response.get_json()["cards"][0].get("detail", "").lower()


def test_failing_model_gives_the_fallback_card_not_a_5xx(app, auth, hook_body, audit_records):
    class DownBackend:
        def infer(self, model, inputs, timeout=None):
            raise ModelUnavailable("unavailable", "connection refused")

    app.extensions["ai_guard"].backend = DownBackend()
    response = post(app.test_client(), SERVICE, hook_body, auth(SERVICE))
    assert response.status_code == 200
    (card,) = response.get_json()["cards"]
    assert "unavailable" in card["source"]["label"].lower()
    assert card["uuid"]
    assert audit_records("hook")[0]["outcome"] == "fallback:unavailable"


def test_crashing_model_gives_the_fallback_card_not_a_5xx(app, auth, hook_body):
    class BrokenBackend:
        def infer(self, model, inputs, timeout=None):
            raise ZeroDivisionError("a bug")

    app.extensions["ai_guard"].backend = BrokenBackend()
    response = post(app.test_client(), SERVICE, hook_body, auth(SERVICE))
    assert response.status_code == 200
    assert response.get_json()["cards"]


def test_auth_off_needs_no_token_and_says_so_on_every_card(make_app, hook_body):
    client = make_app(CDS_AUTH="off", PUBLIC_BASE_URL=LOCAL_BASE_URL).test_client()
    response = post(client, SERVICE, hook_body, {})
    assert response.status_code == 200
    assert "CDS_AUTH=off" in response.get_json()["cards"][0]["source"]["label"]


def feedback_body(card_uuid: str) -> dict:
    return {
        "feedback": [
            {
                "card": card_uuid,
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": "e56e1945-20b3-4393-8503-a1a20fd73152"}],
                "outcomeTimestamp": "2026-11-28T10:05:31Z",
            },
            {
                "card": card_uuid,
                "outcome": "overridden",
                "overrideReason": {"userComment": "patient declines"},
                "outcomeTimestamp": "2026-11-28T10:06:00Z",
            },
        ]
    }


def stored_feedback(app) -> list:
    with engine(app).connect() as conn:
        return list(conn.execute(sa.select(feedback).order_by(feedback.c.id)))


def test_feedback_is_stored_durably(app, client, auth, audit_records):
    path = SERVICE + "/feedback"
    response = post(client, path, feedback_body("4e0a3a1e-3283-4575-ab82-028d55fe2719"), auth(path))
    assert response.status_code == 200
    rows = stored_feedback(app)
    assert [(r.card_uuid, r.outcome, r.client_iss) for r in rows] == [
        ("4e0a3a1e-3283-4575-ab82-028d55fe2719", "accepted", "https://ehr.test"),
        ("4e0a3a1e-3283-4575-ab82-028d55fe2719", "overridden", "https://ehr.test"),
    ]
    assert rows[0].accepted_suggestions == ["e56e1945-20b3-4393-8503-a1a20fd73152"]
    assert audit_records("feedback")[0]["entries"] == 2


def test_malformed_feedback_is_400_and_stores_nothing(app, client, auth):
    path = SERVICE + "/feedback"
    body = feedback_body("4e0a3a1e-3283-4575-ab82-028d55fe2719")
    del body["feedback"][1]["outcomeTimestamp"]
    assert_operation_outcome(post(client, path, body, auth(path)), 400, "feedback[1].outcomeTimestamp")
    assert stored_feedback(app) == []


def test_feedback_needs_authentication(app, client):
    path = SERVICE + "/feedback"
    assert_operation_outcome(post(client, path, feedback_body("x"), {}), 401)
    assert stored_feedback(app) == []


def test_unknown_route_and_wrong_method_are_operation_outcomes(client, auth):
    assert_operation_outcome(client.get("/cds-services/x/y/z"), 404)
    assert_operation_outcome(client.put("/cds-services", headers=auth("/cds-services")), 405)


def test_request_body_over_the_limit_is_413(make_app, auth, hook_body):
    client = make_app(MAX_REQUEST_BYTES=2048).test_client()
    assert_operation_outcome(post(client, SERVICE, hook_body, auth(SERVICE)), 413)


def test_health_and_readiness(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"]["database"] == "ok"


def test_readiness_fails_when_the_database_is_gone(make_app):
    app = make_app()
    app.extensions["db"] = sa.create_engine(
        "postgresql+psycopg://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 1}
    )
    assert app.test_client().get("/readyz").status_code == 503


def test_cards_carry_no_empty_members(client, auth, hook_body):
    body = post(client, SERVICE, copy.deepcopy(hook_body), auth(SERVICE)).get_json()
    assert_no_empty_members(body["cards"])
