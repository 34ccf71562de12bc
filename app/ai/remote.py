"""Failures of remote model calls, mapped once for every HTTP backend (KServe v2, chat completions)."""

from __future__ import annotations

import orjson
import requests
from urllib3.exceptions import ReadTimeoutError

from app.ai.types import ModelUnavailable


def transport_failure(exc: requests.RequestException) -> ModelUnavailable:
    """Map a transport failure; a read timeout while the body streams arrives wrapped in a ConnectionError."""
    if isinstance(exc, requests.Timeout) or any(isinstance(arg, ReadTimeoutError) for arg in exc.args):
        return ModelUnavailable("timeout", "no answer within the socket timeout")
    return ModelUnavailable("unavailable", type(exc).__name__)


def bad_response(detail: str) -> ModelUnavailable:
    return ModelUnavailable("bad-response", detail)


def json_object(content: bytes) -> dict:
    """A model server's answer as a JSON object, or ModelUnavailable("bad-response")."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise bad_response("response is not JSON") from None
    if not isinstance(body, dict):
        raise bad_response("response is not a JSON object")
    return body
