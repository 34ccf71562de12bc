"""The SMART app against an EHR that answers badly on purpose (issue 9): slow drips, odd JSON, odd numbers in the
token response and id_token, FHIR data of the wrong shape or of another patient. Every case is a real loopback EHR
(the SmartEhr double with one route answered differently); the app answers an HTML page, never a 5xx of its own,
and never shows another patient's data."""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable, Iterator

import jwt
import pytest
from flask import Response

from app.cds.clients import FhirBase
from app.smart.launch import DiscoveryCache, SmartConfiguration, TooManyDiscoveries
from tests.conftest import PUBLIC_BASE_URL
from tests.integration.test_smart_launch import (
    LAUNCH_URL,
    OTHER_PATIENT_ID,
    PATIENT_ID,
    Browser,
    callback_url,
    gateway_trusting,
    launch_to_app,
    store_result,
)
from tests.support.clock import FakeClock
from tests.support.smart_ehr import SmartEhr


@pytest.fixture(scope="module")
def seeded(fhir_server):
    """The launch patient's cholesterol on the real FHIR server (the one the double's FHIR reads go to)."""
    fhir_server.post_bundle(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "resource": {"resourceType": "Patient", "id": PATIENT_ID, "name": [{"family": "Launch"}]},
                    "request": {"method": "PUT", "url": f"Patient/{PATIENT_ID}"},
                },
                {
                    "resource": cholesterol("smart-hostile-chol", 213),
                    "request": {"method": "PUT", "url": "Observation/smart-hostile-chol"},
                },
            ],
        }
    )
    return fhir_server


@pytest.fixture
def app_clock():
    return FakeClock(wall=time.time())  # the double stamps its id_tokens with the system clock


@pytest.fixture
def gateway(make_app, tmp_path, signing_key, ehr, app_clock):
    """A gateway on ``app_clock`` whose only trusted FHIR server is the EHR double's."""
    return gateway_trusting(make_app, tmp_path, signing_key, [ehr.fhir_base], CLOCK=app_clock)


@pytest.fixture
def result_id(gateway):
    return store_result(gateway, patient=PATIENT_ID)


def answer_route(ehr: SmartEhr, endpoint: str, answer: Callable[..., Response | None]) -> None:
    """Let ``answer`` answer the double's ``endpoint``; when it returns None the double answers as usual."""
    usual = ehr.app.view_functions[endpoint]

    def view(**kwargs):
        return answer(**kwargs) or usual(**kwargs)

    ehr.app.view_functions[endpoint] = view


def drip(body: bytes, every_s: float) -> Response:
    """A 200 whose Content-Length promises ``body`` and whose bytes come one at a time, ``every_s`` apart."""

    def bytes_one_by_one() -> Iterator[bytes]:
        for i in range(len(body)):
            yield body[i : i + 1]
            time.sleep(every_s)

    return Response(bytes_one_by_one(), 200, {"Content-Length": str(len(body))}, content_type="application/json")


def json_answer(text: str | bytes, status: int = 200) -> Response:
    return Response(text, status, content_type="application/json")


def page_text(page) -> str:
    return html.unescape(page.text)


def launch(browser: Browser, ehr: SmartEhr, n: int = 0):
    return browser.get(f"{LAUNCH_URL}?iss={ehr.fhir_base}&launch=l{n}")


# -- discovery ---------------------------------------------------------------------------------------------------


def test_a_discovery_answer_dripping_a_byte_at_a_time_ends_at_the_timeout(make_app, tmp_path, signing_key, ehr):
    app = gateway_trusting(make_app, tmp_path, signing_key, [ehr.fhir_base], FHIR_TIMEOUT_S=1)
    answer_route(ehr, "discovery", lambda: drip(json.dumps(ehr.smart_configuration()).encode(), 0.3))
    started = time.monotonic()
    page = launch(Browser(app), ehr)
    assert page.status == 504 and "did not answer within 1 s" in page_text(page)
    assert time.monotonic() - started < 4  # the read timeout alone restarts with every byte


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "is nested too deeply to read"),
        (b'{"authorization_endpoint": ' + b"7" * 5000 + b"}", "has a number too large to read"),
        (b'{"issuer": "\\ud800"}', "is not valid Unicode"),
        (b"\xff\xfe{}", "is not valid UTF-8 text"),
    ],
)
def test_a_discovery_document_that_cannot_be_read_is_named_and_asked_once(gateway, ehr, body, problem):
    ehr.discovery_body = body
    for i in range(3):
        page = launch(Browser(gateway), ehr, i)
        assert page.status == 502 and problem in page_text(page)
        assert f"{ehr.fhir_base}/.well-known/smart-configuration" in page_text(page)
    assert ehr.discovery_count() == 1


def test_the_lookup_budget_says_lookups_not_new_addresses():
    clock = FakeClock()
    cache = DiscoveryCache(ttl_s=1, fetches_per_minute=2, clock=clock)
    base = FhirBase("https://ehr.example.org/fhir", "https://ehr.example.org/fhir")
    config = SmartConfiguration("https://ehr.example.org/a", "https://ehr.example.org/t", frozenset({"S256"}))
    for _ in range(2):
        cache.get(base, lambda: config, wait_s=1)
        clock.advance(2)
    with pytest.raises(TooManyDiscoveries) as refused:
        cache.get(base, lambda: config, wait_s=1)
    assert "looked up the SMART configuration" in refused.value.message and "2 times" in refused.value.message
    assert "new addresses" not in refused.value.message + refused.value.title


# -- the token response ------------------------------------------------------------------------------------------


def token_answer(ehr: SmartEhr, change: Callable[[dict], str]) -> None:
    """The double's token endpoint answers its usual token, rewritten as JSON text by ``change``."""

    def answer():
        usual = ehr._token()
        if usual.status_code != 200:
            return usual
        return json_answer(change(json.loads(usual.get_data())))

    answer_route(ehr, "token", answer)


def with_member(name: str, raw_json: str) -> Callable[[dict], str]:
    def change(token: dict) -> str:
        token[name] = "@@"
        return json.dumps(token).replace('"@@"', raw_json)

    return change


ODD_NUMBERS = [
    ("expires_in", '{"a": 1}', "has an expires_in that is not a number of seconds"),
    ("expires_in", "[1]", "has an expires_in that is not a number of seconds"),
    ("expires_in", "-5", "has an expires_in that is not a number of seconds"),
    ("expires_in", "true", "has an expires_in that is not a number of seconds"),
    ("expires_in", "1e400", "has a number too large to read"),
    ("expires_in", "-1e400", "has a number too large to read"),
    ("expires_in", "1" + "0" * 400, "has a number too large to read"),
    ("expires_at", "1e400", "has a number too large to read"),
    ("patient", '["x"]', "has a patient that is not a string"),
    ("scope", "5", "has a scope that is not a string"),
]


@pytest.mark.parametrize(("member", "raw", "problem"), ODD_NUMBERS)
def test_odd_members_of_the_token_response_are_a_502_page_naming_them(gateway, ehr, result_id, member, raw, problem):
    token_answer(ehr, with_member(member, raw))
    browser = Browser(gateway)
    page = launch_to_app(browser, ehr, result_id)
    assert page.status == 502 and f"The EHR's token response {problem}" in page_text(page)
    assert page.headers["Content-Type"].startswith("text/html") and browser.cookie() is None


@pytest.mark.parametrize("raw", ["[]", '"soon"', "null"])
def test_an_expires_at_the_app_does_not_use_does_not_stop_the_launch(gateway, ehr, result_id, raw):
    token_answer(ehr, with_member("expires_at", raw))
    assert launch_to_app(Browser(gateway), ehr, result_id).status == 200


@pytest.mark.parametrize(("member", "raw", "problem"), ODD_NUMBERS[:3])
def test_odd_numbers_in_a_refresh_answer_end_the_launch_with_a_page(gateway, app_clock, ehr, member, raw, problem):
    ehr.token_lifetime_s = 600
    browser = Browser(gateway)
    assert launch_to_app(browser, ehr, store_result(gateway, patient=PATIENT_ID)).status == 200
    token_answer(ehr, with_member(member, raw))
    app_clock.advance(571)
    page = browser.get("/smart/app")
    assert page.status == 401 and f"the EHR's token response {problem}" in page_text(page)
    assert browser.get("/smart/app").status == 401


def test_a_token_answer_dripping_a_byte_at_a_time_ends_at_the_timeout(make_app, tmp_path, signing_key, ehr):
    app = gateway_trusting(make_app, tmp_path, signing_key, [ehr.fhir_base], FHIR_TIMEOUT_S=1)
    result = store_result(app, patient=PATIENT_ID)
    answer_route(ehr, "token", lambda: drip(b'{"access_token": "' + b"a" * 100 + b'"}', 0.3))
    started = time.monotonic()
    page = launch_to_app(Browser(app), ehr, result)
    assert page.status == 504 and "did not answer within 1 s" in page_text(page)
    assert time.monotonic() - started < 5


def test_the_ehr_keys_dripping_a_byte_at_a_time_end_the_sign_in_at_the_timeout(make_app, tmp_path, signing_key, ehr):
    app = gateway_trusting(make_app, tmp_path, signing_key, [ehr.fhir_base], FHIR_TIMEOUT_S=1)
    result = store_result(app, patient=PATIENT_ID)
    answer_route(ehr, "jwks", lambda: drip(json.dumps(ehr._jwks()).encode(), 0.3))
    started = time.monotonic()
    page = launch_to_app(Browser(app), ehr, result)
    assert page.status == 502 and "identity token could not be verified" in page_text(page)
    assert time.monotonic() - started < 5  # PyJWKClient's urllib read waited for every byte


def test_a_code_the_ehr_refuses_is_a_400_asking_to_start_again(gateway, ehr, result_id):
    browser = Browser(gateway)
    url = callback_url(browser, ehr, result_id)
    forged = url.replace("code=", "code=forged", 1)
    page = browser.get(forged)
    assert page.status == 400 and "did not accept this sign-in" in page_text(page)
    assert "Start again from the EHR" in page_text(page)
    assert ehr.token_requests == [("authorization_code", 400)]


def test_a_token_endpoint_that_is_down_stays_a_502(gateway, ehr, result_id):
    answer_route(ehr, "token", lambda: json_answer("{}", 503))
    assert launch_to_app(Browser(gateway), ehr, result_id).status == 502


# -- the id_token ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "times",
    [
        {"exp": float("nan")},
        {"exp": float("inf")},
        {"iat": float("nan")},
        {"iat": float("-inf")},
        {"nbf": float("nan")},
        {"exp": 10**400},
        {"exp": True},
    ],
)
def test_an_id_token_with_times_that_are_not_finite_numbers_stops_the_launch(gateway, ehr, result_id, times):
    def id_token(user) -> str:
        now = int(time.time())
        claims = {"iss": ehr.base_url, "sub": user.fhir_user, "aud": ehr.client.client_id, "iat": now - 10}
        claims.update({"exp": now + 300, "fhirUser": user.fhir_user, **times})
        return jwt.encode(claims, ehr._key, "RS256", headers={"kid": "ehr-double"})

    ehr._id_token = id_token
    page = launch_to_app(Browser(gateway), ehr, result_id)
    assert page.status == 502 and "identity token could not be verified" in page_text(page)


# -- the FHIR data on the page -----------------------------------------------------------------------------------


def fhir_answer(ehr: SmartEhr, resource_type: str, body: str | bytes | Callable[[], Response]) -> None:
    """The double's FHIR reads of ``resource_type`` answer ``body`` (other reads go to the real FHIR server)."""

    def answer(path: str):
        if path.split("/", 1)[0] != resource_type:
            return None
        return body() if callable(body) else json_answer(body)

    answer_route(ehr, "fhir", answer)


def patient(**members) -> str:
    return json.dumps({"resourceType": "Patient", "id": PATIENT_ID, **members})


def observations(*resources: dict) -> str:
    return json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]})


def cholesterol(oid: str, value: float, subject: str = f"Patient/{PATIENT_ID}", **members) -> dict:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2093-3"}]},
        "subject": {"reference": subject},
        "effectiveDateTime": "2026-11-02T09:00:00Z",
        "valueQuantity": {"value": value, "unit": "mg/dL"},
        **members,
    }


@pytest.mark.parametrize(
    ("body", "banner"),
    [
        (patient(name=5), "Name not recorded"),
        (patient(name=[{"given": 5, "family": ["x"]}]), "Name not recorded"),
        (patient(name=[{"given": ["Ann", 5, None], "family": "Lee"}], gender=7, birthDate={}), "Ann Lee"),
        (patient(name=[{"family": "\ud800"}]), "could not be loaded"),
        ("[1, 2]", "could not be loaded"),
    ],
)
def test_a_patient_of_the_wrong_shape_still_shows_the_page(gateway, ehr, result_id, body, banner):
    fhir_answer(ehr, "Patient", body)
    page = launch_to_app(Browser(gateway), ehr, result_id)
    assert page.status == 200 and banner in page_text(page)
    assert "213" in page.text  # the live check still ran


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"resourceType": "Bundle", "entry": 5}),
        json.dumps({"resourceType": "Bundle", "entry": [5, {"resource": 5}, {"resource": {"resourceType": 5}}]}),
        observations(cholesterol("c1", 250, valueQuantity=None, component=5)),
        observations(cholesterol("c1", 250, valueQuantity={"value": "x"}, component=[5, {"code": 5}])),
        observations(cholesterol("c1", 250, valueQuantity={"value": 250, "unit": "\ud800"})),
    ],
)
def test_newer_values_of_the_wrong_shape_still_show_the_page(gateway, ehr, result_id, body):
    fhir_answer(ehr, "Observation", body)
    page = launch_to_app(Browser(gateway), ehr, result_id)
    assert page.status == 200 and "12.3 %" in page.text


def test_newer_values_of_another_patient_or_server_are_never_shown(gateway, ehr, result_id):
    fhir_answer(
        ehr,
        "Observation",
        observations(
            cholesterol("mine", 213),
            cholesterol("theirs", 991, subject=f"Patient/{OTHER_PATIENT_ID}"),
            cholesterol("elsewhere", 992, subject=f"https://other.example/fhir/Patient/{PATIENT_ID}"),
            cholesterol("nobody", 993, subject=""),
        ),
    )
    page = launch_to_app(Browser(gateway), ehr, result_id)
    assert page.status == 200 and "213" in page.text
    assert not any(value in page.text for value in ("991", "992", "993", "theirs", "elsewhere"))


def test_a_patient_read_answering_another_patient_shows_no_banner_data(gateway, ehr, result_id):
    fhir_answer(
        ehr, "Patient", json.dumps({"resourceType": "Patient", "id": OTHER_PATIENT_ID, "name": [{"text": "Zed"}]})
    )
    page = launch_to_app(Browser(gateway), ehr, result_id)
    assert page.status == 200 and "Zed" not in page.text and "could not be loaded" in page_text(page)


def test_a_fhir_answer_dripping_a_byte_at_a_time_ends_at_the_timeout(make_app, tmp_path, signing_key, ehr):
    app = gateway_trusting(make_app, tmp_path, signing_key, [ehr.fhir_base], FHIR_TIMEOUT_S=1)
    result = store_result(app, patient=PATIENT_ID)
    fhir_answer(ehr, "Patient", lambda: drip(patient(name=[{"text": "Slow"}]).encode(), 0.3))
    browser = Browser(app)
    url = callback_url(browser, ehr, result)
    started = time.monotonic()
    page = browser.follow(url)
    assert page.status == 200 and "Slow" not in page.text
    assert time.monotonic() - started < 5
    assert page.url == PUBLIC_BASE_URL + "/smart/app"
