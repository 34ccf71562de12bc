"""HTTP helpers every area shares: the pooled outbound Session, and the JSON answers of our JSON APIs (an
OperationOutcome for every error)."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
import requests
from flask import Blueprint, Flask, Response, current_app, request
from requests.adapters import HTTPAdapter
from urllib3.exceptions import DecodeError, HTTPError, ReadTimeoutError
from werkzeug.exceptions import HTTPException

from app.audit import audit
from app.logs import describe

log = logging.getLogger(__name__)

_UNROUTED = "http.unrouted"  # app.extensions: URL prefix -> handler of its requests that match no route


def pooled_session(pool_size: int = 32, hosts: int = 8) -> requests.Session:
    """A Session with a connection pool for ``pool_size`` concurrent calls per host, no retries, and no proxy
    lookups from the environment (``trust_env`` costs about a third of a pooled call's client CPU)."""
    session = requests.Session()
    session.trust_env = False
    adapter = HTTPAdapter(pool_connections=hosts, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def read_body(response: requests.Response, *, limit: int, deadline: float) -> bytes:
    """The body of a response opened with ``stream=True``, read as it arrives: ``requests.Timeout`` once the
    monotonic ``deadline`` passes (a server sending a byte at a time cannot stretch a wait, as it can with a
    read timeout alone), ``ValueError`` when it is larger than ``limit`` bytes."""
    body = bytearray()
    try:
        while chunk := response.raw.read1(64 * 1024, decode_content=True):
            body += chunk
            if len(body) > limit:
                raise ValueError(f"larger than {limit} bytes")
            if time.monotonic() > deadline:
                raise requests.Timeout("the body came too slowly")
    except ReadTimeoutError:
        raise requests.Timeout("the body came too slowly") from None
    except DecodeError:
        raise requests.exceptions.ContentDecodingError("the body could not be decoded") from None
    except HTTPError as exc:
        raise requests.ConnectionError(f"the body was cut off ({type(exc).__name__})") from None
    return bytes(body)


def json_response(body: Any, status: int = 200, content_type: str = "application/json") -> Response:
    return Response(orjson.dumps(body), status=status, content_type=content_type)


def operation_outcome(status: int, code: str, diagnostics: str, expression: str | None = None) -> Response:
    """An OperationOutcome for a non-2xx answer (recommended by CDS Hooks 3.0; harmless in 2.0)."""
    issue: dict[str, Any] = {"severity": "error", "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = [expression]
    body = {"resourceType": "OperationOutcome", "issue": [issue]}
    return json_response(body, status, "application/fhir+json")


def http_error_outcome(exc: HTTPException) -> Response:
    """A Flask/Werkzeug HTTP error (404, 405, 413...) as an OperationOutcome with its status."""
    return operation_outcome(exc.code or 500, "processing", exc.description or exc.name)


def unexpected_error_outcome(exc: Exception) -> Response:
    """A 500 that tells the caller nothing; the log line names the exception's type and place, never its text."""
    log.error("unhandled error: %s", describe(exc))
    return operation_outcome(500, "exception", "Internal error")


def operation_outcome_errors(bp: Blueprint) -> None:
    """Answer every error of ``bp``'s routes with an OperationOutcome (call at import, before registration)."""
    bp.register_error_handler(HTTPException, http_error_outcome)
    bp.register_error_handler(Exception, unexpected_error_outcome)


def answer_unrouted(app: Flask, prefix: str, handler: Callable[[HTTPException], Response]) -> None:
    """Let ``handler`` answer requests under ``prefix`` that match no route (404, 405): Flask gives those to the
    application's error handlers only, never to a blueprint's. Elsewhere Flask's own answer stands."""
    handlers = app.extensions.setdefault(_UNROUTED, {})
    if not handlers:
        app.register_error_handler(HTTPException, _answer_unrouted)
    handlers[prefix.rstrip("/")] = handler


def _answer_unrouted(exc: HTTPException):
    if request.url_rule is None:
        for prefix, handler in current_app.extensions[_UNROUTED].items():
            if request.path == prefix or request.path.startswith(prefix + "/"):
                return handler(exc)
    return exc  # Flask renders it as it would without this handler


def require_admin() -> Response | None:
    """Operators authenticate with ADMIN_TOKEN as a bearer token; without it set, the admin API is off."""
    token = current_app.config["ADMIN_TOKEN"]
    if not token:
        return operation_outcome(403, "forbidden", "The admin API is disabled: set ADMIN_TOKEN to enable it")
    scheme, _, given = (request.headers.get("Authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        response = operation_outcome(401, "login", "A valid admin bearer token is required")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    return None


def _audit_admin(response: Response) -> Response:
    audit(current_app).record("admin", method=request.method, path=request.path, status=response.status_code)
    response.headers["Cache-Control"] = "no-store"
    return response


def admin_blueprint(name: str, import_name: str, url_prefix: str) -> Blueprint:
    """A blueprint of the admin API: ADMIN_TOKEN required, OperationOutcome errors (no CORS: operators call it,
    never a browser app), every request in the audit log, nothing cached."""
    bp = Blueprint(name, import_name, url_prefix=url_prefix)
    bp.before_request(require_admin)
    operation_outcome_errors(bp)
    bp.after_request(_audit_admin)
    return bp
