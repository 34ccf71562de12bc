"""The KServe Open Inference Protocol v2 (REST) backend, and the tensor codec that ``app.ai.serve`` shares.

Tensor rule (both directions): each value is one tensor named like its key. A number is ``FP64`` shape [1], a
bool ``BOOL`` [1], a string ``BYTES`` [1]; a list is one flat tensor of its n elements, shape [n], except that a
one-element list is sent as [1, 1], because shape [1] always means a scalar. Decoding inverts it: shape [1] is
the scalar, any other shape a flat list (row-major). Numbers come back as ``float`` (``INT*`` tensors as ``int``).
"""

from __future__ import annotations

import math
import re
import uuid
from typing import Any
from urllib.parse import quote

import orjson
import requests

from app import http
from app.ai.remote import bad_response, json_object, transport_failure
from app.ai.types import InvalidModelInput, ModelUnavailable, Prediction

POOL_SIZE = 32
READY_TIMEOUT = 1.0
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})
INT_TYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _datatype(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "BOOL"
    if _is_number(value):
        if not math.isfinite(value):
            raise ValueError(f"tensor {name!r}: numbers must be finite")
        return "FP64"
    if isinstance(value, str):
        return "BYTES"
    raise ValueError(f"tensor {name!r}: a {type(value).__name__} cannot be sent as a tensor")


def encode_tensors(values: dict[str, Any]) -> list[dict[str, Any]]:
    """v2 tensors for a flat dict of scalars and lists (see the module's rule); ``ValueError`` names the key."""
    tensors = []
    for name, value in values.items():
        if not isinstance(name, str) or not name:
            raise ValueError("tensor names must be non-empty strings")
        if isinstance(value, (list, tuple)):
            datatypes = {_datatype(name, item) for item in value} or {"BYTES"}
            if len(datatypes) > 1:
                raise ValueError(f"tensor {name!r}: list elements must all have one type")
            datatype = datatypes.pop()
            shape = [1, 1] if len(value) == 1 else [len(value)]
            data = list(value)
        else:
            datatype, shape, data = _datatype(name, value), [1], [value]
        if datatype == "FP64":
            data = [float(item) for item in data]
        tensors.append({"name": name, "shape": shape, "datatype": datatype, "data": data})
    return tensors


def _flatten(name: str, data: Any, depth: int) -> list[Any]:
    """Nested tensor data (allowed by v2) as one row-major list, at most ``depth`` levels deep."""
    if not isinstance(data, list):
        raise ValueError(f"tensor {name!r}: data must be a list")
    flat: list[Any] = []
    for item in data:
        if isinstance(item, list):
            if depth <= 1:
                raise ValueError(f"tensor {name!r}: data is nested deeper than its shape")
            flat.extend(_flatten(name, item, depth - 1))
        else:
            flat.append(item)
    return flat


def _element(name: str, datatype: str, item: Any) -> Any:
    if datatype == "BYTES" and isinstance(item, str):
        return item
    if datatype == "BOOL" and isinstance(item, bool):
        return item
    if datatype in FLOAT_TYPES and _is_number(item):
        return float(item)
    if datatype in INT_TYPES and isinstance(item, int) and not isinstance(item, bool):
        return item
    raise ValueError(f"tensor {name!r}: data does not match datatype {datatype}")


def decode_tensors(tensors: Any) -> dict[str, Any]:
    """The flat dict that v2 ``tensors`` encode (see the module's rule); ``ValueError`` names the bad tensor."""
    if not isinstance(tensors, list):
        raise ValueError("tensors must be a list")
    values: dict[str, Any] = {}
    for tensor in tensors:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str) or not tensor["name"]:
            raise ValueError("every tensor must be an object with a name")
        name, shape, datatype = tensor["name"], tensor.get("shape"), tensor.get("datatype")
        if name in values:
            raise ValueError(f"tensor {name!r} appears twice")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise ValueError(f"tensor {name!r}: shape must be a list of integers")
        if any(d < 0 for d in shape):
            raise ValueError(f"tensor {name!r}: shape must not be negative")
        if datatype not in FLOAT_TYPES | INT_TYPES | {"BOOL", "BYTES"}:
            raise ValueError(f"tensor {name!r}: unsupported datatype")
        data = _flatten(name, tensor.get("data"), max(len(shape), 1))
        if len(data) != math.prod(shape):
            raise ValueError(f"tensor {name!r}: shape {shape} does not match {len(data)} data elements")
        items = [_element(name, datatype, item) for item in data]
        values[name] = items[0] if shape == [1] else items
    return values


def pooled_session(pool_size: int = POOL_SIZE) -> requests.Session:
    """A Session for model calls: a pool for ``pool_size`` concurrent calls to the model server."""
    return http.pooled_session(pool_size, hosts=4)


class KServeBackend:
    """Models on a KServe v2 server (KServe, Triton, MLServer, ``flask models serve``), over pooled connections."""

    def __init__(self, base_url: str, session: requests.Session | None = None, timeout: float = 5.0):
        self.base_url = base_url.rstrip("/")
        self._session = session if session is not None else pooled_session()
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"KServeBackend({self.base_url!r})"

    def _model_url(self, model: str) -> str:
        return f"{self.base_url}/v2/models/{quote(model, safe='')}"

    def infer(self, model: str, inputs: dict[str, Any], timeout: float | None = None) -> Prediction:
        """One inference call, bounded per socket operation by ``timeout``; the guard bounds the total."""
        timeout = self._timeout if timeout is None else timeout
        if timeout <= 0:
            raise ModelUnavailable("timeout", "no time left for the call")
        request_id = uuid.uuid4().hex
        try:
            body = orjson.dumps({"id": request_id, "inputs": encode_tensors(inputs)})
        except (ValueError, TypeError) as exc:  # orjson.JSONEncodeError is a TypeError
            raise InvalidModelInput(str(exc) if isinstance(exc, ValueError) else "inputs cannot be encoded") from None
        try:
            response = self._session.post(
                f"{self._model_url(model)}/infer",
                data=body,
                headers=JSON_HEADERS,
                timeout=timeout,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise transport_failure(exc) from None
        if response.status_code != 200:
            raise self._refusal(model, inputs, response)
        return self._prediction(model, request_id, response.content)

    def ready(self, model: str) -> bool:
        """Whether the server says ``model`` is ready; False on any failure, within a short timeout."""
        try:
            response = self._session.get(
                f"{self._model_url(model)}/ready",
                headers=JSON_HEADERS,
                timeout=min(self._timeout, READY_TIMEOUT),
                allow_redirects=False,
            )
        except requests.RequestException:
            return False
        return response.status_code == 200

    @staticmethod
    def _refusal(model: str, inputs: dict[str, Any], response: requests.Response) -> Exception:
        """InvalidModelInput for a 400 that says the input is invalid (naming inputs, never values); else down."""
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if response.status_code == 400 and isinstance(error, str) and "invalid input" in error.lower():
            named = [key for key in inputs if re.search(rf"\b{re.escape(key)}\b", error)]
            return InvalidModelInput(f"{model} rejected its input" + (f" ({', '.join(named)})" if named else ""))
        return ModelUnavailable("unavailable", f"HTTP {response.status_code}")

    @staticmethod
    def _prediction(model: str, request_id: str, content: bytes) -> Prediction:
        body = json_object(content)
        version = body.get("model_version")
        if not isinstance(version, str) or not version:
            raise bad_response("response has no model_version")
        if body.get("model_name") != model:
            raise bad_response("response names another model")
        if "id" in body and body["id"] != request_id:
            raise bad_response("response id does not match the request")
        if not isinstance(body.get("outputs"), list) or not body["outputs"]:
            raise bad_response("response has no outputs")
        try:
            outputs = decode_tensors(body["outputs"])
        except ValueError as exc:
            raise bad_response(str(exc)) from None
        return Prediction(model=model, version=version, outputs=outputs)
