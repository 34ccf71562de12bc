"""Error answers and CORS belong to the blueprints that need them: the CDS endpoints (and the job status their
clients read) answer with an OperationOutcome and CORS, even for paths that match no route; the SMART app and
the admin API answer their own way, without the CDS CORS headers."""

from __future__ import annotations

import pytest

ORIGIN = {"Origin": "https://sandbox.cds-hooks.org"}


@pytest.fixture
def client(make_app):
    return make_app(ADMIN_TOKEN="operator-secret").test_client()


def is_operation_outcome(response) -> bool:
    body = response.get_json(force=True, silent=True)
    return isinstance(body, dict) and body.get("resourceType") == "OperationOutcome"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/cds-services/cardiovascular-risk/feedback/x", 404),  # no such route
        ("GET", "/cds-services/unknown", 405),  # the route exists for POST only
        ("PUT", "/cds-services", 405),
        ("GET", "/jobs/a/b", 404),
    ],
)
def test_cds_paths_that_match_no_route_are_operation_outcomes_with_cors(client, method, path, status):
    response = client.open(path, method=method, headers=ORIGIN)
    assert response.status_code == status and is_operation_outcome(response)
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_a_cds_error_on_a_route_is_an_operation_outcome_with_cors(client):
    response = client.get("/cds-services", headers=ORIGIN)
    assert response.status_code == 401 and is_operation_outcome(response)
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/smart/no-such-page", 404),
        ("POST", "/smart/launch", 405),
        ("GET", "/smart/launch", 400),  # no iss or launch: the app's own HTML error page
    ],
)
def test_smart_app_errors_are_not_cds_operation_outcomes_and_carry_no_cds_cors(client, method, path, status):
    response = client.open(path, method=method, headers=ORIGIN)
    assert response.status_code == status
    assert not is_operation_outcome(response) and response.content_type.startswith("text/html")
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize(
    ("path", "token", "status"),
    [
        ("/admin/jobs", None, 401),
        ("/admin/jobs/dead?limit=0", "operator-secret", 400),
        ("/admin/jobs/a/b/c", "operator-secret", 404),  # no such route: still the admin API's answer
    ],
)
def test_admin_api_errors_are_its_own_operation_outcomes_without_cors(client, path, token, status):
    headers = {**ORIGIN, **({"Authorization": f"Bearer {token}"} if token else {})}
    response = client.get(path, headers=headers)
    assert response.status_code == status and is_operation_outcome(response)
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize(("method", "path"), [("GET", "/no-such-thing"), ("POST", "/healthz")])
def test_errors_outside_the_json_apis_are_flasks_own(client, method, path):
    response = client.open(path, method=method, headers=ORIGIN)
    assert response.status_code in (404, 405) and not is_operation_outcome(response)
    assert "Access-Control-Allow-Origin" not in response.headers


def test_a_successful_smart_or_health_answer_carries_no_cds_cors(client):
    assert "Access-Control-Allow-Origin" not in client.get("/healthz", headers=ORIGIN).headers
    jwks = client.get("/.well-known/jwks.json", headers=ORIGIN)
    assert jwks.status_code == 200 and "Access-Control-Allow-Origin" not in jwks.headers
