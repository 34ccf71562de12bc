"""outcomeTimestamp may carry a fraction of a second of any length, as RFC 3339 allows: it is kept to the
microsecond. What RFC 3339 does not allow is still refused, naming the field."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from app.cds.errors import BadHookRequest
from app.cds.feedback import parse_feedback
from app.cds.request import MAX_URL

FIELD = "feedback[0].outcomeTimestamp"


def body(timestamp: str) -> bytes:
    return orjson.dumps({"feedback": [{"card": "c-1", "outcome": "overridden", "outcomeTimestamp": timestamp}]})


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2021-12-11T10:05:31.1234567891Z", datetime(2021, 12, 11, 10, 5, 31, 123456, tzinfo=UTC)),
        ("2021-12-11T10:05:31.99999999999999999999+01:00", datetime(2021, 12, 11, 9, 5, 31, 999999, tzinfo=UTC)),
        ("2021-12-11T10:05:31." + "0" * 9 + "5" * MAX_URL + "Z", datetime(2021, 12, 11, 10, 5, 31, tzinfo=UTC)),
        ("2021-12-11t10:05:31.0000000001z", datetime(2021, 12, 11, 10, 5, 31, tzinfo=UTC)),
    ],
    ids=["10 digits", "20 digits", "long", "lower case"],
)
def test_a_fraction_of_any_length_is_kept_to_the_microsecond(timestamp, expected):
    (entry,) = parse_feedback(body(timestamp))
    assert entry.outcome_timestamp == expected


@pytest.mark.parametrize(
    "timestamp",
    [
        "2021-W49-6T10:05:31.1234567891Z",  # week date
        "20211211T100531.1234567891Z",  # basic format
        "0000-12-11T10:05:31.1234567891Z",  # year 0000
        "2021-12-11T10:05:31.1234567891+24:00",  # offset out of range
        "2021-12-11T10:05:31.Z",  # a dot without digits
        "2021-12-11T10:05:31.1234567891",  # no offset
    ],
)
def test_what_rfc_3339_does_not_allow_is_still_refused(timestamp):
    with pytest.raises(BadHookRequest) as refused:
        parse_feedback(body(timestamp))
    assert refused.value.expression == FIELD
