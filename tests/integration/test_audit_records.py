"""What a caller sends cannot make an audit record long: the endpoints' records are capped (app/audit.py)."""

from __future__ import annotations

from app.audit import MAX_ITEMS, MAX_RECORD_BYTES
from tests.conftest import PUBLIC_BASE_URL

FEEDBACK = "/cds-services/cardiovascular-risk/feedback"


def test_feedback_on_many_cards_writes_a_short_record_saying_the_card_list_was_cut(
    make_app, signing_key, tmp_path, audit_records
):
    entries = [
        {
            "card": f"{n:08d}-3283-4575-ab82-028d55fe2719",
            "outcome": "overridden",
            "outcomeTimestamp": "2026-11-28T10:06:00Z",
        }
        for n in range(300)
    ]
    client = make_app().test_client()
    response = client.post(
        FEEDBACK,
        json={"feedback": entries},
        headers={"Authorization": f"Bearer {signing_key.token(PUBLIC_BASE_URL + FEEDBACK)}"},
    )
    assert response.status_code == 200
    [record] = audit_records("feedback")
    assert record["entries"] == 300
    assert record["cards"] == sorted(e["card"] for e in entries)[:MAX_ITEMS]
    assert record["truncated"] == ["cards"]
    assert all(len(line) < MAX_RECORD_BYTES for line in (tmp_path / "audit.jsonl").read_bytes().splitlines())
