"""The FHIR client keeps its token under its base: dot segments in every spelling a server may read as one
(Tomcat's ``..;``, percent-encoded once or twice, with ``;parameters``) are refused, in paging URLs and paths."""

from __future__ import annotations

import pytest

from app.fhir.client import Client, FhirError, pooled_session

BASE = "https://fhir.example.org/r4"
CLIMBS = [
    "..;/admin",
    "%2e%2e;/admin",
    "..%3b/admin",
    "..%3Bjsessionid=1/admin",
    "%252e%252e/admin",
    "%25252e%25252e/admin",
    ".;/Condition",
    "Condition/..;x/..;x/admin",
    "Condition/%252e%252e%252fadmin",
    "Condition\\..\\admin",
    "Condition/%5c..%5cadmin",
    "%2525252525252e%2525252525252e/admin",  # still decoding after the allowed rounds
    "..%00/admin",  # servers that trim controls, spaces or trailing dots (IIS) read these as ".."
    "..%20/admin",
    "..%09/admin",
    ".../admin",
    "Condition/.. /admin",
]


@pytest.fixture
def client():
    session = pooled_session()
    yield Client(BASE, "token", session, timeout=1.0)
    session.close()


@pytest.mark.parametrize("path", CLIMBS)
def test_a_paging_url_that_climbs_out_of_the_base_in_any_spelling_is_not_held(client, path):
    assert not client.holds(f"{BASE}/{path}")


@pytest.mark.parametrize("path", CLIMBS)
def test_a_relative_path_that_climbs_out_of_the_base_in_any_spelling_is_refused_unsent(client, path):
    with pytest.raises(FhirError, match="under the server's base"):
        client.get(path)  # nothing listens at fhir.example.org: a request would fail with another message


@pytest.mark.parametrize(
    "path",
    [
        "Condition?patient=A&_count=5",
        "Condition/_search?_getpages=abc&_page=3",
        "?_getpages=f3a1;x&_getpagesoffset=20",
        "Patient/A/_history/2",
        "Observation/a.b-c",
        "Binary/x;y",
        "Condition/%2e%2e.x",  # "..x" is a name, not a dot segment
    ],
)
def test_legitimate_paging_urls_stay_held(client, path):
    assert client.holds(f"{BASE}/{path}")
