"""`gateway dev client` / `dev token` / `dev demo`: files, tokens the service's own verifier accepts, clear errors."""

from __future__ import annotations

import json
import shlex

import jwt
import pytest

from app import devtools
from app.cds.auth import ClientAuthenticator
from app.cds.clients import ClientRegistry
from app.cds.errors import ClientNotTrusted
from app.cds.replay import MemoryReplayCache
from app.config import ConfigError, load_config
from app.development import DEVELOPMENT_MARK, development_settings
from tests.support.files import mode
from tests.support.processes import free_port

BASE = "http://localhost:8080"
SERVICE = "/cds-services/cardiovascular-risk"


@pytest.fixture
def app(make_app):
    app = make_app(PUBLIC_BASE_URL=BASE)
    if "dev" not in app.cli.commands:
        devtools.init_cli(app)
    return app


def dev(app, *args: str):
    return app.test_cli_runner().invoke(args=["dev", *args])


@pytest.fixture
def folder(tmp_path):
    return tmp_path / "instance" / "dev-client"


def test_dev_client_writes_a_private_key_and_a_clients_file_the_service_loads(app, folder):
    result = dev(app, "client")
    assert result.exit_code == 0, result.output
    assert mode(folder) == 0o700
    assert mode(folder / devtools.KEY_FILE) == 0o600
    assert mode(folder / devtools.CLIENTS_FILE) == 0o600
    (client,) = ClientRegistry.from_file(folder / devtools.CLIENTS_FILE)
    assert client.iss == devtools.DEV_ISSUER
    assert client.allows_fhir_server("http://127.0.0.1:8081/fhir/R4")
    assert client.allows_fhir_server("http://localhost:9000/fhir")
    assert not client.allows_fhir_server("https://ehr.example.org/fhir")
    assert f"CDS_CLIENTS_FILE={folder / devtools.CLIENTS_FILE} make run" in result.output


def test_dev_client_run_again_reuses_the_key_and_new_rotates_it(app, folder):
    dev(app, "client")
    key, clients = (folder / devtools.KEY_FILE).read_bytes(), (folder / devtools.CLIENTS_FILE).read_text()
    again = dev(app, "client")
    assert "reused" in again.output
    assert (folder / devtools.KEY_FILE).read_bytes() == key
    assert (folder / devtools.CLIENTS_FILE).read_text() == clients
    rotated = dev(app, "client", "--new")
    assert rotated.exit_code == 0 and ", new)" in rotated.output
    assert (folder / devtools.KEY_FILE).read_bytes() != key
    assert json.loads((folder / devtools.CLIENTS_FILE).read_text()) != json.loads(clients)


def test_the_printed_token_passes_the_services_own_verification_once(app, folder):
    output = dev(app, "client").output
    token = output.split("Authorization: Bearer ")[1].split("'")[0]
    authenticator = ClientAuthenticator(
        ClientRegistry.from_file(folder / devtools.CLIENTS_FILE), BASE, MemoryReplayCache()
    )
    principal = authenticator.authenticate(f"Bearer {token}", SERVICE)
    assert principal.iss == devtools.DEV_ISSUER
    with pytest.raises(ClientNotTrusted) as replayed:
        authenticator.authenticate(f"Bearer {token}", SERVICE)
    assert replayed.value.reason == "replayed_jti"


def test_dev_token_is_fresh_each_time_and_shaped_as_cds_hooks_asks(app):
    dev(app, "client")
    first, second = (dev(app, "token").output.strip() for _ in range(2))
    header = jwt.get_unverified_header(first)
    claims, other = (jwt.decode(t, options={"verify_signature": False}) for t in (first, second))
    assert header["alg"] == "ES384" and header["typ"] == "JWT" and header["kid"]
    assert claims["iss"] == claims["sub"] == devtools.DEV_ISSUER
    assert claims["aud"] == BASE + SERVICE
    assert claims["exp"] - claims["iat"] == 300
    assert claims["jti"] != other["jti"]


def test_dev_token_names_the_fix_when_there_is_no_client_or_no_such_service(app):
    missing = dev(app, "token")
    assert missing.exit_code == 1
    assert "run `gateway dev client` first" in missing.output
    dev(app, "client")
    unknown = dev(app, "token", "no-such-service")
    assert unknown.exit_code == 1
    assert "no service 'no-such-service'" in unknown.output and "cardiovascular-risk" in unknown.output


def test_a_clients_file_made_by_dev_client_is_a_development_setting(app, folder):
    dev(app, "client")
    path = folder / devtools.CLIENTS_FILE
    switches = {"CDS_AUTH": True, "FHIR_ALLOW_ANONYMOUS": False, "WEBHOOKS_ALLOW_PRIVATE": False}
    [found] = development_settings({"CDS_CLIENTS_FILE": str(path), **switches})
    assert "gateway dev client" in found
    with pytest.raises(ConfigError) as refused:
        load_config(
            environ={"INSTANCE_PATH": str(folder.parent), "CDS_CLIENTS_FILE": str(path)},
            overrides={"PUBLIC_BASE_URL": "https://cds.example.org"},
        )
    assert "gateway dev client" in str(refused.value) and "reachable from other hosts" in str(refused.value)

    unmarked = json.loads(path.read_text())
    for marked in (unmarked, *unmarked["clients"]):
        del marked[DEVELOPMENT_MARK]
    path.write_text(json.dumps(unmarked))
    assert development_settings({"CDS_CLIENTS_FILE": str(path), **switches}) == []


def test_the_curl_command_quotes_what_the_shell_would_split(tmp_path):
    request = tmp_path / "it's a request.json"
    command = devtools.curl_command("http://localhost:8080/cds-services/x", devtools.signed_header("a.b.c"), request)
    words = shlex.split(command.replace("\\\n", ""))
    assert words[words.index("--data") + 1] == f"@{request}"
    assert "Authorization: Bearer a.b.c" in words


def test_the_demo_without_the_synthea_data_says_where_it_looked(app, tmp_path):
    dev(app, "client")
    result = dev(app, "demo", "--data", str(tmp_path / "no-shared"))
    assert result.exit_code == 1
    assert f"no Synthea sample patients at {tmp_path / 'no-shared'}" in result.output
    assert "Traceback" not in result.output


def test_the_demo_without_a_running_gateway_says_how_to_start_it(app, synthea_dir):
    dev(app, "client")
    base = f"http://localhost:{free_port()}"
    result = dev(app, "demo", "--base-url", base)
    assert result.exit_code == 1
    assert f"the gateway is not answering at {base}: start it with `CDS_CLIENTS_FILE=" in result.output
    assert "make run`" in result.output and "Traceback" not in result.output
