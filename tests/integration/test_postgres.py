"""The same schema and feedback storage on a real PostgreSQL server, as when DATABASE_URL points there."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
import sqlalchemy as sa

from app.db import engine, feedback
from tests.conftest import PUBLIC_BASE_URL, require
from tests.support.databases import ADMIN_URL, postgres_unavailable


@pytest.fixture
def database_url():
    """A fresh database for one test, dropped afterwards."""
    require(postgres_unavailable())
    name = f"gateway_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_feedback_is_stored_in_postgresql(make_app, database_url, signing_key):
    app = make_app(DATABASE_URL=database_url)
    assert app.extensions["db"].dialect.name == "postgresql"
    path = "/cds-services/cardiovascular-risk/feedback"
    body = {
        "feedback": [
            {
                "card": "c-1",
                "outcome": "overridden",
                "outcomeTimestamp": "2026-11-28T10:00:00Z",
                "overrideReason": {"reason": {"system": "urn:example", "code": "declined"}},
            },
            {
                "card": "c-2",
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": "s-1"}],
                "outcomeTimestamp": "2026-11-28T10:00:01+02:00",
            },
        ]
    }
    token = signing_key.token(PUBLIC_BASE_URL + path)
    response = app.test_client().post(
        path, data=json.dumps(body), headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    )
    assert response.status_code == 200
    with engine(app).connect() as conn:
        rows = conn.execute(sa.select(feedback).order_by(feedback.c.id)).all()
    assert [(r.card_uuid, r.outcome) for r in rows] == [("c-1", "overridden"), ("c-2", "accepted")]
    assert rows[1].outcome_timestamp.isoformat() == "2026-11-28T08:00:01+00:00"
    assert rows[0].override_reason["reason"]["code"] == "declined"


def test_readiness_reports_postgresql(make_app, database_url):
    client = make_app(DATABASE_URL=database_url).test_client()
    assert client.get("/readyz").get_json()["checks"]["database"] == "ok"
