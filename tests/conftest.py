"""Fixtures shared by every test layer: a client signing key, a trusted-clients file, and app factories."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.tokens import SigningKey, clients_document

PUBLIC_BASE_URL = "http://gateway.test"
# Development switches (FHIR_ALLOW_ANONYMOUS, WEBHOOKS_ALLOW_PRIVATE, CDS_AUTH=off) work only on this host.
LOCAL_BASE_URL = "http://localhost:8080"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthea-r4"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="session")
def signing_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def clients_file(tmp_path, signing_key) -> Path:
    path = tmp_path / "clients.json"
    path.write_text(json.dumps(clients_document(signing_key, ["http://127.0.0.1:*", "http://localhost:*"])))
    return path


@pytest.fixture
def make_app(tmp_path, clients_file):
    """Build an application on a fresh SQLite database (migrated with Alembic) under ``tmp_path``."""
    from app import create_app
    from app.db import upgrade

    def factory(**overrides):
        config = {
            "INSTANCE_PATH": str(tmp_path / "instance"),
            "DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}",
            "AUDIT_LOG": str(tmp_path / "audit.jsonl"),
            "CDS_CLIENTS_FILE": str(clients_file),
            "PUBLIC_BASE_URL": PUBLIC_BASE_URL,
            "TESTING": True,
            **overrides,
        }
        upgrade(config["DATABASE_URL"])
        return create_app(config)

    return factory


@pytest.fixture
def audit_records(tmp_path):
    """The audit records written so far, parsed."""

    def read(event: str | None = None) -> list[dict]:
        path = tmp_path / "audit.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [r for r in records if event is None or r["event"] == event]

    return read


@pytest.fixture
def hook_body() -> dict:
    """The project's own patient-view request for cardiovascular-risk, with full prefetch."""
    return json.loads((FIXTURES / "hooks" / "patient-view-cardiovascular-risk.json").read_text())


def require(reason: str | None) -> None:
    """Skip when a test dependency is missing, except in CI, where a skip would hide a broken setup."""
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def fhir_server():
    """The real FHIR R4 test server (Medplum, in-memory) on loopback, for the whole session."""
    from tests.support.fhir_server import FhirTestServer, fhir_server_available

    require(fhir_server_available())
    with FhirTestServer() as server:
        yield server


@pytest.fixture
def bulk(fhir_server):
    """The FHIR test server with its Bulk Data exports and faults reset before and after the test."""
    fhir_server.bulk_reset()
    yield fhir_server
    fhir_server.bulk_reset()


@pytest.fixture(scope="session")
def synthea_dir() -> Path:
    """The shared Synthea sample patients; tests skip when the folder is absent (a checkout outside the team)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def make_httpserver():
    """pytest-httpserver's server, but threaded: a kept-alive connection from one test (our pooled sessions
    keep them) or a deliberately slow handler must not block the next test's requests."""
    from pytest_httpserver import HTTPServer

    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    yield server
    server.clear()
    if server.is_running():
        server.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of the test's own on a spare port, which the test may kill and start again."""
    from tests.support.redis_server import own_redis_server, redis_server_missing

    require(redis_server_missing())
    with own_redis_server(tmp_path) as server:
        yield server
