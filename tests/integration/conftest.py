"""Fixtures of the integration tests: the same test on a migrated SQLite file and on a real PostgreSQL database."""

from __future__ import annotations

import pytest

from app.db import make_engine
from tests.conftest import require
from tests.support.databases import postgres_database, postgres_unavailable, sqlite_database


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """A fresh, migrated database of each kind for one test."""
    if request.param == "sqlite":
        yield sqlite_database(tmp_path)
        return
    require(postgres_unavailable())
    with postgres_database() as url:
        yield url


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def ehr(seeded):
    """The SMART EHR double (authorization server and FHIR proxy) in front of the module's ``seeded`` FHIR server,
    consenting to every launch."""
    from tests.support.smart_ehr import SmartEhr

    with SmartEhr(seeded.base_url, fhir_path="/fhir/R4") as double:
        double.consent = "allow"
        yield double
