"""Feedback (R-26, R-27): parse_feedback validates the whole body; store_feedback stores every entry or none."""

from __future__ import annotations

import copy
import dataclasses
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from app.cds.errors import BadHookRequest
from app.cds.feedback import parse_feedback, store_feedback
from app.db import feedback as feedback_table
from app.db import make_engine, upgrade

# The three examples of the CDS Hooks 2.0.1 "Feedback" section.
ACCEPTED = {
    "card": "4e0a3a1e-3283-4575-ab82-028d55fe2719",
    "outcome": "accepted",
    "acceptedSuggestions": [{"id": "e56e1945-20b3-4393-8503-a1a20fd73152"}],
    "outcomeTimestamp": "2021-12-11T10:05:31Z",
}
OVERRIDDEN = {
    "card": "f6b95768-b1c8-40dc-8385-bf3504b82ffb",
    "outcome": "overridden",
    "outcomeTimestamp": "2020-12-11T00:00:00Z",
}
OVERRIDDEN_WITH_REASON = {
    "card": "9368d37b-283f-44a0-93ea-547cebab93ed",
    "outcome": "overridden",
    "overrideReason": {
        "reason": {"code": "d7ecf885", "system": "https://example.com/cds-hooks/override-reason-system"},
        "userComment": "A comment entered by the clinician.",
    },
    "outcomeTimestamp": "2020-12-11T00:00:00Z",
}


def body(*entries: Any) -> bytes:
    return orjson.dumps({"feedback": list(entries)})


def entry(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of ``base`` with ``changes``; a change to ``...`` removes the member."""
    out = copy.deepcopy(base)
    for name, value in changes.items():
        if value is ...:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def rejected(raw: bytes) -> BadHookRequest:
    with pytest.raises(BadHookRequest) as info:
        parse_feedback(raw)
    return info.value


# --- valid feedback ---------------------------------------------------------------------------------------------


def test_spec_example_of_an_accepted_suggestion_is_parsed():
    [parsed] = parse_feedback(body(ACCEPTED))

    assert parsed.card == "4e0a3a1e-3283-4575-ab82-028d55fe2719"
    assert parsed.outcome == "accepted"
    assert parsed.accepted_suggestions == ["e56e1945-20b3-4393-8503-a1a20fd73152"]
    assert parsed.override_reason is None
    assert parsed.outcome_timestamp == datetime(2021, 12, 11, 10, 5, 31, tzinfo=UTC)
    assert parsed.raw == ACCEPTED


def test_spec_example_of_overridden_guidance_without_a_reason_is_parsed():
    [parsed] = parse_feedback(body(OVERRIDDEN))

    assert (parsed.outcome, parsed.accepted_suggestions, parsed.override_reason) == ("overridden", [], None)


def test_spec_example_of_overridden_guidance_with_a_reason_is_parsed():
    [parsed] = parse_feedback(body(OVERRIDDEN_WITH_REASON))

    assert parsed.override_reason == OVERRIDDEN_WITH_REASON["overrideReason"]


def test_several_entries_are_parsed_in_order():
    parsed = parse_feedback(body(ACCEPTED, OVERRIDDEN, OVERRIDDEN_WITH_REASON))
    assert [p.card for p in parsed] == [ACCEPTED["card"], OVERRIDDEN["card"], OVERRIDDEN_WITH_REASON["card"]]


def test_repeated_entries_for_the_same_card_are_all_kept():
    assert len(parse_feedback(body(OVERRIDDEN, OVERRIDDEN))) == 2


def test_several_accepted_suggestions_are_kept():
    parsed = parse_feedback(body(entry(ACCEPTED, acceptedSuggestions=[{"id": "s1"}, {"id": "s2"}])))
    assert parsed[0].accepted_suggestions == ["s1", "s2"]


def test_override_reason_with_only_a_user_comment_is_accepted():
    parsed = parse_feedback(body(entry(OVERRIDDEN, overrideReason={"userComment": "Patient declined"})))
    assert parsed[0].override_reason == {"userComment": "Patient declined"}


def test_timestamp_with_fractional_seconds_is_accepted():
    parsed = parse_feedback(body(entry(OVERRIDDEN, outcomeTimestamp="1985-04-12T23:20:50.52Z")))
    assert parsed[0].outcome_timestamp == datetime(1985, 4, 12, 23, 20, 50, 520000, tzinfo=UTC)


def test_timestamp_with_an_offset_is_converted_to_utc():
    parsed = parse_feedback(body(entry(OVERRIDDEN, outcomeTimestamp="2020-12-11T01:30:00+01:00")))
    assert parsed[0].outcome_timestamp == datetime(2020, 12, 11, 0, 30, tzinfo=UTC)
    assert parsed[0].outcome_timestamp.utcoffset().total_seconds() == 0


def test_unknown_members_are_ignored():
    parsed = parse_feedback(
        orjson.dumps({"feedback": [entry(ACCEPTED, extension={"x": 1})], "extension": {"com.example": True}})
    )
    assert parsed[0].card == ACCEPTED["card"]


# --- the body ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"{feedback", b"[]"], ids=repr)
def test_body_that_is_not_a_json_object_is_rejected_naming_body(raw):
    assert rejected(raw).expression == "body"


@pytest.mark.parametrize(
    "raw", [b"{}", b'{"feedback": []}', b'{"feedback": null}', b'{"feedback": {"card": "x"}}'], ids=repr
)
def test_missing_or_empty_feedback_array_is_rejected_naming_feedback(raw):
    assert rejected(raw).expression == "feedback"


@pytest.mark.parametrize("item", ["4e0a3a1e", 42, None, [ACCEPTED]], ids=repr)
def test_entry_that_is_not_an_object_is_rejected_naming_it(item):
    assert rejected(body(item)).expression == "feedback[0]"


# --- entries -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("card", [..., None, "", 42], ids=repr)
def test_missing_or_empty_card_is_rejected_naming_it(card):
    assert rejected(body(entry(OVERRIDDEN, card=card))).expression == "feedback[0].card"


@pytest.mark.parametrize("outcome", [..., "dismissed", "Accepted", "", 1], ids=repr)
def test_outcome_other_than_accepted_or_overridden_is_rejected_naming_it(outcome):
    assert rejected(body(entry(OVERRIDDEN, outcome=outcome))).expression == "feedback[0].outcome"


@pytest.mark.parametrize("suggestions", [..., None, [], {"id": "x"}], ids=repr)
def test_accepted_without_accepted_suggestions_is_rejected_naming_them(suggestions):
    assert rejected(body(entry(ACCEPTED, acceptedSuggestions=suggestions))).expression == (
        "feedback[0].acceptedSuggestions"
    )


@pytest.mark.parametrize("item", [{}, {"id": ""}, {"id": 7}, "e56e1945"], ids=repr)
def test_accepted_suggestion_without_an_id_is_rejected_naming_it(item):
    assert rejected(body(entry(ACCEPTED, acceptedSuggestions=[item]))).expression == (
        "feedback[0].acceptedSuggestions[0].id"
    )


@pytest.mark.parametrize("timestamp", [..., None, 1639217131, ""], ids=repr)
def test_missing_outcome_timestamp_is_rejected_naming_it(timestamp):
    assert rejected(body(entry(OVERRIDDEN, outcomeTimestamp=timestamp))).expression == "feedback[0].outcomeTimestamp"


@pytest.mark.parametrize("timestamp", ["2020-12-11T00:00:00", "2020-12-11T00:00:00.000", "2020-12-11"], ids=repr)
def test_outcome_timestamp_without_a_time_zone_is_rejected_naming_it(timestamp):
    assert rejected(body(entry(OVERRIDDEN, outcomeTimestamp=timestamp))).expression == "feedback[0].outcomeTimestamp"


@pytest.mark.parametrize("timestamp", ["yesterday", "2020-13-45T00:00:00Z", "11/12/2020 10:05Z", "Z"], ids=repr)
def test_outcome_timestamp_that_is_not_a_date_time_is_rejected_naming_it(timestamp):
    assert rejected(body(entry(OVERRIDDEN, outcomeTimestamp=timestamp))).expression == "feedback[0].outcomeTimestamp"


def test_override_reason_that_is_not_an_object_is_rejected_naming_it():
    assert rejected(body(entry(OVERRIDDEN, overrideReason="not relevant"))).expression == "feedback[0].overrideReason"


def test_override_reason_coding_without_code_is_rejected_naming_the_code():
    reason = {"reason": {"system": "https://example.com/cds-hooks/override-reason-system"}}
    assert rejected(body(entry(OVERRIDDEN, overrideReason=reason))).expression == (
        "feedback[0].overrideReason.reason.code"
    )


def test_override_reason_coding_without_system_is_rejected_naming_the_system():
    reason = {"reason": {"code": "d7ecf885"}}
    assert rejected(body(entry(OVERRIDDEN, overrideReason=reason))).expression == (
        "feedback[0].overrideReason.reason.system"
    )


def test_override_reason_that_is_not_a_coding_is_rejected_naming_it():
    reason = {"reason": "d7ecf885"}
    assert rejected(body(entry(OVERRIDDEN, overrideReason=reason))).expression == "feedback[0].overrideReason.reason"


def test_user_comment_that_is_not_a_string_is_rejected_naming_it():
    reason = {"userComment": ["no"]}
    assert rejected(body(entry(OVERRIDDEN, overrideReason=reason))).expression == (
        "feedback[0].overrideReason.userComment"
    )


def test_one_bad_entry_among_good_ones_rejects_the_whole_body_naming_its_index():
    bad = entry(ACCEPTED, acceptedSuggestions=...)
    assert rejected(body(ACCEPTED, OVERRIDDEN, bad, OVERRIDDEN_WITH_REASON)).expression == (
        "feedback[2].acceptedSuggestions"
    )


# --- storing (R-27) ----------------------------------------------------------------------------------------------


@pytest.fixture
def engine(tmp_path):
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def stored(engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(sa.select(feedback_table).order_by(feedback_table.c.id))]


def test_every_entry_is_stored_as_one_row(engine):
    entries = parse_feedback(body(ACCEPTED, OVERRIDDEN, OVERRIDDEN_WITH_REASON))

    store_feedback(engine, "statin-advisor", entries, "https://sandbox.cds-hooks.org", "tenant-a")

    rows = stored(engine)
    assert [(r["card_uuid"], r["outcome"]) for r in rows] == [
        (ACCEPTED["card"], "accepted"),
        (OVERRIDDEN["card"], "overridden"),
        (OVERRIDDEN_WITH_REASON["card"], "overridden"),
    ]
    assert {(r["service_id"], r["client_iss"], r["tenant"]) for r in rows} == {
        ("statin-advisor", "https://sandbox.cds-hooks.org", "tenant-a")
    }


def test_stored_row_keeps_suggestions_reason_timestamp_and_the_raw_entry(engine):
    entries = parse_feedback(body(ACCEPTED, OVERRIDDEN_WITH_REASON))

    store_feedback(engine, "statin-advisor", entries, None, None)

    accepted, overridden = stored(engine)
    assert accepted["accepted_suggestions"] == ["e56e1945-20b3-4393-8503-a1a20fd73152"]
    assert accepted["override_reason"] is None
    assert accepted["entry"] == ACCEPTED
    assert accepted["outcome_timestamp"].replace(tzinfo=None) == datetime(2021, 12, 11, 10, 5, 31)
    assert accepted["received_at"] is not None
    assert overridden["override_reason"] == OVERRIDDEN_WITH_REASON["overrideReason"]
    assert (accepted["client_iss"], accepted["tenant"]) == (None, None)


def test_repeated_feedback_for_a_card_is_stored_again(engine):
    store_feedback(engine, "svc", parse_feedback(body(OVERRIDDEN)), None, None)
    store_feedback(engine, "svc", parse_feedback(body(OVERRIDDEN)), None, None)

    assert [r["card_uuid"] for r in stored(engine)] == [OVERRIDDEN["card"]] * 2


def test_entries_are_stored_all_or_nothing(engine):
    good, also_good = parse_feedback(body(ACCEPTED, OVERRIDDEN))
    unstorable = dataclasses.replace(also_good, card=None)  # violates NOT NULL on the second row

    with pytest.raises(sa.exc.IntegrityError):
        store_feedback(engine, "svc", [good, unstorable], None, None)

    assert stored(engine) == []


# --- RFC 3339 only, and nothing a database cannot store (issue 9, item 4) ----------------------------------------


@pytest.mark.parametrize(
    "timestamp",
    [
        "2021-W49-6T10:05:31Z",  # an ISO week date: fromisoformat takes it, RFC 3339 does not
        "20211211T100531Z",  # ISO basic format
        "2021-345T10:05:31Z",  # ordinal date
        "2021-12-11 10:05:31Z",  # a space instead of T
        "2021-12-11T10:05Z",  # no seconds
        "2021-12-11T10:05:31+0100",  # offset without colon
        "2021-12-11T10:05:61Z",
        "2021-12-11T10:05:31+24:00",
        "２０２１-12-11T10:05:31Z",
    ],
    ids=repr,
)
def test_outcome_timestamp_that_is_not_rfc_3339_is_rejected_naming_it(timestamp):
    assert rejected(body(entry(OVERRIDDEN, outcomeTimestamp=timestamp))).expression == "feedback[0].outcomeTimestamp"


@pytest.mark.parametrize("timestamp", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"], ids=repr)
def test_outcome_timestamp_outside_the_years_1_to_9999_in_utc_is_rejected_naming_it(timestamp):
    assert rejected(body(entry(OVERRIDDEN, outcomeTimestamp=timestamp))).expression == "feedback[0].outcomeTimestamp"


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, tzinfo=UTC)),  # a leap second
        ("2021-12-11t10:05:31z", datetime(2021, 12, 11, 10, 5, 31, tzinfo=UTC)),
        ("2021-12-11T10:05:31.123456789-00:00", datetime(2021, 12, 11, 10, 5, 31, 123456, tzinfo=UTC)),
        ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),
    ],
    ids=repr,
)
def test_rfc_3339_timestamps_are_accepted(timestamp, expected):
    assert parse_feedback(body(entry(OVERRIDDEN, outcomeTimestamp=timestamp)))[0].outcome_timestamp == expected


@pytest.mark.parametrize("card", ["4e0a\x00", "4e0a\x1b", "c" * 201], ids=["nul", "escape", "201-chars"])
def test_a_card_id_with_control_characters_or_too_long_is_rejected_naming_it(card):
    assert rejected(body(entry(OVERRIDDEN, card=card))).expression == "feedback[0].card"


def test_a_card_id_of_200_characters_is_accepted():
    assert parse_feedback(body(entry(OVERRIDDEN, card="c" * 200)))[0].card == "c" * 200


def test_a_suggestion_id_or_reason_code_with_a_nul_is_rejected_naming_it():
    suggestions = [{"id": "s1"}, {"id": "s\x00"}]
    assert rejected(body(entry(ACCEPTED, acceptedSuggestions=suggestions))).expression == (
        "feedback[0].acceptedSuggestions[1].id"
    )
    reason = {"reason": {"code": "d7ecf885", "system": "urn:x\x00"}}
    assert rejected(body(entry(OVERRIDDEN, overrideReason=reason))).expression == (
        "feedback[0].overrideReason.reason.system"
    )


@pytest.mark.parametrize("comment", ["no\x00", "bell\x07", "esc\x1b[2J", "c1\x85"], ids=repr)
def test_a_user_comment_with_control_characters_is_rejected_naming_it(comment):
    reason = {"userComment": comment}
    assert rejected(body(entry(OVERRIDDEN, overrideReason=reason))).expression == (
        "feedback[0].overrideReason.userComment"
    )


def test_a_user_comment_keeps_its_line_breaks_and_tabs():
    comment = "Declined.\r\n\tDiscuss at next visit."
    parsed = parse_feedback(body(entry(OVERRIDDEN, overrideReason={"userComment": comment})))
    assert parsed[0].override_reason == {"userComment": comment}
