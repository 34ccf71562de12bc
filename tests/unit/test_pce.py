"""The Pooled Cohort Equations against the guideline's worked example and cases derived by hand from Table A."""

import math

import pytest

import app.ai
from app.ai import InvalidModelInput
from app.ai.models.pce import (
    EQUATIONS,
    PooledCohortEquations,
    equation_for,
    individual_sum,
    out_of_range,
    risk_category,
    risk_from_sum,
    validate,
)
from tests.support.models import model_app

MODEL = PooledCohortEquations()

# Goff et al. 2013, Table A (worked example): 55 years, TC 213 mg/dL, HDL 50 mg/dL, untreated SBP 120 mm Hg,
# nonsmoker, no diabetes. (sex, race) -> (published individual sum, published 10-year risk in %).
WORKED_EXAMPLE = {
    "age": 55,
    "total_cholesterol": 213,
    "hdl": 50,
    "systolic_bp": 120,
    "treated_hypertension": False,
    "smoker": False,
    "diabetes": False,
}
PUBLISHED = {
    ("female", "white"): (-29.67, 2.1),
    ("female", "african-american"): (86.16, 3.0),
    ("male", "white"): (60.69, 5.3),
    ("male", "african-american"): (18.97, 6.1),
}


def example(**changes):
    return {**WORKED_EXAMPLE, "sex": "female", "race": "white", **changes}


def percent(inputs) -> float:
    return MODEL.predict(inputs)["risk"] * 100


@pytest.mark.parametrize(("sex", "race"), list(PUBLISHED))
def test_individual_sum_matches_the_published_worked_example(sex, race):
    clean = validate(example(sex=sex, race=race))
    total = individual_sum(equation_for(sex, race), clean)
    # Table A prints the sum cut (not rounded) to two decimals: -29.6767 -> -29.67, 60.6995 -> 60.69.
    assert math.trunc(total * 100) / 100 == pytest.approx(PUBLISHED[(sex, race)][0], abs=1e-9)


@pytest.mark.parametrize(("sex", "race"), list(PUBLISHED))
def test_published_sum_gives_the_published_risk(sex, race):
    published_sum, published_percent = PUBLISHED[(sex, race)]
    risk = risk_from_sum(equation_for(sex, race), published_sum)
    assert round(risk * 100, 1) == published_percent


@pytest.mark.parametrize(
    ("sex", "race", "expected"),
    [
        ("female", "white", 2.1),
        ("female", "african-american", 3.0),
        ("male", "african-american", 6.1),
    ],
)
def test_worked_example_risk_rounds_to_the_published_figure(sex, race, expected):
    assert round(percent(example(sex=sex, race=race)), 1) == expected


def test_worked_example_white_men_unrounded_is_within_a_tenth_of_the_published_figure():
    """The table's 5.3 % comes from its truncated sum 60.69; the unrounded sum 60.6995 gives 5.38 %."""
    value = percent(example(sex="male", race="white"))
    assert value == pytest.approx(5.384, abs=0.001)
    assert abs(value - 5.3) < 0.1


def _white_female_by_hand(age, tc, hdl, sbp, treated, smoker, diabetes):
    a, t, h, s = math.log(age), math.log(tc), math.log(hdl), math.log(sbp)
    total = (
        -29.799 * a
        + 4.884 * a * a
        + 13.540 * t
        - 3.114 * a * t
        - 13.578 * h
        + 3.149 * a * h
        + (2.019 if treated else 1.957) * s
        + (7.574 - 1.665 * a) * smoker
        + 0.661 * diabetes
    )
    return 100 * (1 - 0.9665 ** math.exp(total + 29.18))


def _african_american_female_by_hand(age, tc, hdl, sbp, treated, smoker, diabetes):
    a, t, h, s = math.log(age), math.log(tc), math.log(hdl), math.log(sbp)
    sbp_term = (29.291 - 6.432 * a) * s if treated else (27.820 - 6.087 * a) * s
    total = 17.114 * a + 0.940 * t - 18.920 * h + 4.475 * a * h + sbp_term + 0.691 * smoker + 0.874 * diabetes
    return 100 * (1 - 0.9533 ** math.exp(total - 86.61))


def _white_male_by_hand(age, tc, hdl, sbp, treated, smoker, diabetes):
    a, t, h, s = math.log(age), math.log(tc), math.log(hdl), math.log(sbp)
    total = (
        12.344 * a
        + 11.853 * t
        - 2.664 * a * t
        - 7.990 * h
        + 1.769 * a * h
        + (1.797 if treated else 1.764) * s
        + (7.837 - 1.795 * a) * smoker
        + 0.658 * diabetes
    )
    return 100 * (1 - 0.9144 ** math.exp(total - 61.18))


def _african_american_male_by_hand(age, tc, hdl, sbp, treated, smoker, diabetes):
    a, t, h, s = math.log(age), math.log(tc), math.log(hdl), math.log(sbp)
    total = 2.469 * a + 0.302 * t - 0.307 * h + (1.916 if treated else 1.809) * s + 0.549 * smoker + 0.645 * diabetes
    return 100 * (1 - 0.8954 ** math.exp(total - 19.54))


BY_HAND = {
    ("female", "white"): _white_female_by_hand,
    ("female", "african-american"): _african_american_female_by_hand,
    ("male", "white"): _white_male_by_hand,
    ("male", "african-american"): _african_american_male_by_hand,
}

# (label, age, TC, HDL, SBP, treated, smoker, diabetes) and the risk in % worked out from Table A for white
# women, African-American women, white men and African-American men, in that order.
HAND_CASES = [
    ("treated SBP 120", 55, 213, 50, 120, True, False, False, (2.752, 4.585, 6.276, 9.930)),
    ("smoker", 55, 213, 50, 120, False, True, False, (4.981, 5.949, 10.001, 10.281)),
    ("diabetes", 55, 213, 50, 120, False, False, True, (3.936, 7.100, 10.136, 11.257)),
    ("age 40", 40, 213, 50, 120, False, False, False, (0.697, 0.535, 1.126, 2.814)),
    ("age 79", 79, 213, 50, 120, False, False, False, (21.165, 20.025, 28.551, 14.204)),
    ("treated SBP 150", 60, 180, 45, 150, True, False, False, (6.375, 10.877, 12.871, 17.730)),
    ("every risk factor", 65, 250, 35, 160, True, True, True, (45.270, 66.289, 61.312, 65.334)),
]
GROUPS = [("female", "white"), ("female", "african-american"), ("male", "white"), ("male", "african-american")]


@pytest.mark.parametrize("case", HAND_CASES, ids=[c[0] for c in HAND_CASES])
@pytest.mark.parametrize("group", GROUPS, ids=["-".join(g) for g in GROUPS])
def test_risk_matches_cases_worked_out_by_hand(case, group):
    _, age, tc, hdl, sbp, treated, smoker, diabetes, expected = case
    inputs = {
        "age": age,
        "total_cholesterol": tc,
        "hdl": hdl,
        "systolic_bp": sbp,
        "treated_hypertension": treated,
        "smoker": smoker,
        "diabetes": diabetes,
        "sex": group[0],
        "race": group[1],
    }
    value = percent(inputs)
    assert value == pytest.approx(BY_HAND[group](age, tc, hdl, sbp, treated, smoker, diabetes), abs=1e-9)
    assert value == pytest.approx(expected[GROUPS.index(group)], abs=0.001)


def test_smoking_adds_its_coefficient_and_age_interaction_to_the_sum():
    equation = EQUATIONS[("male", "white")]
    plain = individual_sum(equation, validate(example(sex="male")))
    smoker = individual_sum(equation, validate(example(sex="male", smoker=True)))
    assert smoker - plain == pytest.approx(7.837 - 1.795 * math.log(55))


def test_treated_sbp_uses_the_treated_coefficients_with_their_age_interaction():
    equation = EQUATIONS[("female", "african-american")]
    untreated = individual_sum(equation, validate(example(race="african-american")))
    treated = individual_sum(equation, validate(example(race="african-american", treated_hypertension=True)))
    ln_age, ln_sbp = math.log(55), math.log(120)
    assert treated - untreated == pytest.approx((29.291 - 27.820) * ln_sbp + (-6.432 + 6.087) * ln_age * ln_sbp)


def test_diabetes_adds_its_coefficient_to_the_sum():
    equation = EQUATIONS[("male", "african-american")]
    plain = individual_sum(equation, validate(example(sex="male", race="african-american")))
    diabetic = individual_sum(equation, validate(example(sex="male", race="african-american", diabetes=True)))
    assert diabetic - plain == pytest.approx(0.645)


def test_other_race_uses_the_white_equations_and_says_so():
    other = MODEL.predict(example(sex="male", race="other"))
    white = MODEL.predict(example(sex="male", race="white"))
    assert other["equation"] == "white-male"
    assert other["risk"] == white["risk"]
    assert other["notes"] and "white" in other["notes"][0]
    assert white["notes"] == []


def test_outputs_name_the_equation_and_category():
    out = MODEL.predict(example(sex="female", race="african-american"))
    assert out["equation"] == "african-american-female"
    assert out["category"] == "low"
    assert 0 < out["risk"] < 1


def test_model_name_and_version():
    assert MODEL.name == "ascvd-pce"
    assert MODEL.version == "2013.1"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("age", 39),
        ("age", 80),
        ("age", 79.5),
        ("total_cholesterol", 129),
        ("total_cholesterol", 321),
        ("hdl", 19),
        ("hdl", 101),
        ("systolic_bp", 89),
        ("systolic_bp", 201),
    ],
)
def test_values_outside_the_valid_ranges_are_rejected_naming_the_input(key, value):
    with pytest.raises(InvalidModelInput, match=key):
        MODEL.predict(example(**{key: value}))
    assert out_of_range(example(**{key: value}))[0].startswith(
        {"age": "age", "total_cholesterol": "total cholesterol", "hdl": "HDL", "systolic_bp": "systolic"}[key]
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("age", 40),
        ("age", 79),
        ("total_cholesterol", 130),
        ("total_cholesterol", 320),
        ("hdl", 20),
        ("hdl", 100),
        ("systolic_bp", 90),
        ("systolic_bp", 200),
    ],
)
def test_range_limits_are_inclusive(key, value):
    assert 0 < MODEL.predict(example(**{key: value}))["risk"] < 1
    assert out_of_range(example(**{key: value})) == []


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("age", "55"),
        ("age", True),
        ("age", None),
        ("age", float("nan")),
        ("hdl", float("inf")),
        ("sex", "other"),
        ("sex", None),
        ("race", "asian"),
        ("smoker", "yes"),
        ("smoker", 1),
        ("diabetes", None),
        ("treated_hypertension", 0),
    ],
)
def test_wrong_types_are_rejected_naming_the_input(key, value):
    with pytest.raises(InvalidModelInput, match=key):
        MODEL.predict(example(**{key: value}))


def test_a_missing_input_is_named():
    inputs = example()
    del inputs["systolic_bp"]
    with pytest.raises(InvalidModelInput, match="systolic_bp"):
        MODEL.predict(inputs)


def test_out_of_range_explains_each_value_and_ignores_absent_ones():
    reasons = out_of_range({"age": 85, "hdl": 110.25, "systolic_bp": None, "total_cholesterol": "x"})
    assert reasons == ["age 85 years is outside 40–79", "HDL cholesterol 110.2 mg/dL is outside 20–100"]


@pytest.mark.parametrize(
    ("risk", "category"),
    [
        (0.0, "low"),
        (0.0494, "low"),
        (0.0496, "borderline"),  # shows as 5.0 %
        (0.05, "borderline"),
        (0.0744, "borderline"),
        (0.0746, "intermediate"),  # shows as 7.5 %
        (0.075, "intermediate"),
        (0.1994, "intermediate"),
        (0.2, "high"),
        (0.9, "high"),
    ],
)
def test_risk_category_follows_the_2018_2019_thresholds(risk, category):
    assert risk_category(risk) == category


def test_the_model_is_served_through_infer():
    flask_app = model_app()
    with flask_app.app_context():
        prediction = app.ai.infer("ascvd-pce", example(sex="male", race="african-american"))
    assert (prediction.model, prediction.version) == ("ascvd-pce", "2013.1")
    assert round(prediction.outputs["risk"] * 100, 1) == 6.1
