"""Hypothesis strategies for the fuzz tests: odd strings, JSON of any shape, and hook calls mutated field by field
from the project's valid fixture, so that most inputs get past the first validation."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

FIXTURE = json.loads(
    (Path(__file__).resolve().parents[2] / "fixtures" / "hooks" / "patient-view-cardiovascular-risk.json").read_text()
)


# FUZZ_SCALE=10 fuzzes ten times longer (a nightly run); make test keeps the whole fuzzing under a minute.
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))


def fuzz_settings(examples: int) -> settings:
    """Repeatable (derandomized, no example database), quiet, and without per-example deadlines."""
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
    )


# Strings that broke, or could break, a parser, a database or a log line.
ODD_STRINGS = [
    "",
    " ",
    "\x00",
    "gw-test\x00patient",
    "\ud800",
    "x\udfffy",
    "\x1b[2J",
    "line\nbreak",
    "\u2028",
    "\ufeff",
    "\x7f",
    "%00",
    "..",
    "../../etc/passwd",
    "Patient/gw-test-patient-1",
    "gw-test-patient-1",
    "x" * 65,
    "x" * 1000,
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-14:00",
    "2020-W01-1T00:00:00Z",
    "20201211T000000Z",
    "2020-12-11T00:00:60Z",
    "2020-12-11T00:00:00+24:00",
    "<script>alert(1)</script>",
    "' OR 1=1 --",
    "\U0001f4a5",
    "²",
    "١٢",
    "Practitioner/\x00",
    "http://ehr.invalid/fhir",
    "urn:uuid:00000000-0000-0000-0000-000000000000",
]

texts = st.one_of(
    st.sampled_from(ODD_STRINGS),
    st.text(max_size=12),
    st.text(st.characters(exclude_categories=()), max_size=12),  # surrogates and controls included
)
numbers = st.one_of(
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([10**400, -(10**400), 2**63, 2**64, -(2**63) - 1, 1e308, -0.0]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=8
)


def encode(value: Any) -> bytes:
    """JSON as a client could send it: lone surrogates as ``\\ud800`` escapes, integers of any size."""
    return json.dumps(value, ensure_ascii=True).encode("ascii")


def _paths(value: Any, path: tuple = ()) -> list[tuple]:
    found = [path] if path else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*path, index))
    return found


ALL_PATHS = _paths(FIXTURE)
# Where structure matters most: the envelope, the context, each prefetch value and its Bundle's skeleton.
SKELETON = [
    p for p in ALL_PATHS if len(p) <= 3 or (p[0] == "prefetch" and p[-1] in ("entry", "link", "resource", "fullUrl"))
]


def _holder(document: Any, path: tuple) -> Any:
    for step in path:
        document = document[step]
    return document


@st.composite
def mutated_hooks(draw, base: dict | None = None) -> dict:
    """The valid fixture with one to three fields replaced by anything, or removed."""
    body = copy.deepcopy(base or FIXTURE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.one_of(st.sampled_from(SKELETON), st.sampled_from(ALL_PATHS)))
        try:
            holder = _holder(body, path[:-1])
            holder[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation changed the shape above this path
        if draw(st.integers(0, 5)) == 0:
            del holder[path[-1]]
        else:
            holder[path[-1]] = draw(st.one_of(texts, json_values))
    return body


@st.composite
def odd_prefetch_bundles(draw) -> dict:
    """The fixture with one prefetch Bundle's ``entry``, ``link`` or an entry's ``resource`` of any shape."""
    body = copy.deepcopy(FIXTURE)
    bundles = [k for k, v in body["prefetch"].items() if isinstance(v, dict) and v.get("resourceType") == "Bundle"]
    bundle = body["prefetch"][draw(st.sampled_from(bundles))]
    member = draw(st.sampled_from(["entry", "link", "resource"]))
    if member == "resource" and bundle.get("entry"):
        index = draw(st.integers(0, len(bundle["entry"]) - 1))
        bundle["entry"][index]["resource"] = draw(json_values)
    elif member == "link":
        bundle["link"] = draw(st.one_of(json_values, st.lists(json_values, max_size=3)))
    else:
        bundle["entry"] = draw(st.one_of(json_values, st.lists(json_values, max_size=3)))
    return body


fhir_ids = st.from_regex(r"[A-Za-z0-9\-.]{1,64}", fullmatch=True)


@st.composite
def odd_contexts(draw) -> dict:
    """The fixture with odd (or valid but unusual) ids: patientId, encounterId, userId, hookInstance, fhirServer."""
    body = copy.deepcopy(FIXTURE)
    for name in draw(st.sets(st.sampled_from(["patientId", "encounterId", "userId"]), min_size=1)):
        ids = st.one_of(fhir_ids, texts, scalars)
        body["context"][name] = draw(ids.map(lambda s: f"Practitioner/{s}") if name == "userId" else ids)
    if draw(st.booleans()):
        body[draw(st.sampled_from(["hookInstance", "fhirServer"]))] = draw(texts)
    return body


@st.composite
def timestamps(draw) -> str:
    """RFC 3339 date-times of any year and offset, in every spelling RFC 3339 allows, and some it does not."""
    moment = draw(st.datetimes())
    minutes = draw(st.integers(-14 * 60, 14 * 60))
    offset = draw(
        st.sampled_from(["Z", "z", f"{'+' if minutes >= 0 else '-'}{abs(minutes) // 60:02}:{abs(minutes) % 60:02}"])
    )
    fraction = draw(st.sampled_from(["", ".5", f".{moment.microsecond:06}", ".123456789"]))
    separator = draw(st.sampled_from(["T", "t", "T", " "]))
    return f"{moment:%Y-%m-%d}{separator}{moment:%H:%M:%S}{fraction}{offset}"


def assert_operation_outcome(response) -> dict:
    """A 4xx whose body is an OperationOutcome with one error issue."""
    assert 400 <= response.status_code < 500, (response.status_code, response.get_data()[:300])
    body = orjson.loads(response.get_data())
    assert body["resourceType"] == "OperationOutcome", body
    issue = body["issue"][0]
    assert issue["severity"] == "error" and issue["code"] and isinstance(issue["diagnostics"], str), body
    return issue


def _count_status(response) -> None:
    """How far inputs get, shown by ``pytest --hypothesis-show-statistics``."""
    if currently_in_test_context():
        event(f"HTTP {response.status_code}")


def assert_answered(response) -> None:
    """2xx, or a 4xx with an OperationOutcome: never a 5xx."""
    _count_status(response)
    if response.status_code >= 300:
        assert_operation_outcome(response)


def assert_html_answered(response) -> None:
    """The SMART app: 2xx, a redirect, or a 4xx HTML error page: never a 5xx."""
    _count_status(response)
    assert response.status_code < 500, (response.status_code, response.get_data()[:300])
    if response.status_code >= 400:
        assert response.content_type.startswith("text/html"), response.content_type
