"""The SMART app's HTTP face under ``/smart/``: launch, callback, the result page and logout; routes stay thin.

A launch writes nothing on the server: its pending state goes to the browser sealed in a ``smart_launch_*`` cookie
(app.smart.sessions). Only a completed sign-in makes a session, named by ``smart_session``, a random token. Tokens,
codes and verifiers never reach a URL, a log line or a readable cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import requests
from flask import Blueprint, Flask, Response, after_this_request, current_app, redirect, request
from werkzeug.exceptions import HTTPException

from app import results
from app.cds.clients import FhirBase
from app.clock import Clock, app_clock
from app.fhir.compartment import Compartment
from app.http import pooled_session
from app.logs import describe
from app.smart import launch, pages
from app.smart.launch import ClientSettings, DiscoveryCache, LaunchError, LaunchExpired, NoPatientContext
from app.smart.sessions import PendingLaunchSeal, SessionStore, SmartSession, load_or_create_key

log = logging.getLogger(__name__)

COOKIE_NAME = "smart_session"
COOKIE_PATH = "/smart"
LAUNCH_COOKIE_PREFIX = "smart_launch_"
PENDING_LAUNCH_TTL_S = 600  # from the launch to the EHR's redirect back: the clinician may have to sign in
MAX_PENDING_LAUNCHES = 5
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
    pending: PendingLaunchSeal
    http: requests.Session
    discovery: DiscoveryCache
    client: ClientSettings
    clock: Clock  # the app's: token refresh, id_token times, session and pending-launch lifetimes


def _app() -> SmartApp:
    return current_app.extensions[_STATE]


def _session() -> SmartSession | None:
    return _app().store.load(request.cookies.get(COOKIE_NAME))


def _set_cookie(response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=COOKIE_PATH,
        secure=current_app.config["SESSION_COOKIE_SECURE"],
        httponly=True,
        samesite="Lax",  # the callback arrives as a top-level cross-site redirect from the EHR
    )


def _clear_cookie(response: Response, name: str = COOKIE_NAME) -> None:
    response.delete_cookie(
        name, path=COOKIE_PATH, secure=current_app.config["SESSION_COOKIE_SECURE"], httponly=True, samesite="Lax"
    )


def _launch_cookie(state: str) -> str:
    """The cookie that carries the pending launch with this ``state``: one per launch, so several can be pending."""
    return LAUNCH_COOKIE_PREFIX + hashlib.sha256(state.encode("utf-8")).hexdigest()[:16]


def _allowlisted_base(url: str) -> FhirBase | None:
    """S-1: ``iss`` must be exactly one of the trusted clients' FHIR servers."""
    for client in current_app.extensions["cds"].clients:
        base = client.fhir_base(url)
        if base is not None:
            return base
    return None


@bp.get("/launch")
def launch_route():
    """EHR launch (S-1..S-3): the pending launch goes to this browser, sealed; then on to the EHR's authorize.

    Nothing is written on the server and nothing ends: a link from another site that starts a launch neither
    costs a database row nor signs the clinician out. Past a handful of pending launches the oldest are dropped.
    """
    smart = _app()
    url, pending = launch.begin(
        request.args.get("iss", ""),
        request.args.get("launch", ""),
        base_of=_allowlisted_base,
        settings=smart.client,
        http=smart.http,
        cache=smart.discovery,
    )
    response = redirect(url, 302)
    others = [(n, v) for n, v in request.cookies.items() if n.startswith(LAUNCH_COOKIE_PREFIX)]
    others.sort(key=lambda item: smart.pending.sealed_at(item[1]) or 0)
    for name, _ in others[: max(0, len(others) - MAX_PENDING_LAUNCHES + 1)]:
        _clear_cookie(response, name)
    _set_cookie(response, _launch_cookie(pending["state"]), smart.pending.seal(pending), PENDING_LAUNCH_TTL_S)
    return response


@bp.get("/callback")
def callback():
    """The EHR's redirect back: ``state`` must open this browser's sealed pending launch, which is used once; after
    the code exchange the browser gets a new session (any earlier one of this browser ends)."""
    smart = _app()
    state = request.args.get("state") or ""
    cookie = _launch_cookie(state)
    pending = smart.pending.open(request.cookies.get(cookie)) if state else None
    if pending is not None:

        @after_this_request
        def used_once(response: Response) -> Response:
            _clear_cookie(response, cookie)
            return response

    token = launch.complete(pending, request.args.to_dict(), settings=smart.client, now=smart.clock.now())
    session = smart.store.create({"token": token, "csrf": secrets.token_urlsafe(32)})
    smart.store.delete(request.cookies.get(COOKIE_NAME))
    response = redirect("/smart/app", 302)
    _set_cookie(response, COOKIE_NAME, session.token, int((session.expires_at - session.created_at).total_seconds()))
    return response


@bp.get("/app")
def app_page():
    """The explanation page for the card's result, with the launch's patient, user and granted scopes."""
    smart = _app()
    current = _session()
    if current is None or "token" not in current.state:
        raise LaunchExpired(_EXPIRED)
    token = current.state["token"]
    now = smart.clock.now()
    if launch.needs_refresh(token, now):
        try:
            token = launch.refresh(token, settings=smart.client, now=now)
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
    if launched_for is None:
        raise NoPatientContext(launch.NO_PATIENT)
    if launch.patient_reference_id(result.patient_id) != launched_for:
        raise PatientMismatch("This result belongs to a different patient than the one open in the EHR.")
    # Patient ids are only unique within one EHR: the result must come from the FHIR server that launched us.
    if result.fhir_server and result.fhir_server.rstrip("/") != token["iss"].rstrip("/"):
        raise PatientMismatch("This result was made for another EHR than the one that opened this page.")

    context = _launch_context(token, pages.LaunchContext)
    return _html(pages.render_result(result, context, csrf_token=current.state["csrf"]))


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
        if patient is not None and not _is_patient(patient, patient_id, token["iss"]):
            log.warning("patient banner fetch answered with another resource than the launch's Patient")
            patient = None
    return make_context(
        patient=patient,
        need_patient_banner=need_banner,
        user=token.get("user"),
        granted_scopes=launch.granted_scopes(token),
        fhir_get=fhir_get,
        fhir_server=token["iss"],
    )


def _is_patient(resource: dict, patient_id: str, iss: str) -> bool:
    """Whether a read of the launch's Patient answered with that Patient (and not another's data)."""
    return resource.get("resourceType") == "Patient" and Compartment(patient_id, iss).holds(resource)


@bp.post("/logout")
def logout():
    """Sign out: the form's CSRF token must match the session's; the session is deleted and the cookie cleared."""

    smart = _app()
    current = _session()
    expected = (current.state.get("csrf") if current else None) or ""
    given = request.form.get("csrf_token", "")
    if not expected or not hmac.compare_digest(expected.encode(), given.encode()):
        raise CsrfFailed("This sign-out form has expired. Reload the page and try again.")
    smart.store.delete(current.token)
    response = _html(pages.render_error("Signed out", "You have signed out of the app. Open it again from the EHR."))
    _clear_cookie(response)
    return response


def _html(page: str, status: int = 200) -> Response:
    """An HTML answer; a lone surrogate that reached the page becomes "?" instead of failing the answer."""
    return Response(page.encode("utf-8", "replace"), status, content_type="text/html; charset=utf-8")


@bp.errorhandler(LaunchError)
def launch_error(exc: LaunchError):
    return _html(pages.render_error(exc.title, exc.message), exc.status)


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException):
    """An HTML page, not the CDS endpoints' OperationOutcome, for the app's own 4xx (e.g. a wrong method)."""
    return _html(pages.render_error(exc.name, exc.description or exc.name), exc.code or 500)


@bp.errorhandler(Exception)
def unexpected_error(exc: Exception):
    if isinstance(exc, HTTPException):
        return http_error(exc)
    log.error("SMART app error: %s", describe(exc))
    return _html(
        pages.render_error("Something went wrong", "The app could not show this page. Try again from the EHR."), 500
    )


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
    fernet = load_or_create_key(Path(app.config["KEYS_DIR"]))
    clock = app_clock(app)
    app.extensions[_STATE] = SmartApp(
        store=SessionStore(app.extensions["db"], fernet, int(app.config["SMART_SESSION_TTL_S"]), clock=clock),
        pending=PendingLaunchSeal(fernet, PENDING_LAUNCH_TTL_S, clock=clock),
        http=pooled_session(),
        discovery=DiscoveryCache(clock=clock.monotonic),
        client=ClientSettings(
            client_id=app.config["SMART_CLIENT_ID"],
            client_secret=app.config.get("SMART_CLIENT_SECRET"),
            redirect_uri=app.config["PUBLIC_BASE_URL"].rstrip("/") + "/smart/callback",
            timeout=float(app.config["FHIR_TIMEOUT_S"]),
        ),
        clock=clock,
    )
    app.register_blueprint(bp)
    app.after_request(_security_headers)
