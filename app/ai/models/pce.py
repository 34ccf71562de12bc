"""The ACC/AHA Pooled Cohort Equations: 10-year risk of a first hard ASCVD event.

Source of every coefficient, baseline survival and mean below: Goff DC Jr, Lloyd-Jones DM, Bennett G, et al.
2013 ACC/AHA Guideline on the Assessment of Cardiovascular Risk. Circulation 2014;129(25 suppl 2):S49-S73,
doi:10.1161/01.cir.0000437741.48606.98, Table A ("Equation parameters of the Pooled Cohort
Equations for estimation of 10-year risk of hard ASCVD"). Risk = 1 - S10 ** exp(sum - mean), where sum is the
individual sum of coefficient x value. The valid input ranges are those of the ACC/AHA ASCVD Risk Estimator;
the risk categories are those of the 2018 ACC/AHA cholesterol and 2019 ACC/AHA primary prevention guidelines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from app.ai.types import InvalidModelInput

NAME = "ascvd-pce"
VERSION = "2013.1"

SEXES = ("female", "male")
RACES = ("white", "african-american", "other")

# Inclusive ranges accepted by the ACC/AHA ASCVD Risk Estimator, with the unit each input is expressed in.
VALID_RANGES: dict[str, tuple[float, float, str]] = {
    "age": (40, 79, "years"),
    "total_cholesterol": (130, 320, "mg/dL"),
    "hdl": (20, 100, "mg/dL"),
    "systolic_bp": (90, 200, "mm Hg"),
}
LABELS = {
    "age": "age",
    "total_cholesterol": "total cholesterol",
    "hdl": "HDL cholesterol",
    "systolic_bp": "systolic blood pressure",
}
BOOLEAN_INPUTS = ("treated_hypertension", "smoker", "diabetes")

LOW, BORDERLINE, INTERMEDIATE, HIGH = "low", "borderline", "intermediate", "high"
RACE_OTHER_NOTE = (
    "race is neither white nor African American: the equations for white individuals are used, as the "
    "guideline recommends; they may over- or underestimate risk in other groups"
)


@dataclass(frozen=True)
class Equation:
    """One sex/race column of Table A. Terms the guideline leaves out ("N/A") are 0."""

    name: str
    ln_age: float
    ln_age_squared: float
    ln_tc: float
    ln_age_x_ln_tc: float
    ln_hdl: float
    ln_age_x_ln_hdl: float
    ln_treated_sbp: float
    ln_age_x_ln_treated_sbp: float
    ln_untreated_sbp: float
    ln_age_x_ln_untreated_sbp: float
    smoker: float
    ln_age_x_smoker: float
    diabetes: float
    baseline_survival: float
    mean_sum: float


EQUATIONS: dict[tuple[str, str], Equation] = {
    ("female", "white"): Equation(
        name="white-female",
        ln_age=-29.799, ln_age_squared=4.884,
        ln_tc=13.540, ln_age_x_ln_tc=-3.114,
        ln_hdl=-13.578, ln_age_x_ln_hdl=3.149,
        ln_treated_sbp=2.019, ln_age_x_ln_treated_sbp=0.0,
        ln_untreated_sbp=1.957, ln_age_x_ln_untreated_sbp=0.0,
        smoker=7.574, ln_age_x_smoker=-1.665,
        diabetes=0.661,
        baseline_survival=0.9665, mean_sum=-29.18,
    ),
    ("female", "african-american"): Equation(
        name="african-american-female",
        ln_age=17.114, ln_age_squared=0.0,
        ln_tc=0.940, ln_age_x_ln_tc=0.0,
        ln_hdl=-18.920, ln_age_x_ln_hdl=4.475,
        ln_treated_sbp=29.291, ln_age_x_ln_treated_sbp=-6.432,
        ln_untreated_sbp=27.820, ln_age_x_ln_untreated_sbp=-6.087,
        smoker=0.691, ln_age_x_smoker=0.0,
        diabetes=0.874,
        baseline_survival=0.9533, mean_sum=86.61,
    ),
    ("male", "white"): Equation(
        name="white-male",
        ln_age=12.344, ln_age_squared=0.0,
        ln_tc=11.853, ln_age_x_ln_tc=-2.664,
        ln_hdl=-7.990, ln_age_x_ln_hdl=1.769,
        ln_treated_sbp=1.797, ln_age_x_ln_treated_sbp=0.0,
        ln_untreated_sbp=1.764, ln_age_x_ln_untreated_sbp=0.0,
        smoker=7.837, ln_age_x_smoker=-1.795,
        diabetes=0.658,
        baseline_survival=0.9144, mean_sum=61.18,
    ),
    ("male", "african-american"): Equation(
        name="african-american-male",
        ln_age=2.469, ln_age_squared=0.0,
        ln_tc=0.302, ln_age_x_ln_tc=0.0,
        ln_hdl=-0.307, ln_age_x_ln_hdl=0.0,
        ln_treated_sbp=1.916, ln_age_x_ln_treated_sbp=0.0,
        ln_untreated_sbp=1.809, ln_age_x_ln_untreated_sbp=0.0,
        smoker=0.549, ln_age_x_smoker=0.0,
        diabetes=0.645,
        baseline_survival=0.8954, mean_sum=19.54,
    ),
}  # fmt: skip


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _format(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


def out_of_range(inputs: dict[str, Any]) -> list[str]:
    """Why the numeric inputs present in ``inputs`` fall outside the valid ranges, one sentence each.

    Pure and lenient: absent or non-numeric inputs are not reported here (``validate`` does that), so a
    service can pre-check what it found in a record and explain it before calling the model.
    """
    reasons = []
    for key, (low, high, unit) in VALID_RANGES.items():
        value = inputs.get(key)
        if _is_number(value) and not low <= value <= high:
            reasons.append(f"{LABELS[key]} {_format(value)} {unit} is outside {low}–{high}")
    return reasons


def validate(inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs checked for type and range, normalised; ``InvalidModelInput`` names the first bad one."""
    if not isinstance(inputs, dict):
        raise InvalidModelInput("inputs must be an object")
    clean: dict[str, Any] = {}
    for key, (low, high, unit) in VALID_RANGES.items():
        value = inputs.get(key)
        if value is None:
            raise InvalidModelInput(f"{key} is required")
        if not _is_number(value):
            raise InvalidModelInput(f"{key} must be a finite number ({unit})")
        if not low <= value <= high:
            raise InvalidModelInput(f"{key} {value} is outside {low}–{high} {unit}")
        clean[key] = float(value)
    for key, allowed in (("sex", SEXES), ("race", RACES)):
        value = inputs.get(key)
        if not isinstance(value, str) or value.strip().lower() not in allowed:
            raise InvalidModelInput(f"{key} must be one of {', '.join(allowed)}")
        clean[key] = value.strip().lower()
    for key in BOOLEAN_INPUTS:
        value = inputs.get(key)
        if not isinstance(value, bool):
            raise InvalidModelInput(f"{key} must be true or false")
        clean[key] = value
    return clean


def equation_for(sex: str, race: str) -> Equation:
    """The sex/race equation; "other" uses the white equations, as the guideline recommends."""
    return EQUATIONS[(sex, "african-american" if race == "african-american" else "white")]


def individual_sum(equation: Equation, clean: dict[str, Any]) -> float:
    """Sum of coefficient x value (Table A's "individual sum") for validated inputs."""
    ln_age = math.log(clean["age"])
    ln_tc = math.log(clean["total_cholesterol"])
    ln_hdl = math.log(clean["hdl"])
    ln_sbp = math.log(clean["systolic_bp"])
    smoker = 1.0 if clean["smoker"] else 0.0
    if clean["treated_hypertension"]:
        sbp_terms = equation.ln_treated_sbp * ln_sbp + equation.ln_age_x_ln_treated_sbp * ln_age * ln_sbp
    else:
        sbp_terms = equation.ln_untreated_sbp * ln_sbp + equation.ln_age_x_ln_untreated_sbp * ln_age * ln_sbp
    return (
        equation.ln_age * ln_age
        + equation.ln_age_squared * ln_age**2
        + equation.ln_tc * ln_tc
        + equation.ln_age_x_ln_tc * ln_age * ln_tc
        + equation.ln_hdl * ln_hdl
        + equation.ln_age_x_ln_hdl * ln_age * ln_hdl
        + sbp_terms
        + equation.smoker * smoker
        + equation.ln_age_x_smoker * ln_age * smoker
        + equation.diabetes * (1.0 if clean["diabetes"] else 0.0)
    )


def risk_from_sum(equation: Equation, total: float) -> float:
    """10-year risk from an individual sum: 1 - S10 ** exp(sum - mean)."""
    return 1.0 - equation.baseline_survival ** math.exp(total - equation.mean_sum)


def risk_category(risk: float) -> str:
    """The 2018/2019 ACC/AHA category: <5 % low, 5-<7.5 % borderline, 7.5-<20 % intermediate, >=20 % high.

    The risk is first rounded to 0.1 % so that the category always agrees with the figure a clinician
    reads on the card (7.46 % shows as 7.5 % and is intermediate).
    """
    percent = round(risk * 1000) / 10
    if percent < 5:
        return LOW
    if percent < 7.5:
        return BORDERLINE
    if percent < 20:
        return INTERMEDIATE
    return HIGH


class PooledCohortEquations:
    """The embedded ``ascvd-pce`` model: pure, deterministic, no state."""

    name = NAME
    version = VERSION

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        clean = validate(inputs)
        equation = equation_for(clean["sex"], clean["race"])
        total = individual_sum(equation, clean)
        risk = min(1.0, max(0.0, risk_from_sum(equation, total)))
        return {
            "risk": risk,
            "category": risk_category(risk),
            "equation": equation.name,
            "individual_sum": total,
            "notes": [RACE_OTHER_NOTE] if clean["race"] == "other" else [],
        }
