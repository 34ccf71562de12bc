"""Clinician feedback on cards (R-26..R-28): validated whole, then stored durably in one transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from app.cds.errors import BadHookRequest
from app.cds.request import parse_json_object
from app.db import feedback as feedback_table

OUTCOMES = ("accepted", "overridden")


@dataclass(frozen=True)
class FeedbackEntry:
    card: str
    outcome: str
    accepted_suggestions: list[str]
    override_reason: dict[str, Any] | None
    outcome_timestamp: datetime
    raw: dict[str, Any]


def _rfc3339(value: Any, field: str) -> datetime:
    if not isinstance(value, str):
        raise BadHookRequest(f"{field} must be an RFC 3339 date-time string", field)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadHookRequest(f"{field} is not an RFC 3339 date-time: {value[:40]!r}", field) from None
    if parsed.tzinfo is None or "T" not in value.upper():
        raise BadHookRequest(f"{field} must be a date-time with a time zone (UTC)", field)
    return parsed.astimezone(UTC)


def _string(entry: dict[str, Any], name: str, field: str) -> str:
    value = entry.get(name)
    if not isinstance(value, str) or not value.strip():
        raise BadHookRequest(f"{field} is required and must be a non-empty string", field)
    return value


def _parse_entry(entry: Any, where: str) -> FeedbackEntry:
    if not isinstance(entry, dict):
        raise BadHookRequest(f"{where} must be an object", where)
    card = _string(entry, "card", f"{where}.card")
    outcome = _string(entry, "outcome", f"{where}.outcome")
    if outcome not in OUTCOMES:
        raise BadHookRequest(f"{where}.outcome must be 'accepted' or 'overridden'", f"{where}.outcome")
    suggestions = entry.get("acceptedSuggestions")
    accepted: list[str] = []
    if outcome == "accepted" or suggestions is not None:
        if not isinstance(suggestions, list) or (outcome == "accepted" and not suggestions):
            raise BadHookRequest(
                f"{where}.acceptedSuggestions must be a non-empty array when outcome is accepted",
                f"{where}.acceptedSuggestions",
            )
        for i, item in enumerate(suggestions):
            accepted.append(
                _string(item if isinstance(item, dict) else {}, "id", f"{where}.acceptedSuggestions[{i}].id")
            )
    reason = entry.get("overrideReason")
    if reason is not None:
        field = f"{where}.overrideReason"
        if not isinstance(reason, dict):
            raise BadHookRequest(f"{field} must be an object", field)
        coding = reason.get("reason")
        if coding is not None:
            if not isinstance(coding, dict):
                raise BadHookRequest(f"{field}.reason must be a Coding", f"{field}.reason")
            _string(coding, "code", f"{field}.reason.code")
            _string(coding, "system", f"{field}.reason.system")
        if reason.get("userComment") is not None and not isinstance(reason["userComment"], str):
            raise BadHookRequest(f"{field}.userComment must be a string", f"{field}.userComment")
    return FeedbackEntry(
        card=card,
        outcome=outcome,
        accepted_suggestions=accepted,
        override_reason=reason,
        outcome_timestamp=_rfc3339(entry.get("outcomeTimestamp"), f"{where}.outcomeTimestamp"),
        raw=entry,
    )


def parse_feedback(body: bytes) -> list[FeedbackEntry]:
    """Validate a feedback body; every entry must be valid before any is stored."""
    data = parse_json_object(body)
    entries = data.get("feedback")
    if not isinstance(entries, list) or not entries:
        raise BadHookRequest("feedback is required and must be a non-empty array", "feedback")
    return [_parse_entry(entry, f"feedback[{i}]") for i, entry in enumerate(entries)]


def store_feedback(
    engine: sa.Engine, service_id: str, entries: list[FeedbackEntry], client_iss: str | None, tenant: str | None
) -> None:
    """Store every entry, or none: repeats for the same card are kept, they are distinct clinician actions."""
    now = datetime.now(UTC)
    rows = [
        {
            "service_id": service_id,
            "card_uuid": e.card,
            "outcome": e.outcome,
            "accepted_suggestions": e.accepted_suggestions,
            "override_reason": e.override_reason,
            "outcome_timestamp": e.outcome_timestamp,
            "received_at": now,
            "client_iss": client_iss,
            "tenant": tenant,
            "entry": e.raw,
        }
        for e in entries
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(feedback_table), rows)
