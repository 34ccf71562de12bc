"""JSON answers of the CDS endpoints: fast serialisation, OperationOutcome for every error, CORS everywhere."""

from __future__ import annotations

from typing import Any

import orjson
from flask import Response, current_app, request


def json_response(body: Any, status: int = 200, content_type: str = "application/json") -> Response:
    return Response(orjson.dumps(body), status=status, content_type=content_type)


def operation_outcome(status: int, code: str, diagnostics: str, expression: str | None = None) -> Response:
    """An OperationOutcome for a non-2xx answer (recommended by CDS Hooks 3.0; harmless in 2.0)."""
    issue: dict[str, Any] = {"severity": "error", "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = [expression]
    body = {"resourceType": "OperationOutcome", "issue": [issue]}
    return json_response(body, status, "application/fhir+json")


def add_cors_headers(response: Response) -> Response:
    """CORS on every answer, errors included, or the browser hides them from the Sandbox (R-37)."""
    allowed = current_app.config["CORS_ALLOWED_ORIGINS"]
    origin = request.headers.get("Origin")
    if "*" in allowed:
        response.headers["Access-Control-Allow-Origin"] = "*"
    elif origin and origin in allowed:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.vary.add("Origin")
    else:
        return response
    response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
    if request.method == "OPTIONS":
        response.headers["Access-Control-Max-Age"] = "600"
    return response
