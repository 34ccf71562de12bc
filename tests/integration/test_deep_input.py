"""Input nested as deep as a JSON parser allows (orjson: 1,024 levels) is answered, never a 5xx."""

from __future__ import annotations

import copy
import json

import pytest

from tests.conftest import PUBLIC_BASE_URL

SERVICE = "/cds-services/cardiovascular-risk"
DEPTH = 1000


PLACEHOLDER = "deep-value-goes-here"
DEEP = {
    # As JSON text: Python's own encoder stops short of this depth.
    "list": "[" * DEPTH + "]" * DEPTH,
    "object": '{"reference":' * DEPTH + "{}" + "}" * DEPTH,
}


def with_deep_value(body: dict, shape: str) -> str:
    return json.dumps(body).replace(json.dumps(PLACEHOLDER), DEEP[shape], 1)


def first_entry(body: dict, key: str) -> dict:
    return body["prefetch"][key]["entry"][0]["resource"]


PLACES = {
    "observation subject": lambda body, deep: first_entry(body, "hdl").__setitem__("subject", deep),
    "observation code": lambda body, deep: first_entry(body, "hdl").__setitem__("code", deep),
    "observation value": lambda body, deep: first_entry(body, "hdl").__setitem__("valueQuantity", deep),
    "observation status": lambda body, deep: first_entry(body, "hdl").__setitem__("status", deep),
    "condition code": lambda body, deep: first_entry(body, "conditions").__setitem__("code", deep),
    "medication": lambda body, deep: first_entry(body, "medications").__setitem__("medicationCodeableConcept", deep),
    "patient extension": lambda body, deep: body["prefetch"]["patient"].__setitem__("extension", deep),
    "patient birthDate": lambda body, deep: body["prefetch"]["patient"].__setitem__("birthDate", deep),
    "context extra": lambda body, deep: body["context"].__setitem__("extra", deep),
    "bundle link": lambda body, deep: body["prefetch"]["hdl"].__setitem__("link", [{"relation": "next", "url": deep}]),
}


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("shape", DEEP)
def test_deeply_nested_values_anywhere_in_a_hook_are_answered(make_app, signing_key, hook_body, place, shape):
    body = copy.deepcopy(hook_body)
    PLACES[place](body, PLACEHOLDER)
    token = signing_key.token(PUBLIC_BASE_URL + SERVICE)
    response = (
        make_app()
        .test_client()
        .post(
            SERVICE,
            data=with_deep_value(body, shape),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
    )
    assert response.status_code < 500, response.get_data(as_text=True)[:500]
    if response.status_code >= 400:
        assert response.get_json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("shape", DEEP)
def test_deeply_nested_feedback_is_answered(make_app, signing_key, shape):
    entry = {
        "card": "c1",
        "outcome": "overridden",
        "outcomeTimestamp": "2026-11-29T10:00:00Z",
        "overrideReason": {"reason": {"system": "s", "code": "c"}, "userComment": "x", "extension": PLACEHOLDER},
    }
    path = SERVICE + "/feedback"
    token = signing_key.token(PUBLIC_BASE_URL + path)
    response = (
        make_app()
        .test_client()
        .post(path, data=with_deep_value({"feedback": [entry]}, shape), headers={"Authorization": f"Bearer {token}"})
    )
    assert response.status_code < 500, response.get_data(as_text=True)[:500]
