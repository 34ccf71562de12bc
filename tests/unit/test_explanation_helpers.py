"""Explanation-page helpers any service reuses (app.smart.pages): the live check for values recorded since the card,
the common view of a stored result, the fallback's wording. The FHIR server is a function here: no network."""

from datetime import UTC, datetime, timedelta

from app.results import StoredResult
from app.smart.pages import (
    FALLBACK_WHY,
    LaunchContext,
    dated,
    fallback_why,
    live_check,
    result_view,
    section,
)

MADE = datetime(2026, 1, 1, 9, 0, tzinfo=UTC)
SCOPES = frozenset({"patient/Observation.rs"})
LOINC = "http://loinc.org"


def observation(oid: str, code: str, value: float, when: str) -> dict:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "mg/dL"},
    }


NEWER = {
    "resourceType": "Bundle",
    "entry": [
        {"resource": observation("n1", "2085-9", 41, "2026-02-01")},
        {"resource": observation("n2", "2093-3", 190, "2026-02-02")},
        {"resource": observation("n3", "2085-9", 39, "2026-01-15")},
    ],
}
DATA = {
    "made_at": "2026-01-01T09:00:00Z",
    "record_read": True,
    "fallback": False,
    "inputs": [
        {"name": "hdl", "label": "HDL cholesterol", "display": "50 mg/dL", "date": "2025-06-01"},
        {"name": "age", "label": "Age", "display": "60 years", "date": None},
    ],
    "missing": [{"input": "sex", "label": "Sex", "message": "sex not recorded"}, "junk"],
    "notes": ["a note"],
    "model": {"name": "toy-model", "version": "1.0", "notes": ["calibrated"]},
    "loinc_system": LOINC,
    "loinc": {"hdl": ["2085-9"], "total_cholesterol": ["2093-3"]},
}


def result(data) -> StoredResult:
    return StoredResult("r1", "toy", None, None, "Patient/p1", data, MADE, MADE + timedelta(days=1))


def launch(scopes=SCOPES, fhir_get=lambda path: NEWER) -> LaunchContext:
    return LaunchContext(None, False, "Practitioner/1", frozenset(scopes), fhir_get)


def test_fallback_why_words_the_known_reasons_and_quotes_any_other():
    assert fallback_why("timed out") == FALLBACK_WHY["timed out"] == "the model did not answer in time"
    assert fallback_why(" overloaded ") == "the model was busy with other requests"
    assert fallback_why("breaker-open") == "of a problem with the model (breaker-open)"
    assert fallback_why("") == fallback_why(None) == fallback_why(3) == "of a problem with the model"


def test_dated_makes_each_stored_date_readable_and_drops_what_is_not_a_dict():
    items = [{"text": "a", "date": "2026-01-02T10:30:00Z"}, "junk", {"text": "b"}]
    assert dated(items) == [
        {"text": "a", "date": "2026-01-02T10:30:00Z", "when": "2026-01-02 10:30 UTC"},
        {"text": "b", "when": ""},
    ]
    assert dated(None) == []


def test_section_is_a_dict_member_or_empty():
    assert section({"model": {"name": "m"}}, "model") == {"name": "m"}
    assert section({"model": "m"}, "model") == {} == section(None, "model") == section({}, "model")


def test_the_live_check_finds_values_recorded_since_the_card():
    asked = []

    def fhir_get(path):
        asked.append(path)
        return NEWER

    live = live_check(result(DATA), launch(fhir_get=fhir_get))
    assert (live["status"], live["message"]) == ("checked", "")
    assert [(v.input, v.source) for v in live["found"]] == [
        ("hdl", "Observation/n1"),
        ("total_cholesterol", "Observation/n2"),
        ("hdl", "Observation/n3"),
    ]
    assert "date=gt2026-01-01T09:00:00Z" in asked[0] and "patient=p1" in asked[0]


def test_the_live_check_is_skipped_when_the_result_lists_no_codes():
    never = launch(fhir_get=lambda path: (_ for _ in ()).throw(AssertionError("asked the FHIR server")))
    assert live_check(result({**DATA, "loinc": {"hdl": []}}), never) == {
        "status": "skipped",
        "message": "",
        "found": [],
    }


def test_the_live_check_says_why_it_could_not_look():
    no_scope = live_check(result(DATA), launch(scopes=()))
    assert no_scope["status"] == "unavailable" and "did not grant" in no_scope["message"]

    def down(path):
        raise ConnectionError("refused")

    failed = live_check(result(DATA), launch(fhir_get=down))
    assert (failed["status"], failed["found"]) == ("unavailable", [])
    assert "did not answer" in failed["message"]


def test_the_result_view_puts_newer_values_beside_their_inputs_and_the_rest_apart():
    view = result_view(result(DATA), launch())
    hdl, age = view["inputs"]
    assert [v.source for v in hdl["newer"]] == ["Observation/n1", "Observation/n3"]
    assert hdl["when"] == "2025-06-01" and age["newer"] == []
    assert [v.input for v in view["newer_other"]] == ["total_cholesterol"]
    assert view["made_at"] == "2026-01-01 09:00 UTC"
    assert view["missing"] == [{"input": "sex", "label": "Sex", "message": "sex not recorded"}]
    assert view["notes"] == ["a note"]
    assert (view["model_name"], view["model_version"], view["model_notes"]) == ("toy-model", "1.0", ["calibrated"])
    assert (view["record_read"], view["fallback"]) == (True, False)
    assert view["live"]["status"] == "checked"


def test_the_result_view_of_a_fallback_or_of_odd_data_still_reads():
    view = result_view(result({"fallback": True, "fallback_reason": "unavailable", "record_read": False}), launch())
    assert (view["fallback"], view["record_read"]) == (True, False)
    assert view["fallback_why"] == "the model could not be reached"
    assert view["made_at"] == "2026-01-01 09:00 UTC"  # when the result was stored
    odd = result_view(result("not a dict"), launch())
    assert (odd["inputs"], odd["missing"], odd["model_name"], odd["live"]["status"]) == ([], [], "unknown", "skipped")
