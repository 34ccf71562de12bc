"""Failures of remote model calls, mapped once for every HTTP backend (KServe v2, chat completions)."""

from __future__ import annotations

import requests
from urllib3.exceptions import ReadTimeoutError

from app.ai import ModelUnavailable


def transport_failure(exc: requests.RequestException) -> ModelUnavailable:
    """Map a transport failure; a read timeout while the body streams arrives wrapped in a ConnectionError."""
    if isinstance(exc, requests.Timeout) or any(isinstance(arg, ReadTimeoutError) for arg in exc.args):
        return ModelUnavailable("timeout", "no answer within the socket timeout")
    return ModelUnavailable("unavailable", type(exc).__name__)


def bad_response(detail: str) -> ModelUnavailable:
    return ModelUnavailable("bad-response", detail)
