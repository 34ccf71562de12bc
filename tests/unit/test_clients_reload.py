"""One trusted-clients registry per application, re-read when CDS_CLIENTS_FILE changes: the client
authenticator and webhooks both see a change, an invalid change keeps the clients loaded before (and says so
once), and no caller ever sees a file half loaded."""

from __future__ import annotations

import base64
import json
import logging
import os
import threading

import pytest

from app.cds.clients import DEV_CLIENTS_FILE, ClientRegistry, TrustedClients, trusted_clients
from app.webhooks import endpoints
from tests.conftest import PUBLIC_BASE_URL
from tests.support.tokens import TEST_ISSUER, SigningKey, clients_document

SECOND_ISSUER = "https://second-ehr.test"
HOOK_URL = "https://receiver.example.org/hooks"


@pytest.fixture(scope="module")
def second_key() -> SigningKey:
    return SigningKey.generate()


def with_second_client(signing_key: SigningKey, second_key: SigningKey) -> dict:
    """The test client, plus a second one that subscribes a webhook."""
    document = clients_document(signing_key, ["http://127.0.0.1:*"])
    second = clients_document(second_key, ["http://127.0.0.1:*"], iss=SECOND_ISSUER)["clients"][0]
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    second["webhooks"] = [{"url": HOOK_URL, "secret": secret, "events": ["jobs.dead-letter-alert"]}]
    document["clients"].append(second)
    return document


def discovery(client, key: SigningKey, iss: str):
    token = key.token(PUBLIC_BASE_URL + "/cds-services", iss=iss)
    return client.get("/cds-services", headers={"Authorization": f"Bearer {token}"})


def test_a_changed_file_is_picked_up_by_the_authenticator_and_by_webhooks(
    make_app, clients_file, signing_key, second_key
):
    app = make_app()
    client = app.test_client()
    assert discovery(client, second_key, SECOND_ISSUER).status_code == 401
    assert endpoints(app) == []

    clients_file.write_text(json.dumps(with_second_client(signing_key, second_key)))

    assert discovery(client, second_key, SECOND_ISSUER).status_code == 200
    assert discovery(client, signing_key, TEST_ISSUER).status_code == 200
    assert [(e["client_iss"], e["url"]) for e in endpoints(app)] == [(SECOND_ISSUER, HOOK_URL)]
    assert app.extensions["cds"].clients is trusted_clients(app)  # one registry, not a copy per area


@pytest.mark.parametrize(
    "broken",
    [
        "{not json",
        json.dumps({"clients": [{"iss": SECOND_ISSUER}]}),  # neither jwks nor jwks_url
        None,  # the file is gone
    ],
)
def test_an_invalid_change_keeps_the_previous_clients_and_logs_once(
    make_app, clients_file, signing_key, second_key, caplog, broken
):
    app = make_app()
    client = app.test_client()
    clients_file.write_text(json.dumps(with_second_client(signing_key, second_key)))
    assert discovery(client, second_key, SECOND_ISSUER).status_code == 200

    caplog.set_level(logging.ERROR, logger="app.cds.clients")
    if broken is None:
        clients_file.unlink()
    else:
        clients_file.write_text(broken)
    for _ in range(3):
        assert discovery(client, second_key, SECOND_ISSUER).status_code == 200
        assert [e["client_iss"] for e in endpoints(app)] == [SECOND_ISSUER]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "app.cds.clients" and r.levelno >= logging.ERROR]
    assert "keeping the 2 clients loaded before" in line and "secret" not in line.lower()

    clients_file.write_text(json.dumps(clients_document(signing_key, ["http://127.0.0.1:*"])))
    assert discovery(client, second_key, SECOND_ISSUER).status_code == 401  # a valid change is taken again
    assert endpoints(app) == []


def test_an_invalid_file_at_start_stops_the_start(tmp_path):
    path = tmp_path / "clients.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TrustedClients(path)


def test_no_caller_sees_a_half_written_or_half_loaded_file(tmp_path, signing_key, second_key):
    """A writer rewrites the file in place (truncate, then write: readers can meet it empty or cut short) while
    readers ask for the clients: every answer is one whole version, one client or two."""
    one = json.dumps(clients_document(signing_key, ["http://127.0.0.1:*"]))
    two = json.dumps(with_second_client(signing_key, second_key))
    path = tmp_path / "clients.json"
    path.write_text(one)
    clients = TrustedClients(path)
    whole = {frozenset([TEST_ISSUER]), frozenset([TEST_ISSUER, SECOND_ISSUER])}
    seen: set[frozenset[str]] = set()
    wrong: list[object] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            registry = clients.current()
            issuers = frozenset(c.iss for c in registry)
            if not isinstance(registry, ClientRegistry) or issuers not in whole:
                wrong.append(issuers)
            seen.add(issuers)

    readers = [threading.Thread(target=read) for _ in range(4)]
    for reader in readers:
        reader.start()
    try:
        for i in range(300):
            with open(path, "w", encoding="utf-8") as file:  # truncates first: not an atomic replace
                text = two if i % 2 == 0 else one
                file.write(text[: len(text) // 2])
                file.flush()
                file.write(text[len(text) // 2 :])
    finally:
        done.set()
        for reader in readers:
            reader.join(timeout=30)
    assert wrong == []
    assert seen == whole  # both versions were loaded along the way


def test_a_development_only_file_is_refused_on_reload_where_it_would_be_refused_at_start(
    make_app, clients_file, caplog
):
    app = make_app(HOST="0.0.0.0", PUBLIC_BASE_URL="https://cds.example.org")  # noqa: S104 - reachable off-host
    sandbox = json.loads(DEV_CLIENTS_FILE.read_text())["clients"][0]["iss"]
    caplog.set_level(logging.ERROR, logger="app.cds.clients")
    clients_file.write_text(DEV_CLIENTS_FILE.read_text())  # trusts the Sandbox, whose private key is published
    clients = trusted_clients(app)
    assert clients.get(sandbox) is None and clients.get(TEST_ISSUER) is not None
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "refused here" in line and "CDS Hooks Sandbox" in line
