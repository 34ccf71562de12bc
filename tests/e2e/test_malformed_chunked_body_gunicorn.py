"""Under gunicorn, a chunked request body whose framing is broken is a 400 (never a 500), on every route.

gunicorn raises its own parse errors (InvalidChunkSize, ChunkMissingTerminator, InvalidChunkExtension, NoMoreData)
from the application's read of the body. Raw sockets, so that the broken framing reaches the server as written.
"""

from __future__ import annotations

import json
import secrets

import pytest

from tests.support.http_servers import post_raw
from tests.support.processes import free_port, gunicorn, local_gateway_settings

SERVICE = "/cds-services/cardiovascular-risk"
ADMIN_TOKEN = secrets.token_urlsafe(32)
# Bodies as sent after the headers; each is refused by gunicorn's chunked decoder while the application reads.
MALFORMED = {
    "size not hex": b"zz\r\nabc\r\n0\r\n\r\n",
    "negative size": b"-1\r\nabc\r\n0\r\n\r\n",
    "0x prefix": b"0x10\r\n0123456789abcdef\r\n0\r\n\r\n",
    "space before size": b" 5\r\nabcde\r\n0\r\n\r\n",
    "no CRLF after chunk": b"5\r\nabcdeXX0",
    "NUL in chunk extension": b"1;ext=\x00\r\na\r\n0\r\n\r\n",
    "cut off mid-chunk": b"10\r\nabc",
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, signing_key):
    work = tmp_path_factory.mktemp("gunicorn-malformed")
    port = free_port()
    env = local_gateway_settings(work, port, signing_key, ADMIN_TOKEN=ADMIN_TOKEN)
    with gunicorn(env, port) as base:
        yield base


def routes(signing_key, base: str) -> dict[str, dict[str, str]]:
    """Each JSON route that reads a body, with the headers that get it past authentication."""
    feedback = SERVICE + "/feedback"
    return {
        SERVICE: {"Authorization": f"Bearer {signing_key.token(base + SERVICE)}"},
        feedback: {"Authorization": f"Bearer {signing_key.token(base + feedback)}"},
        "/admin/batch": {"Authorization": f"Bearer {ADMIN_TOKEN}"},
    }


@pytest.mark.parametrize("framing", list(MALFORMED))
def test_a_malformed_chunked_body_is_a_400_operation_outcome_on_every_json_route(gateway, signing_key, framing):
    for path, headers in routes(signing_key, gateway).items():
        status, fields, content = post_raw(
            gateway, path, MALFORMED[framing], {**headers, "Content-Type": "application/json"}
        )
        assert status == 400, (path, content[:300])
        assert fields["content-type"] == "application/fhir+json", path
        assert json.loads(content)["issue"][0]["severity"] == "error", path


def test_a_malformed_chunked_form_on_the_smart_app_is_an_html_400(gateway):
    status, fields, _ = post_raw(
        gateway, "/smart/logout", MALFORMED["size not hex"], {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 400
    assert fields["content-type"].startswith("text/html")
