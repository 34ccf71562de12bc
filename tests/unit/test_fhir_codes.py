"""Code sets against malformed codings: a coding that is not well formed matches nothing and never raises."""

import pytest

from app.fhir.codes import DIABETES, ICD10, SNOMED, STATIN, classify, codes_in, codings

MALFORMED_CONCEPTS = [
    {"coding": [{"system": {"x": 1}, "code": "I10"}]},
    {"coding": [{"system": ["http://snomed.info/sct"], "code": "44054006"}]},
    {"coding": [{"system": SNOMED, "code": {"x": 1}}]},
    {"coding": [{"system": SNOMED, "code": ["44054006"]}]},
    {"coding": [{"system": SNOMED, "code": 44054006}]},
    {"coding": {"system": SNOMED, "code": "44054006"}},
    {"coding": "44054006"},
    {"system": {"x": 1}, "code": "E11.9"},
    ["E11.9"],
    "E11.9",
    7,
]


@pytest.mark.parametrize("concept", MALFORMED_CONCEPTS)
def test_malformed_coding_matches_no_code_set(concept):
    assert DIABETES.matches(concept) is False
    assert classify(concept, (STATIN,)) is None
    assert codes_in(concept, SNOMED) == set()


@pytest.mark.parametrize("coding", [c for concept in MALFORMED_CONCEPTS[:5] for c in concept["coding"]])
def test_malformed_coding_is_no_match_when_given_directly(coding):
    assert DIABETES.matches_coding(coding) is False


def test_well_formed_codings_beside_a_malformed_one_still_match():
    concept = {"coding": [{"system": {"x": 1}, "code": "I10"}, {"system": ICD10[0], "code": "E11.9"}]}
    assert DIABETES.matches(concept)
    assert codings(concept) == [{"system": ICD10[0], "code": "E11.9"}]
