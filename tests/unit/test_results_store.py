"""The store of AI results that cards link to: save and load, expiry, unknown ids, and ids that say nothing."""

from __future__ import annotations

import importlib.util
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from app import results
from app.db import make_engine, upgrade

NOW = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)


@pytest.fixture
def engine(tmp_path):
    url = f"sqlite:///{tmp_path / 'results.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def save(engine, data=None, *, ttl=3600, now=NOW, kind="cardiovascular-risk", patient="pat-1"):
    return results.save(
        engine,
        kind,
        {"risk": 0.054} if data is None else data,
        client_iss="https://ehr.example/cds",
        fhir_server="https://ehr.example/fhir",
        patient_id=patient,
        ttl_seconds=ttl,
        now=now,
    )


def test_a_saved_result_loads_with_everything_it_was_saved_with(engine):
    data = {"risk": 0.054, "inputs": [{"name": "hdl", "value": 40.0, "date": "2026-06-02"}], "fallback": False}
    result_id = save(engine, data)
    loaded = results.load(engine, result_id, now=NOW + timedelta(minutes=5))
    assert loaded == results.StoredResult(
        id=result_id,
        kind="cardiovascular-risk",
        client_iss="https://ehr.example/cds",
        fhir_server="https://ehr.example/fhir",
        patient_id="pat-1",
        data=data,
        created_at=NOW,
        expires_at=NOW + timedelta(hours=1),
    )
    assert loaded.created_at.tzinfo is not None
    with pytest.raises(AttributeError):
        loaded.kind = "job"  # frozen


def test_a_job_result_keeps_its_job_id(engine):
    result_id = save(engine, {"job_id": "discharge-summary:enc-1"}, kind="discharge-summary")
    assert results.load(engine, result_id, now=NOW).data == {"job_id": "discharge-summary:enc-1"}


def test_an_expired_result_is_gone_and_one_just_before_expiry_is_not(engine):
    result_id = save(engine, ttl=60)
    assert results.load(engine, result_id, now=NOW + timedelta(seconds=59)) is not None
    assert results.load(engine, result_id, now=NOW + timedelta(seconds=60)) is None
    assert results.load(engine, result_id, now=NOW + timedelta(days=2)) is None


def test_an_unknown_or_malformed_id_is_none(engine):
    save(engine)
    assert results.load(engine, "no-such-result", now=NOW) is None
    assert results.load(engine, "", now=NOW) is None
    assert results.load(engine, "x" * 1000, now=NOW) is None
    assert results.load(engine, "' OR 1=1 --", now=NOW) is None


def test_ids_are_random_url_safe_and_carry_no_patient_data(engine):
    ids = {save(engine, patient="pat-1") for _ in range(50)}
    assert len(ids) == 50
    for result_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", result_id)  # 16 random bytes, base64url without padding
        assert "pat" not in result_id.lower()


def test_purge_removes_only_expired_results(engine):
    old, fresh = save(engine, ttl=60), save(engine, ttl=7200)
    assert results.purge_expired(engine, now=NOW + timedelta(hours=1)) == 1
    with engine.connect() as conn:
        left = conn.execute(sa.select(results.ai_results.c.id)).scalars().all()
    assert left == [fresh] and old not in left


def test_a_naive_time_is_utc_and_kinds_must_be_known(engine):
    rid = save(engine, now=datetime(2026, 12, 1, 9, 30))
    assert results.load(engine, rid, now=NOW).created_at == datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    with pytest.raises(ValueError):
        save(engine, kind="something-else")


def test_the_migration_creates_the_table_at_revision_0004(engine):
    with engine.connect() as conn:
        assert "ai_results" in sa.inspect(conn).get_table_names()
    path = Path(results.__file__).parent / "migrations" / "versions" / "0004_ai_results.py"
    spec = importlib.util.spec_from_file_location("m0004", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (module.revision, module.down_revision) == ("0004", "0003")


def test_the_background_writer_stores_what_it_was_given_in_batches(engine):
    writer = results.ResultWriter(engine, batch=50)
    ids = [
        writer.submit(
            "discharge-summary", {"job_id": str(i)}, client_iss=None, fhir_server=None, patient_id="p", ttl_seconds=60
        )
        for i in range(120)
    ]
    writer.flush()
    assert [results.load(engine, i).data["job_id"] for i in ids] == [str(i) for i in range(120)]


def test_a_full_writer_queue_costs_the_link_not_the_card(engine, monkeypatch):
    writer = results.ResultWriter(engine, max_queued=1)
    monkeypatch.setattr(writer, "_start", lambda: None)  # nothing drains the queue
    first = writer.submit("discharge-summary", {}, client_iss=None, fhir_server=None, patient_id=None, ttl_seconds=60)
    second = writer.submit("discharge-summary", {}, client_iss=None, fhir_server=None, patient_id=None, ttl_seconds=60)
    assert first is not None and second is None


# --- storable by construction (issue 9, item 5) ----------------------------------------------------------------


def not_stored(reason: str) -> float:
    return REGISTRY.get_sample_value("gateway_results_not_stored_total", {"reason": reason}) or 0.0


def submit(writer, *, patient_id="p", fhir_server="https://ehr.example/fhir", data=None):
    return writer.submit(
        "cardiovascular-risk",
        {"risk": 0.05} if data is None else data,
        client_iss="https://ehr.example/cds",
        fhir_server=fhir_server,
        patient_id=patient_id,
        ttl_seconds=60,
    )


@pytest.mark.parametrize(
    "member",
    [
        {"patient_id": "gw-test\x00patient"},
        {"patient_id": "x\ud800y"},
        {"fhir_server": "https://ehr.example/fhir\x00"},
        {"fhir_server": "https://ehr.example/" + "f" * 5000},
        {"data": {"risk": object()}},
        {"data": {"inputs": {1, 2}}},
        {"data": {"note": "\udfff"}},
    ],
    ids=["nul-patient", "surrogate-patient", "nul-server", "long-server", "object", "set", "surrogate-in-data"],
)
def test_a_result_that_cannot_be_stored_gets_no_link_and_is_reported(engine, member, caplog):
    writer = results.ResultWriter(engine)
    before = not_stored("unstorable")

    assert submit(writer, **member) is None

    assert not_stored("unstorable") == before + 1
    (record,) = [r for r in caplog.records if r.levelname == "ERROR" and r.name == "app.results"]
    assert "without the explanation link" in record.getMessage()
    assert "gw-test" not in record.getMessage() and "ehr.example" not in record.getMessage()


def test_result_data_is_stored_as_plain_json(engine):
    writer = results.ResultWriter(engine)
    data = {"risk": float("nan"), "upper": float("inf"), "made_at": NOW, "inputs": ("hdl", 40), "note": "a\x00b"}

    result_id = submit(writer, data=data)
    assert writer.flush()

    assert results.load(engine, result_id).data == {
        "risk": None,
        "upper": None,
        "made_at": "2026-12-01T09:30:00+00:00",
        "inputs": ["hdl", 40],
        "note": "a\x00b",
    }


@pytest.mark.parametrize("result_id", ["a\x00" * 11, "%00" + "a" * 19, "a" * 21, "a" * 23, "a/" * 11, None, 42])
def test_only_ids_the_store_can_make_are_looked_up(engine, result_id):
    assert results.load(engine, result_id) is None


def lost_at_exit() -> float:
    return REGISTRY.get_sample_value("gateway_results_not_stored_total", {"reason": "lost-at-exit"}) or 0.0


def queue_one(writer) -> str:
    return writer.submit(
        "cardiovascular-risk", {"x": 1}, client_iss=None, fhir_server=None, patient_id="p", ttl_seconds=60
    )


def test_closing_at_exit_writes_what_is_queued(engine):
    writer = results.ResultWriter(engine)
    ids = [queue_one(writer) for _ in range(20)]
    writer.close(timeout=5)
    assert all(results.load(engine, result_id) is not None for result_id in ids)


def test_what_cannot_be_written_before_exit_is_counted_as_lost(engine, tmp_path, caplog):
    import sqlite3

    writer = results.ResultWriter(engine)
    holder = sqlite3.connect(tmp_path / "results.db", timeout=0, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # the database is locked past the process's last moments
    try:
        before = lost_at_exit()
        queue_one(writer)
        writer.close(timeout=0.3)
        assert lost_at_exit() - before == 1
        assert "not written before the process exited" in caplog.text
    finally:
        holder.rollback()
