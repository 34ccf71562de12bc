"""Clinician feedback on cards (R-26..R-28): validated whole, then stored durably in one transaction."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa

from app.cds.errors import BadHookRequest
from app.cds.request import CONTROL, MAX_URL, parse_json_object
from app.db import feedback as feedback_table

OUTCOMES = ("accepted", "overridden")
# RFC 3339 section 5.6 date-time: no week dates, ordinal dates or basic format (which fromisoformat accepts); the
# fraction of a second may have any number of digits (time-secfrac), of which microseconds are kept.
RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII)
MAX_ID = 200  # card_uuid's column; ids of suggestions and reason codes are held to the same
# Free text may have tabs and line breaks, never other control characters (NUL included).
TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class FeedbackEntry:
    card: str
    outcome: str
    accepted_suggestions: list[str]
    override_reason: dict[str, Any] | None
    outcome_timestamp: datetime
    raw: dict[str, Any]


def _rfc3339(value: Any, field: str) -> datetime:
    """An RFC 3339 date-time with its offset, in UTC; a leap second (:60) is read as :59."""
    if not isinstance(value, str):
        raise BadHookRequest(f"{field} must be an RFC 3339 date-time string", field)
    match = RFC3339.fullmatch(value)
    if match is None:
        if RFC3339.fullmatch(value + "Z") or re.fullmatch(r"\d{4}-\d{2}-\d{2}", value, re.ASCII):
            raise BadHookRequest(f"{field} must be a date-time with a time zone (UTC)", field)
        raise BadHookRequest(f"{field} is not an RFC 3339 date-time such as 2021-12-11T10:05:31Z", field)
    day, minutes, seconds, fraction, offset = match.groups()
    fraction = (fraction or "")[:7]  # datetime keeps microseconds
    offset = "+00:00" if offset.upper() == "Z" else offset
    seconds = "59" if seconds == "60" else seconds
    try:
        parsed = datetime.fromisoformat(f"{day}T{minutes}:{seconds}{fraction}{offset}")
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # 2020-13-45, +24:00, or year 1 east of UTC (before the first instant)
        raise BadHookRequest(f"{field} is not a valid date-time between years 1 and 9999 (UTC)", field) from None


def _string(entry: dict[str, Any], name: str, field: str, max_length: int = MAX_ID) -> str:
    """A non-empty identifier: at most ``max_length`` characters, no control characters (they cannot be stored)."""
    value = entry.get(name)
    if not isinstance(value, str) or not value.strip():
        raise BadHookRequest(f"{field} is required and must be a non-empty string", field)
    if len(value) > max_length or CONTROL.search(value):
        raise BadHookRequest(f"{field} must be at most {max_length} characters, without control characters", field)
    return value


def _parse_entry(entry: Any, where: str) -> FeedbackEntry:
    if not isinstance(entry, dict):
        raise BadHookRequest(f"{where} must be an object", where)
    try:
        orjson.dumps(entry)  # the entry is stored whole; orjson stops at 255 levels, well before the database
    except orjson.JSONEncodeError:
        raise BadHookRequest(f"{where} is nested too deeply to be stored", where) from None
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
            _string(coding, "system", f"{field}.reason.system", max_length=MAX_URL)
        comment = reason.get("userComment")
        if comment is not None and (not isinstance(comment, str) or TEXT_CONTROL.search(comment)):
            raise BadHookRequest(
                f"{field}.userComment must be text (line breaks and tabs allowed, no other control characters)",
                f"{field}.userComment",
            )
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
