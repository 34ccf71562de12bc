"""The CDS endpoints' own HTTP answers: CORS (on every answer, errors included) and an OperationOutcome for each
of the area's errors. ``json_response`` and ``operation_outcome`` live in ``app.http`` (re-exported here)."""

from __future__ import annotations

from flask import Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from app.cds.errors import CdsError, ClientNotTrusted
from app.development import is_development_origin
from app.http import http_error_outcome, json_response, operation_outcome

__all__ = ["add_cors_headers", "cds_error", "json_response", "operation_outcome", "unrouted_error"]


def add_cors_headers(response: Response) -> Response:
    """CORS on every answer, errors included, or the browser hides them from the Sandbox (R-37)."""
    allowed = _allowed_origin(request.headers.get("Origin"))
    if allowed is None:
        return response
    response.headers["Access-Control-Allow-Origin"] = allowed
    if allowed != "*":
        response.vary.add("Origin")
    response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
    if request.method == "OPTIONS":
        response.headers["Access-Control-Max-Age"] = "600"
    return response


def _allowed_origin(origin: str | None) -> str | None:
    """What Access-Control-Allow-Origin says to ``origin``, or None: CORS_ALLOWED_ORIGINS when set; unset, every
    origin, but while development settings are on only the Sandbox and pages on this host, so that no other site
    drives a developer's service from the developer's browser."""
    allowed = current_app.config["CORS_ALLOWED_ORIGINS"]
    if allowed is None and current_app.config.get("DEVELOPMENT_SETTINGS"):
        return origin if is_development_origin(origin) else None
    if allowed is None or "*" in allowed:
        return "*"
    return origin if origin in allowed else None


def cds_error(exc: CdsError) -> Response:
    """The OperationOutcome for one of the area's errors; the reason (never PHI) goes to the call's audit record."""
    if "audit" in g:
        g.audit["error"] = getattr(exc, "reason", None) or exc.expression or exc.code
    response = operation_outcome(exc.status, exc.code, exc.diagnostics, exc.expression)
    if isinstance(exc, ClientNotTrusted):
        response.headers["WWW-Authenticate"] = "Bearer"
    if getattr(exc, "retry_after", None):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def unrouted_error(exc: HTTPException) -> Response:
    """A 404 or 405 under a CDS path that matched no route: an OperationOutcome with CORS, as the routes answer."""
    return add_cors_headers(http_error_outcome(exc))
