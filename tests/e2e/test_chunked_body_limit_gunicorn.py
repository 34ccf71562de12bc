"""Under gunicorn, a chunked request body (no Content-Length) over MAX_REQUEST_BYTES is a 413, on every endpoint.

Raw sockets, so that the request is exactly what a client sends: Transfer-Encoding: chunked and nothing else.
"""

from __future__ import annotations

import json
import re

import pytest
import requests

from tests.support.http_servers import post_raw
from tests.support.processes import free_port, gunicorn, local_gateway_settings

LIMIT = 64 * 1024
SERVICE = "/cds-services/cardiovascular-risk"
FEEDBACK = {
    "feedback": [
        {
            "card": "4e0a3a1e-3283-4575-ab82-028d55fe2719",
            "outcome": "overridden",
            "outcomeTimestamp": "2026-11-28T10:06:00Z",
        }
    ]
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, signing_key):
    work = tmp_path_factory.mktemp("gunicorn")
    port = free_port()
    env = local_gateway_settings(work, port, signing_key, MAX_REQUEST_BYTES=str(LIMIT))
    with gunicorn(env, port) as base:
        yield base


def padded(document: dict, size: int) -> bytes:
    """``document`` as JSON followed by spaces up to ``size`` bytes: valid JSON at any length from its own."""
    raw = json.dumps(document).encode()
    return raw + b" " * (size - len(raw))


def post_chunked(base: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """Send ``body`` in 8 KiB chunks over one connection; the status, headers and body of the answer."""
    pieces = [body[start : start + 8192] for start in range(0, len(body), 8192)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
    return post_raw(base, path, framed, headers)


def signed(signing_key, base: str, path: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {signing_key.token(base + path)}", "Content-Type": "application/json"}


def assert_413_operation_outcome(status, headers, content):
    assert status == 413, content[:300]
    assert headers["content-type"] == "application/fhir+json"
    issue = json.loads(content)["issue"][0]
    assert issue["severity"] == "error" and str(LIMIT) in issue["diagnostics"]


def test_chunked_hook_body_just_over_the_limit_is_413(gateway, signing_key, hook_body):
    # The first LIMIT bytes are a complete, valid hook request: a body cut off at the limit is answered 200.
    answer = post_chunked(gateway, SERVICE, padded(hook_body, LIMIT + 1), signed(signing_key, gateway, SERVICE))
    assert_413_operation_outcome(*answer)


def test_chunked_hook_body_at_the_limit_is_answered(gateway, signing_key, hook_body):
    status, _, content = post_chunked(gateway, SERVICE, padded(hook_body, LIMIT), signed(signing_key, gateway, SERVICE))
    assert status == 200
    assert json.loads(content)["cards"]


def test_chunked_feedback_just_over_the_limit_is_413_and_at_the_limit_is_stored(gateway, signing_key):
    path = SERVICE + "/feedback"
    status, _, _ = post_chunked(gateway, path, padded(FEEDBACK, LIMIT), signed(signing_key, gateway, path))
    assert status == 200
    assert_413_operation_outcome(
        *post_chunked(gateway, path, padded(FEEDBACK, LIMIT + 1), signed(signing_key, gateway, path))
    )


def test_chunked_form_just_over_the_limit_on_the_smart_app_is_an_html_413(gateway):
    form = b"csrf_token=" + b"a" * (LIMIT - len("csrf_token=") + 1)
    status, headers, _ = post_chunked(
        gateway, "/smart/logout", form, {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 413
    assert headers["content-type"].startswith("text/html")


def test_a_client_streaming_far_past_the_limit_gets_the_413(gateway, signing_key, hook_body):
    """requests sends a generator chunked and reads the answer even when the server stops reading early."""

    def sixteen_times_the_limit():
        yield json.dumps(hook_body).encode()
        for _ in range(16 * LIMIT // 8192):
            yield b" " * 8192

    response = requests.post(
        gateway + SERVICE, data=sixteen_times_the_limit(), headers=signed(signing_key, gateway, SERVICE), timeout=10
    )
    assert response.status_code == 413
    assert re.search(rf"\b{LIMIT}\b", response.json()["issue"][0]["diagnostics"])
