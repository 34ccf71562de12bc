"""Development-only trust cannot be reached around the start check: by a clients-file reload, a listening socket
other than HOST, a browser page of another site, a proxy header, a copied or renamed development client, or a job
worker beside a deployment."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator

import pytest

from app.cds.clients import DEV_CLIENTS_FILE, trusted_clients
from app.config import ConfigError, load_config
from app.development import DEVELOPMENT_MARK, development_settings, job_worker_refusal
from tests.conftest import LOCAL_BASE_URL
from tests.support.tokens import TEST_ISSUER, SigningKey, clients_document

SANDBOX = "https://sandbox.cds-hooks.org"
DEPLOYED = {"PUBLIC_BASE_URL": "https://cds.example.org", "HOST": "0.0.0.0"}  # noqa: S104 - what a deployment binds


def this_hosts_address() -> str | None:
    """An address of this host that is not loopback (the one a UDP socket would send from), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address  # noqa: S104


@pytest.fixture
def listening_on() -> Iterator:
    """Listen on an address in this process, as a gunicorn worker does on its inherited sockets."""
    opened = []

    def listen(host: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        opened.append(sock)
        sock.bind((host, 0))
        sock.listen()

    yield listen
    for sock in opened:
        sock.close()


def test_a_reload_never_turns_development_trust_on_in_a_service_started_without_it(make_app, clients_file, caplog):
    app = make_app(PUBLIC_BASE_URL=LOCAL_BASE_URL)
    assert app.config["DEVELOPMENT_SETTINGS"] == []
    replaced = clients_file.with_name("replacement.json")
    replaced.write_text(DEV_CLIENTS_FILE.read_text())
    os.replace(replaced, clients_file)  # the atomic replace the README advises

    with caplog.at_level(logging.ERROR, logger="app.cds.clients"):
        issuers = [client.iss for client in trusted_clients(app)]

    assert issuers == [TEST_ISSUER]
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "trusts the CDS Hooks Sandbox" in line and "started without development settings" in line


def test_a_reload_adding_the_sandbox_to_a_deployments_file_is_refused(make_app, clients_file, signing_key):
    app = make_app(PUBLIC_BASE_URL=LOCAL_BASE_URL)
    document = clients_document(signing_key, ["https://ehr.example.org/fhir"])
    document["clients"].append(json.loads(DEV_CLIENTS_FILE.read_text())["clients"][0])
    clients_file.write_text(json.dumps(document))
    assert trusted_clients(app).get(SANDBOX) is None


def test_a_reload_within_development_on_this_host_is_used(make_app, clients_file):
    app = make_app(PUBLIC_BASE_URL=LOCAL_BASE_URL, FHIR_ALLOW_ANONYMOUS="1")
    clients_file.write_text(DEV_CLIENTS_FILE.read_text())
    assert trusted_clients(app).get(SANDBOX) is not None


def test_development_settings_refuse_an_application_listening_off_this_host(make_app, listening_on):
    address = this_hosts_address()
    if address is None:
        pytest.skip("this host has no address other than loopback")
    listening_on(address)  # as `gunicorn -b 0.0.0.0:P 'app:create_app()'` leaves its worker
    with pytest.raises(ConfigError, match=f"FHIR_ALLOW_ANONYMOUS=1: .*it listens on {address}:"):
        make_app(PUBLIC_BASE_URL=LOCAL_BASE_URL, FHIR_ALLOW_ANONYMOUS="1")
    assert make_app(PUBLIC_BASE_URL="https://cds.example.org")  # a deployment's own clients: no check


def test_development_settings_start_while_listening_on_loopback(make_app, listening_on):
    listening_on("127.0.0.1")
    assert make_app(PUBLIC_BASE_URL=LOCAL_BASE_URL, FHIR_ALLOW_ANONYMOUS="1")


@pytest.mark.parametrize(
    ("origin", "answered"),
    [
        (SANDBOX, True),
        ("http://localhost:3000", True),
        ("http://127.0.0.1:8080", True),
        ("http://[::1]:5173", True),
        ("https://attacker.example", False),
        ("http://localhost.attacker.example", False),
        ("null", False),
    ],
)
def test_with_development_settings_only_the_sandbox_and_this_hosts_pages_get_cors(make_app, origin, answered):
    client = make_app(PUBLIC_BASE_URL=LOCAL_BASE_URL, FHIR_ALLOW_ANONYMOUS="1").test_client()
    response = client.options("/cds-services", headers={"Origin": origin, "Host": "localhost:8080"})
    assert response.headers.get("Access-Control-Allow-Origin") == (origin if answered else None)


def test_cors_origins_set_explicitly_are_kept_in_development(make_app):
    app = make_app(PUBLIC_BASE_URL=LOCAL_BASE_URL, FHIR_ALLOW_ANONYMOUS="1", CORS_ALLOWED_ORIGINS="*")
    response = app.test_client().get("/cds-services", headers={"Origin": "https://tool.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_without_development_settings_every_origin_gets_cors(make_app):
    response = make_app().test_client().get("/cds-services", headers={"Origin": "https://ehr.example.org"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize(
    ("host", "answered"),
    [
        ("localhost:8080", True),
        ("127.0.0.1:8080", True),
        ("127.3.4.5", True),
        ("[::1]:8080", True),
        ("attacker.example:8080", False),  # a name rebound to 127.0.0.1 by its own DNS
        ("192.168.1.10:8080", False),
        ("localhost@attacker.example", False),
    ],
)
def test_with_development_settings_only_loopback_host_headers_are_answered(make_app, host, answered):
    client = make_app(PUBLIC_BASE_URL=LOCAL_BASE_URL, FHIR_ALLOW_ANONYMOUS="1").test_client()
    response = client.get("/healthz", headers={"Host": host})
    assert response.status_code == (200 if answered else 403)
    if not answered:
        assert response.get_json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    "header",
    ["X-Forwarded-Proto", "x-forwarded-port", "Via", "X-Client-IP", "True-Client-IP", "CF-Connecting-IP"]
    + ["X-Original-Forwarded-For", "X-Envoy-External-Address"],
)
def test_with_development_settings_any_forwarding_header_is_refused(make_app, header):
    client = make_app(PUBLIC_BASE_URL=LOCAL_BASE_URL, FHIR_ALLOW_ANONYMOUS="1").test_client()
    assert client.get("/healthz", headers={header: "203.0.113.9"}).status_code == 403


def dev_client_entry(tmp_path) -> dict:
    """The client entry `gateway dev client` writes, with its key under INSTANCE_PATH/dev-client."""
    from app.devtools import DevClient

    client, _ = DevClient.ensure(tmp_path / "instance" / "dev-client")
    return client.clients_document()["clients"][0]


def deployment_file(tmp_path, signing_key: SigningKey, *extra: dict):
    document = clients_document(signing_key, ["https://ehr.example.org/fhir"])
    document["clients"].extend(extra)
    path = tmp_path / "deployment.json"
    path.write_text(json.dumps(document))
    return str(path)


def test_a_development_client_merged_into_a_deployments_file_is_refused_off_this_host(tmp_path, signing_key):
    merged = deployment_file(tmp_path, signing_key, dev_client_entry(tmp_path))
    with pytest.raises(ConfigError, match="gateway dev client"):
        load_config(environ={"CDS_CLIENTS_FILE": merged, **DEPLOYED})


def test_a_development_client_renamed_and_unmarked_is_known_by_its_key(tmp_path, signing_key):
    entry = dev_client_entry(tmp_path)
    del entry[DEVELOPMENT_MARK]
    renamed = deployment_file(tmp_path, signing_key, {**entry, "iss": "https://renamed.example.org"})
    environ = {"CDS_CLIENTS_FILE": renamed, "INSTANCE_PATH": str(tmp_path / "instance"), **DEPLOYED}
    with pytest.raises(ConfigError, match="gateway dev client"):
        load_config(environ=environ)


def test_a_development_client_made_in_a_folder_of_its_own_is_known_by_its_key_too(tmp_path, signing_key, make_app):
    """``gateway dev client --dir`` keeps the key elsewhere; the instance records it, so a copy is still caught."""
    app = make_app(INSTANCE_PATH=str(tmp_path / "instance"))
    elsewhere = tmp_path / "keys-elsewhere"
    result = app.test_cli_runner().invoke(args=["dev", "client", "--dir", str(elsewhere)])
    assert result.exit_code == 0, result.output
    entry = json.loads((elsewhere / "clients.json").read_text())["clients"][0]
    del entry[DEVELOPMENT_MARK]
    renamed = deployment_file(tmp_path, signing_key, {**entry, "iss": "https://renamed.example.org"})
    environ = {"CDS_CLIENTS_FILE": renamed, "INSTANCE_PATH": str(tmp_path / "instance"), **DEPLOYED}
    with pytest.raises(ConfigError, match="gateway dev client"):
        load_config(environ=environ)


@pytest.mark.parametrize("mark", ["", None, False, 0, []])
def test_a_development_mark_counts_whatever_its_value(tmp_path, signing_key, mark):
    path = tmp_path / "clients.json"
    path.write_text(json.dumps({DEVELOPMENT_MARK: mark, **clients_document(signing_key, ["https://ehr.test/fhir"])}))
    switches = {"CDS_AUTH": True, "FHIR_ALLOW_ANONYMOUS": False, "WEBHOOKS_ALLOW_PRIVATE": False}
    assert development_settings({"CDS_CLIENTS_FILE": str(path), **switches})


def test_a_job_worker_needs_the_deployment_in_development_for_its_switches(tmp_path, signing_key):
    own = deployment_file(tmp_path, signing_key)
    switched = load_config(environ={"CDS_CLIENTS_FILE": own, "WEBHOOKS_ALLOW_PRIVATE": "1"})
    assert "WEBHOOKS_ALLOW_PRIVATE=1" in job_worker_refusal(switched)
    assert job_worker_refusal(load_config(environ={"WEBHOOKS_ALLOW_PRIVATE": "1"})) is None  # development clients
    assert job_worker_refusal(load_config(environ={"CDS_CLIENTS_FILE": own, "CDS_AUTH": "off"})) is None
    assert job_worker_refusal(load_config(environ={"CDS_CLIENTS_FILE": own})) is None
    local = {"CDS_CLIENTS_FILE": own, "WEBHOOKS_ALLOW_PRIVATE": "1", "PUBLIC_BASE_URL": "http://localhost:8080"}
    assert job_worker_refusal(load_config(environ=local)) is None  # named on this host: a local deployment


@pytest.mark.parametrize(
    "base",
    [
        "http://user@localhost:8080",
        "http://localhost:8080#fragment",
        "http://localhost:8080?q=1",
        "http://localhost:8080\nX: y",
        "http://localhost:99999",
    ],
)
def test_a_malformed_public_base_url_is_refused_in_one_line(base):
    with pytest.raises(ConfigError, match="PUBLIC_BASE_URL must be") as refused:
        load_config(environ={"PUBLIC_BASE_URL": base})
    assert "\n" not in str(refused.value).replace(repr(base), "")


def test_a_blank_cds_auth_keeps_authentication_on():
    assert load_config(environ={"CDS_AUTH": ""})["CDS_AUTH"] is True
