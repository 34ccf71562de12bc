"""Development-only settings work only while the service is reachable from this host alone."""

from __future__ import annotations

import base64
import json

import pytest

from app.config import ConfigError, load_config
from app.development import DEV_CLIENTS_FILE, is_loopback, off_host_refusal

LOCAL = {"PUBLIC_BASE_URL": "http://localhost:8080", "HOST": "127.0.0.1"}
DEPLOYED = {"PUBLIC_BASE_URL": "https://cds.example.org", "HOST": "0.0.0.0"}  # noqa: S104 - what a deployment binds


@pytest.fixture
def own_clients(tmp_path, signing_key):
    from tests.support.tokens import clients_document

    path = tmp_path / "clients.json"
    path.write_text(json.dumps(clients_document(signing_key, ["https://ehr.example.org/fhir"])))
    return str(path)


def config(**environ) -> dict:
    return load_config(environ={"INSTANCE_PATH": "/tmp/unused-instance", **environ})


def test_the_development_clients_file_starts_on_this_host_as_the_readme_says():
    settings = config(**LOCAL)
    assert settings["CDS_CLIENTS_FILE"] == str(DEV_CLIENTS_FILE)


@pytest.mark.parametrize(
    "where",
    [
        {"PUBLIC_BASE_URL": "https://cds.example.org"},
        {"PUBLIC_BASE_URL": "http://localhost:8080", "HOST": "0.0.0.0"},  # noqa: S104
        {"PUBLIC_BASE_URL": "http://localhost:8080", "HOST": "::"},
        {"PUBLIC_BASE_URL": "http://localhost:8080", "HOST": "10.1.2.3"},
        {"PUBLIC_BASE_URL": "http://gateway.internal:8080", "HOST": "127.0.0.1"},
    ],
)
def test_no_clients_file_off_this_host_refuses_to_start_naming_the_setting(where):
    with pytest.raises(ConfigError) as refused:
        config(**where)
    message = str(refused.value)
    assert message.startswith("CDS_CLIENTS_FILE unset")
    assert "\n" not in message
    assert "reachable from other hosts" in message


@pytest.mark.parametrize(
    ("switch", "named"),
    [
        ({"CDS_AUTH": "off"}, "CDS_AUTH=off"),
        ({"FHIR_ALLOW_ANONYMOUS": "1"}, "FHIR_ALLOW_ANONYMOUS=1"),
        ({"WEBHOOKS_ALLOW_PRIVATE": "1"}, "WEBHOOKS_ALLOW_PRIVATE=1"),
    ],
)
def test_each_development_switch_off_this_host_refuses_to_start(own_clients, switch, named):
    with pytest.raises(ConfigError, match=named):
        config(CDS_CLIENTS_FILE=own_clients, **DEPLOYED, **switch)
    assert config(CDS_CLIENTS_FILE=own_clients, **LOCAL, **switch)  # and works on this host


def test_a_deployment_with_its_own_clients_starts_on_every_interface(own_clients):
    settings = config(CDS_CLIENTS_FILE=own_clients, **DEPLOYED)
    assert settings["HOST"] == "0.0.0.0"  # noqa: S104


def padded(member: str) -> str:
    """The same number, spelled with a leading zero byte."""
    raw = base64.urlsafe_b64decode(member + "=" * (-len(member) % 4))
    return base64.urlsafe_b64encode(b"\x00" + raw).decode().rstrip("=")


def sandbox_client() -> dict:
    return json.loads(DEV_CLIENTS_FILE.read_text())["clients"][0]


def sandbox_key_spelled_otherwise() -> dict:
    key = sandbox_client()["jwks"]["keys"][0]
    return {"keys": [{**key, "x": padded(key["x"])}]}


@pytest.mark.parametrize(
    "client",
    [
        pytest.param({**sandbox_client(), "iss": "https://renamed.example.org"}, id="its key, renamed"),
        pytest.param(
            {
                **sandbox_client(),
                "iss": "https://renamed.example.org",
                "jwks": {
                    "keys": [
                        {**sandbox_client()["jwks"]["keys"][0], "x": padded(sandbox_client()["jwks"]["keys"][0]["x"])}
                    ]
                },
            },
            id="its key, spelled otherwise",
        ),
        pytest.param(
            {"iss": "https://sandbox.cds-hooks.org", "jwks_url": "https://keys.example.org/jwks.json"}, id="its issuer"
        ),
        pytest.param(
            {"iss": "https://renamed.example.org", "jwks_url": "https://sandbox.cds-hooks.org/.well-known/jwks.json"},
            id="its JWKS URL",
        ),
    ],
)
def test_a_clients_file_that_trusts_the_sandbox_is_development_only(tmp_path, client):
    copied = tmp_path / "clients.json"
    copied.write_text(json.dumps({"clients": [client]}))
    with pytest.raises(ConfigError, match="trusts the CDS Hooks Sandbox, whose key is public"):
        config(CDS_CLIENTS_FILE=str(copied), **DEPLOYED)


@pytest.mark.parametrize(
    ("binds", "refused"),
    [
        (["127.0.0.1:8080"], False),
        (["[::1]:8080"], False),
        (["unix:/run/gateway.sock"], True),  # only a proxy calls it, and every caller then looks alike
        (["127.0.0.1:8080", "0.0.0.0:8080"], True),
        (["[::]:8080"], True),
        (["192.168.1.10:8080"], True),
    ],
)
def test_gunicorns_actual_binds_decide_not_only_host(binds, refused):
    settings = config(**LOCAL)
    refusal = off_host_refusal(settings, binds)
    assert (refusal is not None) is refused
    if refused:
        assert "it listens on" in refusal


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST.", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),  # noqa: S104
        ("::", False),
        ("localhost.example.org", False),
        ("10.0.0.1", False),
        ("", False),
        (None, False),
    ],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_with_development_settings_only_callers_on_this_host_are_answered(make_app):
    app = make_app(FHIR_ALLOW_ANONYMOUS="1", PUBLIC_BASE_URL="http://localhost:8080")
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    remote = client.get("/healthz", environ_base={"REMOTE_ADDR": "10.0.0.7"})
    assert remote.status_code == 403
    assert remote.get_json()["resourceType"] == "OperationOutcome"
    assert "FHIR_ALLOW_ANONYMOUS=1" in remote.get_json()["issue"][0]["diagnostics"]
    proxied = client.get("/cds-services", headers={"X-Forwarded-For": "203.0.113.9"})
    assert proxied.status_code == 403


def test_without_development_settings_remote_callers_are_answered(make_app):
    client = make_app().test_client()
    assert client.get("/healthz", environ_base={"REMOTE_ADDR": "10.0.0.7"}).status_code == 200
    assert client.get("/healthz", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 200
