"""The FHIR REST client: answers mapped to exceptions, timeouts bounded by the deadline, tokens kept private, paging."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import responses
from responses import matchers

from app.fhir.client import Client, DeadlineExceeded, FhirError, FhirNotFound, next_link, pooled_session

BASE = "https://fhir.example.org/r4"
TOKEN = "opaque-token-51d0"
PATIENT = {"resourceType": "Patient", "id": "123"}


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def session() -> Iterator[requests.Session]:
    s = pooled_session()
    yield s
    s.close()


@pytest.fixture
def client(session) -> Client:
    return Client(BASE, TOKEN, session, timeout=5.0)


def fhir_error(mocked, client, path="Patient/123", **answer) -> FhirError:
    mocked.get(f"{BASE}/{path}", **answer)
    with pytest.raises(FhirError) as info:
        client.get(path)
    return info.value


# --- answers ------------------------------------------------------------------------------------------------------


def test_resource_answered_200_is_returned(mocked, client):
    mocked.get(f"{BASE}/Patient/123", json=PATIENT, content_type="application/fhir+json")
    assert client.get("Patient/123") == PATIENT


def test_relative_path_is_resolved_against_the_base_url(mocked, client):
    mocked.get(f"{BASE}/Patient/123", json=PATIENT)
    client.get("Patient/123")
    assert mocked.calls[0].request.url == f"{BASE}/Patient/123"


def test_base_url_with_a_trailing_slash_is_used_as_is(mocked, session):
    mocked.get(f"{BASE}/Patient/123", json=PATIENT)
    assert Client(BASE + "/", None, session).get("Patient/123") == PATIENT


def test_absolute_url_is_fetched_as_given(mocked, client):
    mocked.get(f"{BASE}/Observation", json={"resourceType": "Bundle"}, match=[matchers.query_string_matcher("page=2")])
    assert client.get(f"{BASE}/Observation?page=2") == {"resourceType": "Bundle"}


@pytest.mark.parametrize("status", [404, 410])
def test_not_found_or_gone_raises_fhir_not_found(mocked, client, status):
    error = fhir_error(mocked, client, status=status, json={"resourceType": "OperationOutcome", "issue": []})
    assert isinstance(error, FhirNotFound)
    assert error.status == status


@pytest.mark.parametrize("status", [500, 502, 503, 401, 403, 400])
def test_error_status_raises_fhir_error_with_the_status(mocked, client, status):
    error = fhir_error(mocked, client, status=status, json={"resourceType": "OperationOutcome", "issue": []})
    assert not isinstance(error, FhirNotFound)
    assert error.status == status


@pytest.mark.parametrize("status", [201, 202, 206])
def test_status_other_than_200_raises_fhir_error(mocked, client, status):
    assert fhir_error(mocked, client, status=status, json=PATIENT).status == status


def test_redirect_is_not_followed(mocked, client):
    metadata = "http://169.254.169.254/latest/meta-data/Patient/123"
    mocked.get(f"{BASE}/Patient/123", status=302, headers={"Location": metadata})
    mocked.get(metadata, json=PATIENT)

    with pytest.raises(FhirError):
        client.get("Patient/123")

    assert [c.request.url for c in mocked.calls] == [f"{BASE}/Patient/123"]


def test_body_that_is_not_json_raises_fhir_error(mocked, client):
    error = fhir_error(mocked, client, body="<html>Service Unavailable</html>", content_type="text/html")
    assert "not JSON" in str(error)


@pytest.mark.parametrize("json_body", [[PATIENT], {"id": "123"}, "Patient", 42], ids=repr)
def test_json_that_is_not_a_fhir_resource_raises_fhir_error(mocked, client, json_body):
    assert "not a FHIR resource" in str(fhir_error(mocked, client, json=json_body))


def test_connection_error_raises_fhir_error_without_the_url_or_token(mocked, client):
    query = "patient=123&_secret=s3cr3t"
    cause = requests.ConnectionError(f"Max retries exceeded with url: /r4/Observation?{query} (token {TOKEN})")
    mocked.get(f"{BASE}/Observation", body=cause)

    with pytest.raises(FhirError) as info:
        client.get(f"Observation?{query}")

    message = str(info.value)
    assert not isinstance(info.value, DeadlineExceeded)
    assert "s3cr3t" not in message
    assert "patient=123" not in message
    assert TOKEN not in message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


@pytest.mark.parametrize("cause", [requests.ReadTimeout("read"), requests.ConnectTimeout("connect")], ids=repr)
def test_timeout_raises_deadline_exceeded(mocked, client, cause):
    mocked.get(f"{BASE}/Patient/123", body=cause)
    with pytest.raises(DeadlineExceeded):
        client.get("Patient/123")


def test_deadline_already_passed_raises_deadline_exceeded_without_a_request(mocked, client):
    mocked.get(f"{BASE}/Patient/123", json=PATIENT)

    with pytest.raises(DeadlineExceeded):
        client.get("Patient/123", deadline=time.monotonic() - 0.01)

    assert len(mocked.calls) == 0


def test_request_timeout_is_bounded_by_the_deadline(mocked, client):
    mocked.get(f"{BASE}/Patient/123", json=PATIENT)

    client.get("Patient/123", deadline=time.monotonic() + 0.5)

    assert 0 < mocked.calls[0].request.req_kwargs["timeout"] <= 0.5


def test_request_timeout_is_the_client_timeout_without_a_deadline(mocked, client):
    mocked.get(f"{BASE}/Patient/123", json=PATIENT)

    client.get("Patient/123")

    assert mocked.calls[0].request.req_kwargs["timeout"] == 5.0


# --- the token ----------------------------------------------------------------------------------------------------


def test_token_is_sent_as_a_bearer_authorization_header(mocked, client):
    mocked.get(
        f"{BASE}/Patient/123", json=PATIENT, match=[matchers.header_matcher({"Authorization": f"Bearer {TOKEN}"})]
    )
    assert client.get("Patient/123") == PATIENT


@pytest.mark.parametrize("token", [None, ""], ids=repr)
def test_no_authorization_header_without_a_token(mocked, session, token):
    mocked.get(f"{BASE}/Patient/123", json=PATIENT)

    Client(BASE, token, session).get("Patient/123")

    assert "Authorization" not in mocked.calls[0].request.headers


def test_fhir_json_is_asked_for(mocked, client):
    mocked.get(f"{BASE}/Patient/123", json=PATIENT)
    client.get("Patient/123")
    assert mocked.calls[0].request.headers["Accept"] == "application/fhir+json"


def test_repr_of_a_client_hides_the_token(client):
    assert TOKEN not in repr(client)
    assert TOKEN not in str(client)
    assert BASE in repr(client)


def test_error_messages_never_contain_the_token(mocked, client):
    error = fhir_error(mocked, client, status=401, json={"resourceType": "OperationOutcome", "issue": []})
    assert TOKEN not in str(error)


# --- paging -------------------------------------------------------------------------------------------------------


def page(n: int, last: int) -> dict[str, Any]:
    """Page ``n`` of a ``last``-page searchset, two Observations a page."""
    links = [{"relation": "self", "url": f"{BASE}/Observation?patient=123&page={n}"}]
    if n < last:
        links.append({"relation": "next", "url": f"{BASE}/Observation?patient=123&page={n + 1}"})
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 2 * last,
        "link": links,
        "entry": [{"resource": {"resourceType": "Observation", "id": f"o{n}-{i}"}} for i in (1, 2)],
    }


def serve_pages(mocked, last: int) -> None:
    mocked.get(f"{BASE}/Observation", json=page(1, last), match=[matchers.query_string_matcher("patient=123")])
    for n in range(2, last + 2):  # one page more than announced, to catch a client that reads past the end
        mocked.get(
            f"{BASE}/Observation", json=page(n, last), match=[matchers.query_string_matcher(f"patient=123&page={n}")]
        )


def test_search_all_follows_next_links_and_merges_entries(mocked, client):
    serve_pages(mocked, last=3)

    bundle = client.search_all("Observation?patient=123")

    assert [e["resource"]["id"] for e in bundle["entry"]] == ["o1-1", "o1-2", "o2-1", "o2-2", "o3-1", "o3-2"]
    assert len(mocked.calls) == 3


def test_search_all_result_has_no_next_link(mocked, client):
    serve_pages(mocked, last=2)

    bundle = client.search_all("Observation?patient=123")

    assert next_link(bundle) is None
    assert (bundle["resourceType"], bundle["type"], bundle["total"]) == ("Bundle", "searchset", 4)


def test_search_all_of_a_single_page_makes_one_request(mocked, client):
    serve_pages(mocked, last=1)

    bundle = client.search_all("Observation?patient=123")

    assert len(bundle["entry"]) == 2
    assert len(mocked.calls) == 1


def test_search_all_without_results_has_no_entry_member(mocked, client):
    mocked.get(f"{BASE}/Condition", json={"resourceType": "Bundle", "type": "searchset", "total": 0})
    assert client.search_all("Condition?patient=123") == {"resourceType": "Bundle", "type": "searchset", "total": 0}


def test_search_all_with_as_many_pages_as_max_pages_is_complete(mocked, client):
    serve_pages(mocked, last=3)
    assert len(client.search_all("Observation?patient=123", max_pages=3)["entry"]) == 6


def test_search_all_with_more_pages_than_max_pages_raises_fhir_error(mocked, client):
    serve_pages(mocked, last=6)
    with pytest.raises(FhirError, match="more than 3 pages"):
        client.search_all("Observation?patient=123", max_pages=3)


def test_search_all_requests_no_more_than_max_pages_pages(mocked, client):
    serve_pages(mocked, last=6)

    with pytest.raises(FhirError):
        client.search_all("Observation?patient=123", max_pages=3)

    assert len(mocked.calls) == 3


def test_search_all_does_not_follow_a_next_link_the_allowlist_refuses(mocked, client):
    first = page(1, 2)
    first["link"][1]["url"] = "https://evil.example/Observation?page=2"
    mocked.get(f"{BASE}/Observation", json=first)
    mocked.get("https://evil.example/Observation", json=page(2, 2))

    with pytest.raises(FhirError):
        client.search_all("Observation?patient=123", allow_url=lambda url: url.startswith(BASE + "/"))

    assert [c.request.url.split("?")[0] for c in mocked.calls] == [f"{BASE}/Observation"]


def test_search_all_rejects_a_next_page_that_is_not_a_bundle(mocked, client):
    mocked.get(f"{BASE}/Observation", json=page(1, 2), match=[matchers.query_string_matcher("patient=123")])
    mocked.get(f"{BASE}/Observation", json=PATIENT, match=[matchers.query_string_matcher("patient=123&page=2")])

    with pytest.raises(FhirError, match="not a Bundle"):
        client.search_all("Observation?patient=123")


def test_search_all_of_a_resource_that_is_not_a_bundle_returns_it(mocked, client):
    mocked.get(f"{BASE}/Patient/123", json=PATIENT)
    assert client.search_all("Patient/123") == PATIENT


def test_next_link_ignores_other_relations_and_malformed_links():
    bundle = {"link": [{"relation": "self", "url": "a"}, "junk", {"relation": "next", "url": 7}]}
    assert next_link(bundle) is None
    assert next_link({"link": [{"relation": "next", "url": "b"}]}) == "b"


def test_a_relative_path_cannot_climb_out_of_the_base(mocked, client):
    with pytest.raises(FhirError, match="under the server's base"):
        client.get("Encounter/../../admin/secrets")
    assert len(mocked.calls) == 0


def test_conditional_create_sends_the_condition_and_reports_a_new_resource(mocked, client):
    stored = {"resourceType": "DocumentReference", "id": "d1"}
    mocked.post(
        f"{BASE}/DocumentReference",
        json=stored,
        status=201,
        match=[
            matchers.header_matcher({"If-None-Exist": "identifier=s%7Cv", "Authorization": f"Bearer {TOKEN}"}),
            matchers.json_params_matcher({"resourceType": "DocumentReference"}),
        ],
    )
    assert client.create({"resourceType": "DocumentReference"}, if_none_exist="identifier=s%7Cv") == (stored, True)


def test_an_existing_match_without_a_body_is_read_back_not_assumed(mocked, client):
    first = {"resourceType": "DocumentReference", "id": "d1", "description": "the first draft"}
    mocked.post(
        f"{BASE}/DocumentReference", status=200, headers={"Location": f"{BASE}/DocumentReference/d1/_history/1"}
    )
    mocked.get(f"{BASE}/DocumentReference/d1", json=first)
    resource, created = client.create({"resourceType": "DocumentReference", "description": "a second draft"})
    assert (resource, created) == (first, False)


@pytest.mark.parametrize(
    "path",
    ["Encounter/%2e%2e/%2e%2e/admin", "/admin", "Encounter/..%5C..%5Cadmin", "..%2fadmin", "Encounter/..%2F..%2Fx"],
)
def test_escaped_and_rooted_paths_cannot_leave_the_base_either(mocked, client, path):
    with pytest.raises(FhirError, match="under the server's base"):
        client.get(path)
    assert len(mocked.calls) == 0


@pytest.mark.parametrize(
    ("url", "held"),
    [
        (f"{BASE}/Condition?page=2", True),
        (f"{BASE}/Condition/_search?_getpages=abc&_page=3", True),
        (f"{BASE}/..%2fadmin", False),
        (f"{BASE}/Condition/%2e%2e/%2e%2e/admin", False),
        (f"{BASE}/..", False),
        ("https://fhir.example.org/r4-other/Condition", False),
        ("https://elsewhere.example.org/r4/Condition", False),
    ],
)
def test_next_pages_are_followed_only_under_the_base_compared_decoded(client, url, held):
    assert client.holds(url) is held
