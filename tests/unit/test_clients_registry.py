"""The trusted clients file: validation at load, and the FHIR server allowlist (SSRF guard)."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import pytest

from app.cds.clients import DEV_CLIENTS_FILE, ClientRegistry, TrustedClient

KEYS = Path(__file__).resolve().parents[2] / "fixtures" / "keys"
SANDBOX_ISS = "https://sandbox.cds-hooks.org"
SANDBOX_KID = "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f"


def public_jwks() -> dict:
    return json.loads((KEYS / "test-client.jwks.json").read_text())


def document(**client) -> dict:
    entry = {
        "iss": "https://ehr.example.org",
        "jwks": public_jwks(),
        "fhir_servers": ["https://ehr.example.org/fhir"],
    }
    entry.update(client)
    return {"clients": [{k: v for k, v in entry.items() if v is not None}]}


def load_error(tmp_path: Path, data) -> str:
    path = tmp_path / "clients.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as error:
        ClientRegistry.from_file(path)
    message = str(error.value)
    assert str(path) in message
    return message


@pytest.mark.parametrize(
    "url",
    [
        "https://ehr.example.org/fhir",
        "https://ehr.example.org/fhir/",
        "https://ehr.example.org/fhir/R4",
        "https://ehr.example.org/fhir/Patient?_id=1&_count=5",
        "https://EHR.Example.org/fhir/Patient/1",
        "https://ehr.example.org:443/fhir",
        "HTTPS://ehr.example.org/fhir",
    ],
)
def test_urls_under_an_allowlisted_base_are_allowed(url):
    client = TrustedClient("iss", fhir_servers=("https://ehr.example.org/fhir",))
    assert client.allows_fhir_server(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://ehr.example.org/fhirx",
        "https://ehr.example.org/fhir-evil/Patient",
        "https://ehr.example.org/",
        "https://ehr.example.org.evil/fhir",
        "https://evil.example/fhir",
        "https://ehr.example.org@evil.example/fhir",
        "https://user:pass@ehr.example.org/fhir",
        "http://ehr.example.org/fhir",
        "https://ehr.example.org:8443/fhir",
        "ftp://ehr.example.org/fhir",
        "file:///etc/passwd",
        "gopher://ehr.example.org/fhir",
        "//ehr.example.org/fhir",
        "/fhir/Patient",
        "https://ehr.example.org/fhir/../admin",
        "https://ehr.example.org/fhir/%2e%2e/admin",
        "https://ehr.example.org\\@evil.example/fhir",
        "https://ehr.example.org/fhir/\nPatient",
        "https://ehr.example.org:99999/fhir",
        "",
    ],
)
def test_urls_outside_the_allowlist_are_refused(url):
    client = TrustedClient("iss", fhir_servers=("https://ehr.example.org/fhir",))
    assert not client.allows_fhir_server(url)


@pytest.mark.parametrize(
    "path",
    [
        "/fhir/..%2fevil",
        "/fhir/..%2Fevil",
        "/fhir/%2e%2e%2fevil",
        "/fhir/%2E%2E/evil",
        "/fhir/.%2e/evil",
        "/fhir/%2e/../evil",
        "/fhir/..%5cevil",
        "/fhir/%252e%252e/evil",
        "/fhir/%252fevil",
        "/fhir/..;/evil",
        "/fhir/..%3b/evil",
        "/fhir;x/../evil",
        "/fhir/.../evil",
        "/fhir/...%2fevil",
        "/fhir/..%20/evil",
        "/fhir/..%09/evil",
        "/fhir/..%00/evil",
        "/fhir/%c0%ae%c0%ae/evil",
        "/fhir/%ef%bc%8e%ef%bc%8e/evil",
        "/fhir/Patient%3F_id=1",
        "/fhir/Patient%23x",
    ],
)
def test_escaped_dots_separators_and_parameters_are_not_under_the_base(path):
    """The allowlist compares decoded paths: whatever a server decodes must still be under /fhir."""
    client = TrustedClient("iss", fhir_servers=("https://ehr.example.org/fhir",))
    assert not client.allows_fhir_server("https://ehr.example.org" + path)


@pytest.mark.parametrize("path", ["/%66hir/Patient/1", "/fhir/Patient/a.b", "/fhir/Patient/x.", "/fhir//Patient"])
def test_escaped_letters_and_dots_inside_names_are_compared_decoded(path):
    client = TrustedClient("iss", fhir_servers=("https://ehr.example.org/fhir",))
    assert client.allows_fhir_server("https://ehr.example.org" + path)


@pytest.mark.parametrize(
    "url", ["https://ehr.example.org./fhir", "https://ehr.example.org:0/fhir", "https://ehr.ex\u00e4mple.org/fhir"]
)
def test_other_spellings_of_the_host_are_refused(url):
    client = TrustedClient("iss", fhir_servers=("https://ehr.example.org/fhir",))
    assert not client.allows_fhir_server(url)


@pytest.mark.parametrize(
    "iss",
    [
        "https://ehr.example.org/fhir",
        "https://ehr.example.org/fhir/",
        "HTTPS://EHR.Example.ORG/fhir",
        "https://ehr.example.org:443/fhir",
        "https://ehr.example.org/%66hir",
    ],
)
def test_a_fhir_base_is_named_by_its_normalised_spelling(iss):
    client = TrustedClient("iss", fhir_servers=("https://ehr.example.org/fhir",))
    assert client.fhir_base(iss) == ("https://ehr.example.org/fhir", "https://ehr.example.org/fhir")


@pytest.mark.parametrize(
    "iss",
    [
        "https://ehr.example.org/fhir/R4",
        "https://ehr.example.org/fhir/Patient",
        "https://ehr.example.org/fhir/..%2fevil",
        "https://ehr.example.org",
        "https://ehr.example.org/fhir?x=1",
        "https://ehr.example.org/fhir?",
        "https://ehr.example.org/fhir#",
        "https://ehr.example.org/FHIR",
        "https://ehr.example.org:8443/fhir",
        "http://ehr.example.org/fhir",
        "https://ehr.example.org./fhir",
        "",
    ],
)
def test_a_path_under_a_base_or_another_spelling_is_not_a_fhir_base(iss):
    client = TrustedClient("iss", fhir_servers=("https://ehr.example.org/fhir",))
    assert client.fhir_base(iss) is None


def test_a_wildcard_port_entry_names_that_host_and_path_on_any_port():
    client = TrustedClient("iss", fhir_servers=("http://localhost:*", "http://127.0.0.1:*/fhir/R4"))
    assert client.fhir_base("http://localhost:8103/") == ("http://localhost:8103", "http://localhost:*")
    assert client.fhir_base("http://localhost") == ("http://localhost", "http://localhost:*")
    assert client.fhir_base("http://127.0.0.1:4000/fhir/R4") == (
        "http://127.0.0.1:4000/fhir/R4",
        "http://127.0.0.1:*/fhir/R4",
    )
    assert client.fhir_base("http://localhost:8103/fhir/R4") is None
    assert client.fhir_base("http://127.0.0.1:4000") is None
    assert client.fhir_base("https://localhost:8103") is None


def test_wildcard_port_allows_any_port_on_that_host_and_scheme_only():
    client = TrustedClient("iss", fhir_servers=("http://localhost:*", "http://127.0.0.1:*"))
    assert client.allows_fhir_server("http://localhost:8103/fhir/R4")
    assert client.allows_fhir_server("http://localhost/fhir")
    assert client.allows_fhir_server("http://127.0.0.1:4000")
    assert not client.allows_fhir_server("https://localhost:8103/fhir")
    assert not client.allows_fhir_server("http://localhost.evil:8103/fhir")
    assert not client.allows_fhir_server("http://10.0.0.1:8103/fhir")


def test_client_without_fhir_servers_allows_none():
    assert not TrustedClient("iss").allows_fhir_server("https://ehr.example.org/fhir")


def test_dev_clients_file_trusts_the_sandbox_with_its_pinned_key():
    sandbox = ClientRegistry.from_file(DEV_CLIENTS_FILE).get(SANDBOX_ISS)
    assert sandbox is not None
    assert sandbox.jwks_url is None
    assert [k["kid"] for k in sandbox.jwks["keys"]] == [SANDBOX_KID]
    pinned = Path(__file__).resolve().parents[3] / "shared" / "spec" / "sandbox-jwks.json"
    if pinned.exists():
        assert sandbox.jwks == json.loads(pinned.read_text())


def test_dev_clients_file_allows_localhost_and_the_sandbox_fhir_servers_only():
    sandbox = ClientRegistry.from_file(DEV_CLIENTS_FILE).get(SANDBOX_ISS)
    assert sandbox.allows_fhir_server("http://localhost:8080/fhir")
    assert sandbox.allows_fhir_server("http://127.0.0.1:9999/baseR4/Patient/1")
    assert sandbox.allows_fhir_server("https://launch.smarthealthit.org/v/r4/fhir/Patient/smart-1288992")
    assert sandbox.allows_fhir_server("https://r4.smarthealthit.org/Observation?patient=1")
    assert not sandbox.allows_fhir_server("https://launch.smarthealthit.org/v/r3/fhir")
    assert not sandbox.allows_fhir_server("https://hapi.fhir.org/baseR4")


def test_registry_finds_clients_by_exact_issuer_and_iterates_in_file_order():
    data = document()
    data["clients"].append({"iss": "https://other.example.org", "jwks_url": "https://other.example.org/jwks"})
    registry = ClientRegistry.from_mapping(data)
    assert registry.get("https://ehr.example.org").tenant is None
    assert registry.get("https://ehr.example.org/") is None
    assert registry.get("https://unknown.example") is None
    assert [c.iss for c in registry] == ["https://ehr.example.org", "https://other.example.org"]


SECRET = "whsec_" + base64.b64encode(b"a webhook secret of 32 bytes....").decode()


def test_a_full_client_entry_loads_every_member():
    data = document(
        tenant="north-hospital",
        smart_backend={
            "token_url": "https://ehr.example.org/token",
            "client_id": "gw",
            "scope": "system/*.rs",
        },
        webhooks=[{"url": "https://hooks.example.org/in", "secret": SECRET, "events": ["job.completed"]}],
    )
    client = ClientRegistry.from_mapping(data).get("https://ehr.example.org")
    assert client.tenant == "north-hospital"
    assert client.smart_backend["client_id"] == "gw"
    assert client.webhooks[0]["events"] == ["job.completed"]
    assert SECRET not in repr(client)


def test_both_jwks_and_jwks_url_is_an_error_naming_the_client(tmp_path):
    message = load_error(tmp_path, document(jwks_url="https://ehr.example.org/jwks"))
    assert "clients[0]" in message and "exactly one" in message


def test_neither_jwks_nor_jwks_url_is_an_error(tmp_path):
    assert "exactly one" in load_error(tmp_path, document(jwks=None))


def test_relative_jwks_url_is_an_error_naming_the_field(tmp_path):
    data = document(jwks=None)
    data["clients"].append({"iss": "https://b.example", "jwks_url": "/jwks.json"})
    data["clients"][0]["jwks_url"] = "https://a.example/jwks.json"
    assert "clients[1].jwks_url" in load_error(tmp_path, data)


def test_duplicate_issuer_is_an_error_naming_both_entries(tmp_path):
    data = document()
    data["clients"].append(copy.deepcopy(data["clients"][0]))
    message = load_error(tmp_path, data)
    assert "clients[1].iss" in message and "clients[0]" in message


@pytest.mark.parametrize("member", ["d", "p", "q"])
def test_private_key_material_in_jwks_is_an_error_naming_the_member(tmp_path, member):
    data = document()
    data["clients"][0]["jwks"]["keys"][1][member] = "AAAA"
    assert f"clients[0].jwks.keys[1].{member}" in load_error(tmp_path, data)


def test_symmetric_key_in_jwks_is_an_error(tmp_path):
    data = document(jwks={"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]})
    assert "clients[0].jwks.keys[0].k" in load_error(tmp_path, data)


@pytest.mark.parametrize("jwks", [{}, {"keys": []}, {"keys": "x"}, [], "https://ehr.example.org/jwks"])
def test_jwks_that_is_not_a_jwk_set_with_keys_is_an_error(tmp_path, jwks):
    assert "clients[0].jwks" in load_error(tmp_path, document(jwks=jwks))


def test_jwk_without_kid_is_an_error(tmp_path):
    data = document()
    del data["clients"][0]["jwks"]["keys"][0]["kid"]
    assert "clients[0].jwks.keys[0].kid" in load_error(tmp_path, data)


def test_jwk_declaring_a_symmetric_alg_is_an_error(tmp_path):
    data = document()
    data["clients"][0]["jwks"]["keys"][0]["alg"] = "HS256"
    assert "clients[0].jwks.keys[0]" in load_error(tmp_path, data)


def test_relative_fhir_server_is_an_error_naming_its_index(tmp_path):
    message = load_error(tmp_path, document(fhir_servers=["https://ehr.example.org/fhir", "ehr/fhir"]))
    assert "clients[0].fhir_servers[1]" in message


def test_fhir_server_with_user_info_is_an_error(tmp_path):
    assert "fhir_servers[0]" in load_error(tmp_path, document(fhir_servers=["https://ehr@evil.example/"]))


def test_misspelt_member_is_an_error_naming_it(tmp_path):
    assert "clients[0].fhir_server" in load_error(tmp_path, document(fhir_server=["https://ehr.example.org"]))


def test_webhook_without_secret_is_an_error_naming_it(tmp_path):
    data = document(webhooks=[{"url": "https://hooks.example.org/in", "events": ["job.completed"]}])
    assert "clients[0].webhooks[0].secret" in load_error(tmp_path, data)


def test_smart_backend_with_relative_token_url_is_an_error(tmp_path):
    data = document(smart_backend={"token_url": "/token", "client_id": "gw", "scope": "system/*.rs"})
    assert "clients[0].smart_backend.token_url" in load_error(tmp_path, data)


def test_file_that_is_not_json_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "clients.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="clients.json.*not valid JSON"):
        ClientRegistry.from_file(path)


def test_missing_file_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match="nowhere.json"):
        ClientRegistry.from_file(tmp_path / "nowhere.json")


def test_document_without_clients_array_is_an_error(tmp_path):
    assert "clients" in load_error(tmp_path, {"client": []})


@pytest.mark.parametrize(("member", "value"), [("iss", "https://x.example/" + "a" * 500), ("tenant", "t" * 201)])
def test_issuers_and_tenants_fit_the_columns_that_store_them(member, value):
    from tests.support.tokens import SigningKey, clients_document

    document = clients_document(SigningKey.generate(), [])
    document["clients"][0][member] = value
    with pytest.raises(ValueError, match=f"clients\\[0\\].{member}: must be printable and at most"):
        ClientRegistry.from_mapping(document)
