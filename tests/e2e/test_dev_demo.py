"""`gateway dev demo`: Synthea patients into a local FHIR server, one real call to the running gateway for each."""

from __future__ import annotations

import json
import re
import socket
from urllib.parse import urlsplit

import pytest

from app import devtools
from tests.conftest import require
from tests.support.fhir_server import FhirTestServer, fhir_server_available
from tests.support.processes import free_port, gunicorn

CARD_LINE = re.compile(r"^(?P<id>[0-9a-f-]{36})  (?:female|male)\s+\d+\s+\d+ ms  \[(?:info|warning|critical)\] .+risk")


def invoke(app, *args: str):
    if "dev" not in app.cli.commands:
        devtools.init_cli(app)
    return app.test_cli_runner().invoke(args=["dev", *args])


def serve_env(tmp_path, base: str, clients_file) -> dict[str, str]:
    """The environment `make run` would have: the command's instance folder and database."""
    return {
        "PUBLIC_BASE_URL": base,
        "CDS_CLIENTS_FILE": str(clients_file),
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}",
        "AUDIT_LOG": str(tmp_path / "audit.jsonl"),
        "HOST": "127.0.0.1",
    }


def listening(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((parts.hostname, parts.port)) == 0


@pytest.fixture
def dev_app(make_app, synthea_dir):
    require(fhir_server_available())
    port = free_port()
    app = make_app(PUBLIC_BASE_URL=f"http://localhost:{port}")
    client = invoke(app, "client")
    assert client.exit_code == 0, client.output
    return app, port


def bundle_patient(path) -> dict:
    return next(
        e["resource"] for e in json.loads(path.read_text())["entry"] if e["resource"]["resourceType"] == "Patient"
    )


@pytest.mark.slow
def test_the_demo_prints_a_card_for_each_synthea_patient_and_stops_its_fhir_server(dev_app, tmp_path, synthea_dir):
    app, port = dev_app
    clients_file = tmp_path / "instance" / "dev-client" / "clients.json"
    with gunicorn(serve_env(tmp_path, f"http://localhost:{port}", clients_file), port):
        result = invoke(app, "demo", "--patients", "3")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if CARD_LINE.match(line)]
    assert len(lines) == 3, result.output
    patients = [bundle_patient(f) for f in devtools.pick_patients(synthea_dir, 3)]
    assert [CARD_LINE.match(line)["id"] for line in lines] == [p["id"] for p in patients]
    for patient in patients:  # ids, sex and age only: no names
        assert patient["name"][0]["family"] not in result.output
    fhir_base = re.search(r"into (http://127\.0\.0\.1:\d+/fhir/R4)", result.output)[1]
    assert not listening(fhir_base), "the demo's FHIR server is still running"


@pytest.mark.slow
def test_the_demo_loads_into_a_fhir_server_given_as_a_standard_transaction(dev_app, tmp_path):
    app, port = dev_app
    clients_file = tmp_path / "instance" / "dev-client" / "clients.json"
    with FhirTestServer() as fhir, gunicorn(serve_env(tmp_path, f"http://localhost:{port}", clients_file), port):
        result = invoke(app, "demo", "--patients", "2", "--fhir-server", fhir.base_url)
        assert result.exit_code == 0, result.output
        ids = [m["id"] for m in map(CARD_LINE.match, result.output.splitlines()) if m]
        assert len(ids) == 2, result.output
        for patient_id in ids:  # where the server put them: it assigns ids to a transaction's creates
            assert fhir.get_json(f"Patient/{patient_id}")["id"] == patient_id


@pytest.mark.slow
def test_a_gateway_that_does_not_trust_the_dev_client_is_named_with_the_fix(dev_app, tmp_path, clients_file):
    app, port = dev_app
    with gunicorn(serve_env(tmp_path, f"http://localhost:{port}", clients_file), port):
        result = invoke(app, "demo", "--patients", "1")
    assert result.exit_code == 1
    assert "refused the development client (401" in result.output
    assert "CDS_CLIENTS_FILE=" in result.output and "make run" in result.output
    assert "Traceback" not in result.output
