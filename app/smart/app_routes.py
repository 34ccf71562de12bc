"""The SMART app's HTTP face under ``/smart/``: launch, callback, the result page and logout; routes stay thin.

The browser only ever holds ``smart_session``, a random token naming a server-side session (app.smart.sessions);
tokens, codes and verifiers never reach a URL, a log line or a readable cookie.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import requests
from flask import Blueprint, Flask, Response, current_app, redirect, request
from werkzeug.exceptions import HTTPException

from app.http import pooled_session
from app.logs import describe
from app.smart import launch
from app.smart.launch import ClientSettings, DiscoveryCache, LaunchError, LaunchExpired
from app.smart.sessions import SessionStore, SmartSession, load_or_create_key

log = logging.getLogger(__name__)

COOKIE_NAME = "smart_session"
COOKIE_PATH = "/smart"
# An EHR that embeds the app in an iframe must have its origin added to frame-ancestors.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the callback URL carries the authorization code
    "Cache-Control": "no-store",
}
_STATE = "smart_app"
_EXPIRED = "This launch has expired or was signed out. Start again from the EHR."

bp = Blueprint("smart_app", __name__, url_prefix="/smart")


class ResultUnavailable(LaunchError):
    status = 404
    title = "Result not available"


class PatientMismatch(LaunchError):
    status = 403
    title = "Different patient"


class CsrfFailed(LaunchError):
    title = "This form has expired"


@dataclass(frozen=True)
class SmartApp:
    """What the SMART app's routes share for the application's lifetime."""

    store: SessionStore
    http: requests.Session
    discovery: DiscoveryCache
    client: ClientSettings


def _app() -> SmartApp:
    return current_app.extensions[_STATE]


def _session() -> SmartSession | None:
    return _app().store.load(request.cookies.get(COOKIE_NAME))


def _set_cookie(response: Response, session: SmartSession) -> None:
    response.set_cookie(
        COOKIE_NAME,
        session.token,
        max_age=int((session.expires_at - session.created_at).total_seconds()),
        path=COOKIE_PATH,
        secure=current_app.config["SESSION_COOKIE_SECURE"],
        httponly=True,
        samesite="Lax",  # the callback arrives as a top-level cross-site redirect from the EHR
    )


def _clear_cookie(response: Response) -> None:
    response.delete_cookie(
        COOKIE_NAME, path=COOKIE_PATH, secure=current_app.config["SESSION_COOKIE_SECURE"], httponly=True, samesite="Lax"
    )


def _allowed_iss(url: str) -> bool:
    """S-1: the allowlist is the union of the trusted clients' FHIR servers."""
    return any(client.allows_fhir_server(url) for client in current_app.extensions["cds"].clients)


MAX_PENDING_LAUNCHES = 5


@bp.get("/launch")
def launch_route():
    """EHR launch (S-1..S-3): start a fresh session holding the pending launch, then go to the EHR's authorize."""
    smart = _app()
    url, pending = launch.begin(
        request.args.get("iss", ""),
        request.args.get("launch", ""),
        allowed=_allowed_iss,
        settings=smart.client,
        http=smart.http,
        cache=smart.discovery,
    )
    # A launch adds to this browser's session and ends nothing: a link from another site that starts a launch
    # must not sign the clinician out. Pending launches are kept by state; the oldest go past a handful.
    current = _session()
    if current is None:
        current = smart.store.create({"pending": {pending["state"]: pending}})
    else:
        pendings = {**current.state.get("pending", {}), pending["state"]: pending}
        kept = dict(list(pendings.items())[-MAX_PENDING_LAUNCHES:])
        current = smart.store.save(current, {**current.state, "pending": kept})
    response = redirect(url, 302)
    _set_cookie(response, current)
    return response


@bp.get("/callback")
def callback():
    """The EHR's redirect back: state bound to this browser, code exchange, then a new session id (no fixation)."""
    smart = _app()
    current = _session()
    pendings = dict(current.state.get("pending") or {}) if current else {}
    pending = pendings.pop(request.args.get("state") or "", None)
    try:
        token = launch.complete(pending, request.args.to_dict(), settings=smart.client)
    except launch.StateMismatch:
        raise
    except LaunchError:
        smart.store.save(current, {**current.state, "pending": pendings})  # a pending launch is used once
        raise
    state = {"token": token, "csrf": secrets.token_urlsafe(32), "pending": pendings}
    session = smart.store.rotate(current, state)
    response = redirect("/smart/app", 302)
    _set_cookie(response, session)
    return response


@bp.get("/app")
def app_page():
    """The explanation page for the card's result, with the launch's patient, user and granted scopes."""
    from app import results
    from app.jobs import ledger
    from app.smart import pages

    smart = _app()
    current = _session()
    if current is None or "token" not in current.state:
        raise LaunchExpired(_EXPIRED)
    token = current.state["token"]
    if launch.needs_refresh(token):
        try:
            token = launch.refresh(token, settings=smart.client)
        except LaunchExpired:
            smart.store.delete(current.token)
            raise
        current = smart.store.save(current, {**current.state, "token": token})

    engine = current_app.extensions["db"]
    app_context = token.get("appContext")
    result = results.load(engine, app_context) if isinstance(app_context, str) and app_context else None
    if result is None:
        raise ResultUnavailable("This result is no longer available. Open the patient's chart again for a new one.")
    launched_for = launch.patient_reference_id(token.get("patient"))
    result_for = launch.patient_reference_id(result.patient_id)
    if launched_for and result_for and launched_for != result_for:
        raise PatientMismatch("This result belongs to a different patient than the one open in the EHR.")
    # Patient ids are only unique within one EHR: the result must come from the FHIR server that launched us.
    if result.fhir_server and result.fhir_server.rstrip("/") != token["iss"].rstrip("/"):
        raise PatientMismatch("This result was made for another EHR than the one that opened this page.")

    context = _launch_context(token, pages.LaunchContext)
    job = ledger.get(engine, result.data["job_id"]) if result.kind == "job" else None
    html = pages.render_result(result, context, job=job, csrf_token=current.state["csrf"])
    return Response(html, 200, content_type="text/html; charset=utf-8")


def _launch_context(token: dict, make_context):
    """The page's view of the launch: the banner's Patient (fetched with the launch's token), user and scopes."""
    smart = _app()
    fhir_get = launch.fhir_getter(token["iss"], token["access_token"], smart.http, smart.client.timeout)
    need_banner = token.get("need_patient_banner", True) is not False  # absent: show the banner
    patient_id = launch.patient_reference_id(token.get("patient"))
    patient = None
    if need_banner and patient_id:
        try:
            patient = fhir_get(f"Patient/{launch.quote_path(patient_id)}")
        except (requests.RequestException, ValueError) as exc:
            log.warning("patient banner fetch failed: %s", describe(exc))
    return make_context(
        patient=patient,
        need_patient_banner=need_banner,
        user=token.get("user"),
        granted_scopes=launch.granted_scopes(token),
        fhir_get=fhir_get,
    )


@bp.post("/logout")
def logout():
    """Sign out: the form's CSRF token must match the session's; the session is deleted and the cookie cleared."""
    from app.smart import pages

    smart = _app()
    current = _session()
    expected = (current.state.get("csrf") if current else None) or ""
    given = request.form.get("csrf_token", "")
    if not expected or not hmac.compare_digest(expected.encode(), given.encode()):
        raise CsrfFailed("This sign-out form has expired. Reload the page and try again.")
    smart.store.delete(current.token)
    html = pages.render_error("Signed out", "You have signed out of the app. Open it again from the EHR.")
    response = Response(html, 200, content_type="text/html; charset=utf-8")
    _clear_cookie(response)
    return response


@bp.errorhandler(LaunchError)
def launch_error(exc: LaunchError):
    from app.smart import pages

    return Response(pages.render_error(exc.title, exc.message), exc.status, content_type="text/html; charset=utf-8")


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException):
    """An HTML page, not the CDS endpoints' OperationOutcome, for the app's own 4xx (e.g. a wrong method)."""
    from app.smart import pages

    html = pages.render_error(exc.name, exc.description or exc.name)
    return Response(html, exc.code or 500, content_type="text/html; charset=utf-8")


@bp.errorhandler(Exception)
def unexpected_error(exc: Exception):
    if isinstance(exc, HTTPException):
        return http_error(exc)
    log.error("SMART app error: %s", describe(exc))
    from app.smart import pages

    html = pages.render_error("Something went wrong", "The app could not show this page. Try again from the EHR.")
    return Response(html, 500, content_type="text/html; charset=utf-8")


def _security_headers(response: Response) -> Response:
    """Every answer under /smart/ (errors and 404s included) gets the same protective headers."""
    if request.path == COOKIE_PATH or request.path.startswith(COOKIE_PATH + "/"):
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
    return response


def init_app(app: Flask) -> None:
    """The session store (encryption key in ``instance/keys``), the blueprint and the security headers."""
    if _STATE in app.extensions:
        return
    app.extensions[_STATE] = SmartApp(
        store=SessionStore(
            app.extensions["db"],
            load_or_create_key(Path(app.instance_path) / "keys"),
            int(app.config["SMART_SESSION_TTL_S"]),
        ),
        http=pooled_session(),
        discovery=DiscoveryCache(),
        client=ClientSettings(
            client_id=app.config["SMART_CLIENT_ID"],
            client_secret=app.config.get("SMART_CLIENT_SECRET"),
            redirect_uri=app.config["PUBLIC_BASE_URL"].rstrip("/") + "/smart/callback",
            timeout=float(app.config["FHIR_TIMEOUT_S"]),
        ),
    )
    app.register_blueprint(bp)
    app.after_request(_security_headers)
