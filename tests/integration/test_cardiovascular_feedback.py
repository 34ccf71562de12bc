"""The cardiovascular-risk cards over HTTP (Flask's test client, real JWTs, a real SQLite database): override
reasons on every card with a proposal, feedback carrying each reason stored and read back, and no card for patients
the service does not apply to unless the site turns informational cards on."""

from __future__ import annotations

import copy
import json

import pytest
import sqlalchemy as sa

from app.cds.proposals import OVERRIDE_REASON_SYSTEM, OVERRIDE_REASONS
from app.db import feedback
from tests.conftest import PUBLIC_BASE_URL

SERVICE = "/cds-services/cardiovascular-risk"
FEEDBACK = SERVICE + "/feedback"


def post(app, signing_key, path: str, body: dict):
    token = signing_key.token(PUBLIC_BASE_URL + path)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    return app.test_client().post(path, data=json.dumps(body), headers=headers)


def cards(app, signing_key, body: dict) -> list[dict]:
    response = post(app, signing_key, SERVICE, body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["cards"]


def test_a_card_with_a_proposal_offers_the_products_override_reasons(make_app, signing_key, hook_body):
    [card] = cards(make_app(), signing_key, hook_body)
    assert card["selectionBehavior"] == "at-most-one" and len(card["suggestions"]) == 1
    assert card["overrideReasons"] == [
        {"system": OVERRIDE_REASON_SYSTEM, "code": code, "display": display} for code, display in OVERRIDE_REASONS
    ]


def test_feedback_with_each_override_reason_is_stored_and_read_back(make_app, signing_key, hook_body):
    app = make_app()
    [card] = cards(app, signing_key, hook_body)
    sent = []
    for i, reason in enumerate(card["overrideReasons"]):
        entry = {
            "card": card["uuid"],
            "outcome": "overridden",
            "overrideReason": {"reason": reason, "userComment": f"comment {i}"},
            "outcomeTimestamp": f"2026-11-28T10:0{i}:00Z",
        }
        assert post(app, signing_key, FEEDBACK, {"feedback": [entry]}).status_code == 200
        sent.append(entry)
    accepted = {
        "card": card["uuid"],
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
        "outcomeTimestamp": "2026-11-28T10:09:00Z",
    }
    assert post(app, signing_key, FEEDBACK, {"feedback": [accepted]}).status_code == 200

    with app.extensions["db"].connect() as conn:
        rows = list(conn.execute(sa.select(feedback).order_by(feedback.c.id)))
    assert [(r.service_id, r.card_uuid, r.outcome) for r in rows] == [
        ("cardiovascular-risk", card["uuid"], "overridden")
    ] * len(OVERRIDE_REASONS) + [("cardiovascular-risk", card["uuid"], "accepted")]
    assert [r.override_reason for r in rows[:-1]] == [entry["overrideReason"] for entry in sent]
    assert [r.override_reason["reason"]["code"] for r in rows[:-1]] == [code for code, _ in OVERRIDE_REASONS]
    assert rows[-1].accepted_suggestions == [card["suggestions"][0]["uuid"]] and rows[-1].override_reason is None


def _aged(hook_body: dict, birth_date: str, **patient) -> dict:
    body = copy.deepcopy(hook_body)
    body["prefetch"]["patient"] = {**body["prefetch"]["patient"], "birthDate": birth_date, **patient}
    return body


@pytest.mark.parametrize(
    ("birth_date", "extra", "summary"),
    [
        ("1941-01-01", {}, "Cardiovascular risk not assessed: no statin benefit group applies at age 85"),
        ("2019-05-01", {}, "Cardiovascular risk not assessed: no statin benefit group applies at age 7"),
        (
            "1966-03-15",
            {"deceasedDateTime": "2026-01-02"},
            "Cardiovascular risk not assessed: the patient is recorded as deceased",
        ),
    ],
    ids=["85", "7", "deceased"],
)
def test_no_card_where_the_service_does_not_apply_unless_the_site_asks(
    make_app, signing_key, hook_body, birth_date, extra, summary
):
    body = _aged(hook_body, birth_date, **extra)
    assert cards(make_app(), signing_key, body) == []
    [card] = cards(make_app(CARDIOVASCULAR_RISK_INFO_CARDS="1"), signing_key, body)
    assert card["summary"] == summary and card["indicator"] == "info" and "suggestions" not in card


def test_a_patient_with_missing_data_gets_a_short_card_naming_it(make_app, signing_key, hook_body):
    body = copy.deepcopy(hook_body)
    body["prefetch"]["hdl"] = {"resourceType": "Bundle", "type": "searchset", "entry": []}
    [card] = cards(make_app(), signing_key, body)
    assert card["summary"] == "10-year ASCVD risk not calculated: no HDL cholesterol in the record"
    assert card["detail"] == "Missing or not usable:\n- no HDL cholesterol in the record"
