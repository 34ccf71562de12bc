"""No input is a 5xx: property-based fuzzing of every endpoint a client or a browser can reach (SQLite).

Thousands of generated inputs per run, derandomized so that CI sees the same ones every time. Hook bodies are
the project's valid fixture mutated field by field (they get past the first validation), JSON of any shape and
raw bytes; strings carry NULs, controls, lone surrogates and huge numbers. The PostgreSQL half is in
test_postgres_inputs.py.
"""

from __future__ import annotations

import base64
import json
import time
from urllib.parse import quote, quote_from_bytes
from uuid import uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jwt.api_jws import PyJWS

from app import results
from tests.conftest import PUBLIC_BASE_URL
from tests.support.fuzzing import (
    FIXTURE,
    assert_answered,
    assert_html_answered,
    assert_operation_outcome,
    encode,
    fuzz_settings,
    json_values,
    mutated_hooks,
    odd_contexts,
    odd_prefetch_bundles,
    texts,
    timestamps,
)
from tests.support.tokens import TEST_ISSUER

SERVICE = "/cds-services/cardiovascular-risk"
DISCHARGE = "/cds-services/discharge-summary"
ADMIN_TOKEN = "admin-token-for-fuzzing"


@pytest.fixture
def app(make_app):
    return make_app(ADMIN_TOKEN=ADMIN_TOKEN)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def post(client, signing_key):
    """POST a body with a fresh client JWT for the path (the replay cache refuses a reused one)."""

    def send(path: str, body: bytes):
        token = signing_key.token(PUBLIC_BASE_URL + path)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        return client.post(path, data=body, headers=headers)

    return send


def assert_cards(response) -> None:
    assert_answered(response)
    if response.status_code == 200:
        assert isinstance(json.loads(response.get_data())["cards"], list)


# --- the hook ----------------------------------------------------------------------------------------------------


@fuzz_settings(600)
@given(body=mutated_hooks())
def test_a_hook_call_mutated_field_by_field_is_answered_without_a_5xx(post, body):
    assert_cards(post(SERVICE, encode(body)))


@fuzz_settings(250)
@given(body=odd_prefetch_bundles())
def test_a_prefetch_bundle_of_any_shape_is_answered_without_a_5xx(post, body):
    assert_cards(post(SERVICE, encode(body)))


@fuzz_settings(250)
@given(body=odd_contexts(), service=st.sampled_from([SERVICE, DISCHARGE]))
def test_odd_ids_in_the_context_are_answered_without_a_5xx(post, body, service):
    if service == DISCHARGE:
        body = {**body, "hook": "encounter-discharge"}
        body["context"].setdefault("encounterId", "enc-1")
    assert_cards(post(service, encode(body)))


@fuzz_settings(200)
@given(body=st.one_of(json_values.map(encode), st.binary(max_size=200)))
def test_a_hook_body_of_any_shape_or_bytes_is_answered_without_a_5xx(post, body):
    response = post(SERVICE, body)
    assert_operation_outcome(response)


header_values = st.one_of(
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
    texts.map(lambda s: "Bearer " + s.encode("utf-8", "replace").decode("latin-1")),
    st.lists(st.binary(max_size=20), min_size=3, max_size=3).map(
        lambda parts: "Bearer " + ".".join(base64.urlsafe_b64encode(p).decode().rstrip("=") for p in parts)
    ),
).map(lambda value: value.replace("\r", "").replace("\n", ""))  # what an HTTP header can carry


@fuzz_settings(150)
@given(authorization=header_values)
def test_any_authorization_header_is_a_401_not_a_5xx(client, authorization):
    headers = {"Authorization": authorization, "Content-Type": "application/json"}
    response = client.post(SERVICE, data=encode(FIXTURE), headers=headers)
    assert assert_operation_outcome(response) and response.status_code == 401


@fuzz_settings(150)
@given(claims=st.dictionaries(st.sampled_from(["exp", "iat", "nbf", "jti", "aud", "iss", "tenant"]), json_values))
def test_a_signed_client_jwt_with_claims_of_any_type_is_answered_without_a_5xx(client, signing_key, claims):
    now = int(time.time())
    payload = {"iss": TEST_ISSUER, "aud": PUBLIC_BASE_URL + SERVICE, "iat": now, "exp": now + 300, "jti": str(uuid4())}
    key = signing_key
    token = PyJWS().encode(encode({**payload, **claims}), key.private_key, key.alg, {"kid": key.kid, "typ": "JWT"})
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    assert_cards(client.post(SERVICE, data=encode(FIXTURE), headers=headers))


# --- feedback ----------------------------------------------------------------------------------------------------

FEEDBACK = {
    "card": "4e0a3a1e-3283-4575-ab82-028d55fe2719",
    "outcome": "overridden",
    "acceptedSuggestions": [{"id": "e56e1945-20b3-4393-8503-a1a20fd73152"}],
    "overrideReason": {
        "reason": {"code": "d7ecf885", "system": "https://example.com/cds-hooks/override-reason-system"},
        "userComment": "A comment entered by the clinician.",
    },
    "outcomeTimestamp": "2021-12-11T10:05:31Z",
}


@st.composite
def feedback_bodies(draw) -> dict:
    """A valid feedback entry with some members replaced by anything (timestamps and odd text included)."""
    entry = json.loads(json.dumps(FEEDBACK))
    entry["outcome"] = draw(st.sampled_from(["accepted", "overridden"]))
    for name in draw(st.sets(st.sampled_from([*FEEDBACK, "suggestion", "code", "userComment"]), max_size=2)):
        value = draw(st.one_of(texts, json_values))
        if name == "outcomeTimestamp":
            entry[name] = draw(st.one_of(timestamps(), st.just(value)))
        elif name == "suggestion":
            entry["acceptedSuggestions"] = [{"id": value}]
        elif name == "code" and isinstance(entry.get("overrideReason"), dict):
            entry["overrideReason"]["reason"] = {**FEEDBACK["overrideReason"]["reason"], "code": value}
        elif name == "userComment" and isinstance(entry.get("overrideReason"), dict):
            entry["overrideReason"]["userComment"] = value
        else:
            entry[name] = value
    return {"feedback": [entry] * draw(st.integers(1, 2))}


@fuzz_settings(500)
@given(body=st.one_of(feedback_bodies(), feedback_bodies(), json_values))
def test_feedback_of_any_shape_is_answered_without_a_5xx(post, body):
    assert_answered(post(SERVICE + "/feedback", encode(body)))


# --- jobs and the admin API --------------------------------------------------------------------------------------

path_segments = st.one_of(
    texts.map(lambda s: quote(s.encode("utf-8", "surrogatepass"), safe="")),
    st.binary(min_size=1, max_size=20).map(lambda b: quote_from_bytes(b, safe="")),
    st.sampled_from(["ds-0123456789abcdef0123456789abcdef", "%2e%2e", "a%2Fb"]),
)


@fuzz_settings(250)
@given(job_id=path_segments, signed=st.booleans())
def test_a_job_status_read_with_any_id_is_answered_without_a_5xx(client, signing_key, job_id, signed):
    path = f"/jobs/{job_id}"
    headers = {}
    if signed:
        headers["Authorization"] = f"Bearer {signing_key.token(PUBLIC_BASE_URL + _decoded(path))}"
    response = client.get(path, headers=headers)
    if response.status_code == 308:  # Werkzeug merges the slashes of a decoded %2F: a redirect, nothing runs
        return
    assert_answered(response)
    assert response.status_code in (401, 404)


def _decoded(path: str) -> str:
    """The path as the application sees it (Werkzeug decodes percent-escapes as UTF-8, replacing errors)."""
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(path).decode("utf-8", "replace")


@fuzz_settings(400)
@given(
    method_path=st.one_of(
        st.just(("GET", "")),
        st.tuples(st.just("GET"), path_segments.map(lambda s: f"/{s}")),
        st.tuples(st.just("POST"), path_segments.map(lambda s: f"/{s}/requeue")),
        st.tuples(st.just("GET"), st.just("/dead")),
    ),
    query=st.lists(st.tuples(st.sampled_from(["limit", "kind", "x"]), texts), max_size=3),
    token=st.one_of(st.none(), st.just(ADMIN_TOKEN), texts),
)
def test_the_admin_api_with_any_path_query_and_token_is_answered_without_a_5xx(client, method_path, query, token):
    method, path = method_path
    query_string = "&".join(f"{quote(k)}={quote(v.encode('utf-8', 'surrogatepass'), safe='')}" for k, v in query)
    headers = {}
    if token is not None:
        headers["Authorization"] = "Bearer " + quote(token.encode("utf-8", "surrogatepass"), safe="")
        if token == ADMIN_TOKEN:
            headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
    response = client.open("/admin/jobs" + path, method=method, query_string=query_string, headers=headers)
    if response.status_code == 308:  # Werkzeug merges the slashes of a decoded %2F: a redirect, nothing runs
        return
    assert_answered(response)


BATCH_FIELDS = ["service", "client", "fhirServer", "group", "since", "writeBack", "x"]
VALID_BATCH = {"service": "cardiovascular-risk", "client": TEST_ISSUER, "fhirServer": "http://127.0.0.1:9/fhir"}


@st.composite
def batch_bodies(draw) -> dict:
    """A valid start request with some fields replaced, dropped or added, each by a value of any JSON shape."""
    body = dict(VALID_BATCH)
    for name in draw(st.lists(st.sampled_from(BATCH_FIELDS), max_size=4)):
        if draw(st.booleans()):
            body[name] = draw(json_values)
        else:
            body.pop(name, None)
    return body


@fuzz_settings(300)
@given(body=st.one_of(batch_bodies().map(encode), json_values.map(encode), st.binary(max_size=100)))
def test_a_batch_start_of_any_shape_is_answered_without_a_5xx(client, body):
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    response = client.post("/admin/batch", data=body, headers=headers)
    assert_answered(response)


@fuzz_settings(300)
@given(
    method_suffix=st.sampled_from([("GET", ""), ("GET", "/report"), ("POST", "/cancel"), ("DELETE", "")]),
    segment=path_segments,
    query=st.lists(st.tuples(st.sampled_from(["state", "limit", "x"]), texts), max_size=2),
)
def test_a_batch_run_read_or_cancel_with_any_id_is_answered_without_a_5xx(client, method_suffix, segment, query):
    method, suffix = method_suffix
    query_string = "&".join(f"{quote(k)}={quote(v.encode('utf-8', 'surrogatepass'), safe='')}" for k, v in query)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    response = client.open(f"/admin/batch/{segment}{suffix}", method=method, query_string=query_string, headers=headers)
    if response.status_code == 308:  # merged slashes of a decoded %2F: a redirect, nothing runs
        return
    if suffix == "/report" and response.status_code < 300:
        assert response.content_type.startswith("text/html")
        return
    assert_answered(response)


@pytest.mark.parametrize("limit", ["%C2%B2", "%D9%A1%D9%A2", "0", "1001", "-1", "1e3", ""])
def test_a_dead_letter_limit_that_is_not_1_to_1000_in_ascii_digits_is_a_400_naming_it(client, limit):
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    response = client.get(f"/admin/jobs/dead?limit={limit}", headers=headers)
    assert assert_operation_outcome(response)["expression"] == ["limit"] and response.status_code == 400


def test_the_admin_api_switched_off_is_a_403_whatever_the_path(make_app):
    client = make_app().test_client()
    for path in ("/admin/jobs", "/admin/jobs/dead?limit=%C2%B2", "/admin/jobs/%00", "/admin/jobs/x%00/requeue"):
        method = "POST" if path.endswith("requeue") else "GET"
        response = client.open(path, method=method, headers={"Authorization": "Bearer x"})
        assert assert_operation_outcome(response) and response.status_code == 403


# --- the SMART app -----------------------------------------------------------------------------------------------

query_strings = st.one_of(
    st.lists(
        st.tuples(st.sampled_from(["iss", "launch", "state", "code", "error", "x"]), texts),
        max_size=4,
    ).map(lambda pairs: "&".join(f"{k}={quote(v.encode('utf-8', 'surrogatepass'), safe='')}" for k, v in pairs)),
    st.binary(max_size=60).map(lambda b: quote_from_bytes(b, safe="=&")),
)
cookie_values = st.one_of(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF, exclude_characters=';,\\"'), max_size=40),
    st.binary(max_size=40).map(lambda b: quote_from_bytes(b, safe="")),
)
PENDING_STATE = "pending-state-for-fuzzing"
UNREACHABLE_EHR = "http://127.0.0.1:1/fhir"  # nothing listens on port 1: a fetch fails at once


@pytest.fixture
def stored_result_id(app, post):
    """A real stored result, so that the explanation page gets past its first check."""
    response = post(SERVICE, encode(FIXTURE))
    (link,) = [link for link in response.get_json()["cards"][0]["links"] if link.get("type") == "smart"]
    app.extensions["results_writer"].flush()
    assert results.load(app.extensions["db"], link["appContext"]) is not None
    return link["appContext"]


@st.composite
def smart_sessions(draw, result_id: str) -> dict | None:
    """No session, a pending launch, or a launched session whose token members are anything."""
    kind = draw(st.sampled_from(["none", "pending", "launched"]))
    if kind == "none":
        return None
    pending = {
        "state": PENDING_STATE,
        "code_verifier": "v" * 43,
        "iss": UNREACHABLE_EHR,
        "launch": "xyz",
        "authorization_endpoint": "http://127.0.0.1:1/authorize",
        "token_endpoint": "http://127.0.0.1:1/token",
        "issuer": None,
        "jwks_uri": None,
    }
    if kind == "pending":
        return {"pending": {PENDING_STATE: pending}}
    token = {
        "access_token": "at",
        "iss": UNREACHABLE_EHR,
        "token_endpoint": "http://127.0.0.1:1/token",
        "appContext": draw(st.one_of(st.just(result_id), texts, json_values)),
        "patient": draw(st.one_of(st.just("gw-test-patient-1"), texts, st.none())),
        "need_patient_banner": draw(st.booleans()),
        "scope": draw(st.one_of(st.none(), texts)),
        "user": draw(st.one_of(st.none(), texts)),
    }
    return {"token": token, "csrf": "csrf-for-fuzzing", "pending": {}}


@fuzz_settings(600)
@given(data=st.data())
def test_the_smart_app_with_any_query_cookie_and_session_is_answered_without_a_5xx(app, client, stored_result_id, data):
    route = data.draw(st.sampled_from(["/smart/launch", "/smart/callback", "/smart/app", "/smart/logout"]))
    query = data.draw(query_strings)
    state = data.draw(smart_sessions(stored_result_id))
    if state is not None:
        session = app.extensions["smart_app"].store.create(state)
        cookie = session.token
    else:
        cookie = data.draw(cookie_values)
    if route == "/smart/callback" and state is not None and f"state={PENDING_STATE}" in query:
        query = query.replace("code=", "ignored=")  # a code would be exchanged at the (unreachable) EHR: a 502
    client.set_cookie("smart_session", cookie, path="/smart")
    if route == "/smart/logout":
        form = {
            "csrf_token": data.draw(
                st.one_of(st.just("csrf-for-fuzzing"), texts.map(lambda s: s.encode("utf-8", "replace").decode()))
            )
        }
        response = client.post(route, query_string=query, data=form)
    else:
        response = client.get(route, query_string=query)
    assert_html_answered(response)
