"""One rule for time in every table and module: aware UTC out, and a naive datetime coming in is UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import sqlalchemy as sa

from app.clock import as_utc, utc_now
from app.db import UTCDateTime
from app.smart.keys import KeyStore
from app.webhooks.schedule import retry_after_seconds

PARIS_SUMMER = timezone(timedelta(hours=2))


def test_a_naive_datetime_is_taken_as_utc_and_an_aware_one_is_converted():
    assert as_utc(datetime(2026, 7, 1, 12, 0)) == datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
    converted = as_utc(datetime(2026, 7, 1, 14, 0, tzinfo=PARIS_SUMMER))
    assert converted == datetime(2026, 7, 1, 12, 0, tzinfo=UTC) and converted.tzinfo is UTC


def test_utc_now_gives_the_current_time_aware_or_the_given_time_in_utc():
    before = datetime.now(UTC)
    assert before <= utc_now() <= datetime.now(UTC) and utc_now().tzinfo is UTC
    assert utc_now(datetime(2026, 1, 2, 3, 4)) == datetime(2026, 1, 2, 3, 4, tzinfo=UTC)


def test_the_column_type_stores_naive_as_utc_and_reads_back_aware(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'times.db'}")
    table = sa.Table(
        "times", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True), sa.Column("at", UTCDateTime)
    )
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "at": datetime(2026, 7, 1, 12, 0)}])
        conn.execute(table.insert(), [{"id": 2, "at": datetime(2026, 7, 1, 14, 0, tzinfo=PARIS_SUMMER)}])
        conn.execute(table.insert(), [{"id": 3, "at": None}])
        rows = dict(conn.execute(sa.select(table.c.id, table.c.at)).all())
    noon = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
    assert rows == {1: noon, 2: noon, 3: None}
    assert rows[1].tzinfo is UTC and rows[2].tzinfo is UTC


def test_the_key_store_and_the_retry_after_reading_follow_the_same_rule(tmp_path):
    naive = datetime(2026, 7, 1, 12, 0)
    store = KeyStore(tmp_path / "keys")
    kids = store.generate(now=naive)
    assert kids and all(r.created_at == as_utc(naive) for r in store.records() if r.kid in kids)
    # An HTTP-date is GMT; "now" given naive is UTC as well: ten seconds apart either way.
    assert retry_after_seconds("Wed, 01 Jul 2026 12:00:10 GMT", 60, now=naive) == 10.0
