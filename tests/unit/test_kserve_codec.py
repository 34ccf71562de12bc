"""The v2 tensor codec: flat dicts of scalars and lists to tensors and back, exactly, through JSON."""

from __future__ import annotations

import math

import orjson
import pytest

from app.ai.kserve import decode_tensors, encode_tensors
from app.ai.models.pce import PooledCohortEquations

PCE_INPUTS = {
    "age": 55,
    "sex": "male",
    "race": "white",
    "total_cholesterol": 213.0,
    "hdl": 50,
    "systolic_bp": 120,
    "treated_hypertension": False,
    "smoker": True,
    "diabetes": False,
}


def through_json(values: dict) -> dict:
    return decode_tensors(orjson.loads(orjson.dumps(encode_tensors(values))))


def test_inputs_encode_as_one_tensor_each_with_shape_one():
    tensors = {t["name"]: t for t in encode_tensors(PCE_INPUTS)}

    assert tensors["age"] == {"name": "age", "shape": [1], "datatype": "FP64", "data": [55.0]}
    assert tensors["sex"] == {"name": "sex", "shape": [1], "datatype": "BYTES", "data": ["male"]}
    assert tensors["smoker"] == {"name": "smoker", "shape": [1], "datatype": "BOOL", "data": [True]}
    assert list(tensors) == list(PCE_INPUTS)


@pytest.mark.parametrize("race", ["white", "african-american", "other"])
@pytest.mark.parametrize("sex", ["female", "male"])
def test_pce_outputs_round_trip_exactly(sex, race):
    outputs = PooledCohortEquations().predict({**PCE_INPUTS, "sex": sex, "race": race})

    decoded = through_json(outputs)

    assert decoded == outputs
    assert [type(v) for v in decoded.values()] == [type(v) for v in outputs.values()]


def test_pce_inputs_round_trip_with_numbers_as_floats():
    decoded = through_json(PCE_INPUTS)

    assert decoded == PCE_INPUTS
    assert type(decoded["age"]) is float


@pytest.mark.parametrize(
    ("items", "shape"),
    [([], [0]), (["only one"], [1, 1]), (["a", "b", "c"], [3])],
)
def test_lists_keep_their_length_and_a_single_element_list_is_not_a_scalar(items, shape):
    (tensor,) = encode_tensors({"notes": items})

    assert tensor["shape"] == shape
    assert through_json({"notes": items}) == {"notes": items}


def test_shape_one_is_a_scalar_and_other_shapes_are_flat_lists():
    tensors = [
        {"name": "risk", "shape": [1], "datatype": "FP32", "data": [0.5]},
        {"name": "matrix", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]},
    ]

    assert decode_tensors(tensors) == {"risk": 0.5, "matrix": [1, 2, 3, 4]}


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (math.nan, "finite"),
        (math.inf, "finite"),
        (None, "NoneType"),
        ({"nested": 1}, "dict"),
        (["a", 1.0], "one type"),
    ],
)
def test_unencodable_values_are_named_by_key(value, why):
    with pytest.raises(ValueError, match=why) as raised:
        encode_tensors({"systolic_bp": value})

    assert "systolic_bp" in str(raised.value)


SECRET = 0.1234567


@pytest.mark.parametrize(
    ("tensor", "why"),
    [
        ({"name": "risk", "shape": [2], "datatype": "FP64", "data": [SECRET]}, "does not match 1 data elements"),
        ({"name": "risk", "shape": [1], "datatype": "BYTES", "data": [SECRET]}, "does not match datatype BYTES"),
        ({"name": "risk", "shape": [1], "datatype": "FP64", "data": ["0.1234567"]}, "does not match datatype FP64"),
        ({"name": "risk", "shape": [1], "datatype": "FP64", "data": [True]}, "does not match datatype FP64"),
        ({"name": "risk", "shape": [1], "datatype": "BOOL", "data": [1]}, "does not match datatype BOOL"),
        ({"name": "risk", "shape": [1], "datatype": "INT64", "data": [SECRET]}, "does not match datatype INT64"),
        ({"name": "risk", "shape": [1], "datatype": "FP128", "data": [SECRET]}, "unsupported datatype"),
        ({"name": "risk", "shape": "1", "datatype": "FP64", "data": [SECRET]}, "shape must be a list"),
        ({"name": "risk", "shape": [-1], "datatype": "FP64", "data": [SECRET]}, "must not be negative"),
        ({"name": "risk", "shape": [1], "datatype": "FP64", "data": SECRET}, "data must be a list"),
        ({"name": "risk", "shape": [1], "datatype": "FP64", "data": [[SECRET]]}, "nested deeper"),
        ({"shape": [1], "datatype": "FP64", "data": [SECRET]}, "with a name"),
    ],
)
def test_malformed_tensors_are_rejected_without_showing_their_data(tensor, why):
    with pytest.raises(ValueError, match=why) as raised:
        decode_tensors([tensor])

    assert str(SECRET) not in str(raised.value)


def test_a_tensor_named_twice_is_rejected():
    tensor = {"name": "risk", "shape": [1], "datatype": "FP64", "data": [0.1]}

    with pytest.raises(ValueError, match="appears twice"):
        decode_tensors([tensor, tensor])


def test_tensors_must_be_a_list():
    with pytest.raises(ValueError, match="must be a list"):
        decode_tensors({"name": "risk"})
