"""On PostgreSQL, a result row that the database refuses for its size (SQLSTATE class 54, program limit
exceeded, raised as an OperationalError) costs only its own link: the writer does not take it for a database
that is busy or down, so the cards of every other hook keep their links meanwhile."""

from __future__ import annotations

import random
import time

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from app import results
from app.db import make_engine
from tests.conftest import require
from tests.support.databases import postgres_database, postgres_unavailable


@pytest.fixture
def engine():
    require(postgres_unavailable())
    with postgres_database() as url:
        engine = make_engine(url)
        with engine.begin() as conn:  # an index an operator added: its rows are limited to about 2.7 kB
            conn.execute(sa.text("CREATE INDEX ix_ai_results_client_iss ON ai_results (client_iss)"))
        yield engine
        engine.dispose()


def rejected() -> float:
    return REGISTRY.get_sample_value("gateway_results_not_stored_total", {"reason": "rejected"}) or 0.0


def submit(writer: results.ResultWriter, client_iss: str) -> str | None:
    return writer.submit(
        "cardiovascular-risk", {}, client_iss=client_iss, fhir_server=None, patient_id="p", ttl_seconds=600
    )


def test_a_row_too_large_for_an_index_is_dropped_alone_and_other_cards_keep_their_links(engine):
    too_large = "".join(chr(random.randint(0x4E00, 0x9FFF)) for _ in range(results.MAX_TEXT))  # ~6 kB, incompressible
    writer = results.ResultWriter(engine)
    before = rejected()
    ids = [submit(writer, too_large if i == 3 else f"https://ehr-{i}.test") for i in range(10)]

    later, deadline = [], time.monotonic() + 1.5
    while time.monotonic() < deadline:  # hooks answered while the writer deals with the refused row
        assert writer.reachable
        later.append(submit(writer, "https://ehr-later.test"))
        time.sleep(0.05)
    assert writer.flush(timeout=10)

    assert all(later) and all(results.load(engine, result_id) for result_id in later)
    stored = [i for i, result_id in enumerate(ids) if results.load(engine, result_id) is not None]
    assert stored == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert rejected() == before + 1
