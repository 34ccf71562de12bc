"""MAX_REQUEST_BYTES holds for bodies without a Content-Length (chunked), on every endpoint that reads a body.

Flask's test client always sends a Content-Length, so these requests are built as gunicorn hands a chunked
body to the application: no CONTENT_LENGTH, ``wsgi.input_terminated`` set, the decoded body on ``wsgi.input``.
"""

from __future__ import annotations

import json

import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from tests.conftest import PUBLIC_BASE_URL

LIMIT = 64 * 1024
SERVICE = "/cds-services/cardiovascular-risk"


@pytest.fixture
def client(make_app):
    return make_app(MAX_REQUEST_BYTES=LIMIT).test_client()


@pytest.fixture
def auth(signing_key):
    return lambda path: {"Authorization": f"Bearer {signing_key.token(PUBLIC_BASE_URL + path)}"}


def padded(document: dict, size: int) -> bytes:
    """``document`` as JSON followed by spaces up to ``size`` bytes: valid JSON at any length from its own."""
    raw = json.dumps(document).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


def post_chunked(client, path: str, body: bytes, headers: dict[str, str], content_type="application/json"):
    """POST ``body`` the way gunicorn presents a Transfer-Encoding: chunked request."""
    environ = EnvironBuilder(path=path, method="POST", data=body, headers=headers, content_type=content_type)
    environ = environ.get_environ()
    del environ["CONTENT_LENGTH"]
    environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    environ["wsgi.input_terminated"] = True
    return client.open(Request(environ))


def assert_413_operation_outcome(response):
    assert response.status_code == 413
    assert response.content_type == "application/fhir+json"
    issue = response.get_json(force=True)["issue"][0]
    assert issue["severity"] == "error"
    assert str(LIMIT) in issue["diagnostics"]


def test_chunked_hook_body_one_byte_over_the_limit_is_413_not_answered_cut_off(client, auth, hook_body):
    # Cut at the limit, this body is still a valid hook request: a silently truncated read is answered 200.
    response = post_chunked(client, SERVICE, padded(hook_body, LIMIT + 1), auth(SERVICE))
    assert_413_operation_outcome(response)


def test_chunked_hook_body_at_the_limit_is_answered(client, auth, hook_body):
    response = post_chunked(client, SERVICE, padded(hook_body, LIMIT), auth(SERVICE))
    assert response.status_code == 200
    assert response.get_json()["cards"]


def test_chunked_hook_body_far_over_the_limit_is_413(client, auth, hook_body):
    response = post_chunked(client, SERVICE, padded(hook_body, 4 * LIMIT), auth(SERVICE))
    assert_413_operation_outcome(response)


def test_chunked_feedback_body_over_the_limit_is_413(client, auth):
    path = SERVICE + "/feedback"
    feedback = {
        "feedback": [
            {
                "card": "4e0a3a1e-3283-4575-ab82-028d55fe2719",
                "outcome": "overridden",
                "outcomeTimestamp": "2026-11-28T10:06:00Z",
            }
        ]
    }
    assert post_chunked(client, path, padded(feedback, LIMIT), auth(path)).status_code == 200
    assert_413_operation_outcome(post_chunked(client, path, padded(feedback, LIMIT + 1), auth(path)))


def test_chunked_form_over_the_limit_on_the_smart_app_is_an_html_413(client):
    form = b"csrf_token=" + b"a" * LIMIT
    response = post_chunked(client, "/smart/logout", form, {}, content_type="application/x-www-form-urlencoded")
    assert response.status_code == 413
    assert response.content_type == "text/html; charset=utf-8"


def test_body_with_a_content_length_over_the_limit_is_413_naming_the_limit(client, auth, hook_body):
    body = padded(hook_body, LIMIT + 1)
    response = client.post(SERVICE, data=body, headers={**auth(SERVICE), "Content-Type": "application/json"})
    assert_413_operation_outcome(response)
