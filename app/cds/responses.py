"""The CDS endpoints' own HTTP answers: CORS (on every answer, errors included) and an OperationOutcome for each
of the area's errors. ``json_response`` and ``operation_outcome`` live in ``app.http`` (re-exported here)."""

from __future__ import annotations

from flask import Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from app.cds.errors import CdsError, ClientNotTrusted
from app.http import http_error_outcome, json_response, operation_outcome

__all__ = ["add_cors_headers", "cds_error", "json_response", "operation_outcome", "unrouted_error"]


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


def cds_error(exc: CdsError) -> Response:
    """The OperationOutcome for one of the area's errors; the reason (never PHI) goes to the call's audit record."""
    if "audit" in g:
        g.audit["error"] = getattr(exc, "reason", None) or exc.expression or exc.code
    response = operation_outcome(exc.status, exc.code, exc.diagnostics, exc.expression)
    if isinstance(exc, ClientNotTrusted):
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def unrouted_error(exc: HTTPException) -> Response:
    """A 404 or 405 under a CDS path that matched no route: an OperationOutcome with CORS, as the routes answer."""
    return add_cors_headers(http_error_outcome(exc))
