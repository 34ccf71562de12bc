"""The SMART EHR launch as plain functions: discovery, the authorize URL, the code exchange and token refresh.

Nothing here touches Flask's request or the session store, so each step is testable alone. Failures raise a
``LaunchError`` subclass that carries the HTTP status and the words the error page shows (never a token).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import jwt
import requests
from authlib.integrations.base_client import OAuthError
from authlib.integrations.requests_client import OAuth2Session

from app.logs import describe

log = logging.getLogger(__name__)

# The least the explanation page needs (S-8): who the user is, the patient for the banner, and live values.
# online_access: EHRs issue a refresh token only when asked, and the page refreshes while the session lives.
SCOPE = "launch openid fhirUser online_access patient/Patient.r patient/Observation.rs"
ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "ES256", "ES384", "PS256", "PS384"]
DISCOVERY_TTL_S = 300.0
REFRESH_LEEWAY_S = 30.0
# Members of the token response kept in the session (S-5); anything else the EHR sends is dropped.
TOKEN_MEMBERS = (
    "access_token",
    "refresh_token",
    "scope",
    "patient",
    "encounter",
    "need_patient_banner",
    "appContext",
    "id_token",
    "fhirContext",
)


class LaunchError(Exception):
    """A launch that cannot go on; ``status``, ``title`` and ``message`` are what the error page shows."""

    status = 400
    title = "The app could not be launched"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class IssuerNotAllowed(LaunchError):
    title = "This EHR is not configured"


class DiscoveryFailed(LaunchError):
    status = 502
    title = "The EHR's SMART configuration is unavailable"


class PkceUnsupported(LaunchError):
    status = 502
    title = "The EHR does not support PKCE"


class StateMismatch(LaunchError):
    title = "This sign-in did not start here"


class AccessDenied(LaunchError):
    status = 403
    title = "Access denied"


class TokenExchangeFailed(LaunchError):
    status = 502
    title = "The EHR did not grant access"


class LaunchExpired(LaunchError):
    status = 401
    title = "Launch expired"


@dataclass(frozen=True)
class ClientSettings:
    """How we present ourselves to an EHR's authorization server."""

    client_id: str
    client_secret: str | None
    redirect_uri: str
    timeout: float


@dataclass(frozen=True)
class SmartConfiguration:
    """The parts of ``.well-known/smart-configuration`` the launch uses."""

    authorization_endpoint: str
    token_endpoint: str
    code_challenge_methods: frozenset[str]
    issuer: str | None = None
    jwks_uri: str | None = None


class DiscoveryCache:
    """Discovery documents per ``iss`` for a few minutes, so each launch does not refetch them."""

    def __init__(self, ttl_s: float = DISCOVERY_TTL_S):
        self.ttl = ttl_s
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, SmartConfiguration]] = {}

    def get(self, iss: str) -> SmartConfiguration | None:
        with self._lock:
            entry = self._entries.get(iss)
        return entry[1] if entry and entry[0] > time.monotonic() else None

    def put(self, iss: str, config: SmartConfiguration) -> None:
        with self._lock:
            self._entries[iss] = (time.monotonic() + self.ttl, config)


def discover(iss: str, http: requests.Session, timeout: float, cache: DiscoveryCache) -> SmartConfiguration:
    """``GET {iss}/.well-known/smart-configuration`` (S-2), cached; raises DiscoveryFailed or PkceUnsupported."""
    config = cache.get(iss)
    if config is None:
        url = iss.rstrip("/") + "/.well-known/smart-configuration"
        try:
            response = http.get(url, headers={"Accept": "application/json"}, timeout=timeout, allow_redirects=False)
            response.raise_for_status()
            document = response.json()
            config = SmartConfiguration(
                authorization_endpoint=_endpoint(document, "authorization_endpoint"),
                token_endpoint=_endpoint(document, "token_endpoint"),
                code_challenge_methods=frozenset(document.get("code_challenge_methods_supported") or ()),
                issuer=document.get("issuer") if isinstance(document.get("issuer"), str) else None,
                jwks_uri=_endpoint(document, "jwks_uri") if "jwks_uri" in document else None,
            )
        except (requests.RequestException, ValueError, AttributeError) as exc:
            log.warning("SMART discovery failed for %s: %s", iss, describe(exc))
            raise DiscoveryFailed("The EHR's SMART configuration could not be read. Try again later.") from None
        cache.put(iss, config)
    if "S256" not in config.code_challenge_methods:
        raise PkceUnsupported(
            "The EHR does not list S256 in code_challenge_methods_supported, so the launch cannot be protected "
            "with PKCE. Ask the EHR's administrators to enable it."
        )
    return config


def _endpoint(document: dict, member: str) -> str:
    value = document.get(member)
    if not isinstance(value, str) or not value.startswith(("https://", "http://")):
        raise ValueError(f"{member} missing")
    return value


def _oauth(settings: ClientSettings, **kwargs: Any) -> OAuth2Session:
    session = OAuth2Session(
        client_id=settings.client_id,
        client_secret=settings.client_secret,
        redirect_uri=settings.redirect_uri,
        code_challenge_method="S256",
        default_timeout=settings.timeout,
        **kwargs,
    )
    session.trust_env = False
    return session


def begin(
    iss: str,
    launch: str,
    *,
    allowed: Callable[[str], bool],
    settings: ClientSettings,
    http: requests.Session,
    cache: DiscoveryCache,
) -> tuple[str, dict[str, Any]]:
    """Check ``iss`` (S-1), discover (S-2) and build the authorize URL (S-3).

    Returns the URL to redirect the browser to and the pending state to keep server-side.
    """
    if not iss or not launch:
        raise LaunchError("The EHR must open this app with both iss and launch. Start again from the EHR.")
    if "#" in iss or "?" in iss or not allowed(iss):  # iss is a FHIR base: no query, no fragment
        raise IssuerNotAllowed(
            "This EHR's FHIR server is not on the list of servers this gateway trusts. "
            "An administrator can add it to the trusted clients file."
        )
    config = discover(iss, http, settings.timeout, cache)
    code_verifier = secrets.token_urlsafe(64)
    state = secrets.token_urlsafe(32)
    with _oauth(settings, scope=SCOPE) as oauth:
        url, _ = oauth.create_authorization_url(
            config.authorization_endpoint, state=state, code_verifier=code_verifier, aud=iss, launch=launch
        )
    pending = {
        "state": state,
        "code_verifier": code_verifier,
        "iss": iss,
        "launch": launch,
        "authorization_endpoint": config.authorization_endpoint,
        "token_endpoint": config.token_endpoint,
        "issuer": config.issuer,
        "jwks_uri": config.jwks_uri,
    }
    return url, pending


def complete(pending: dict[str, Any] | None, args: dict[str, str], *, settings: ClientSettings) -> dict[str, Any]:
    """Check the callback's ``state`` against this browser's pending launch, then exchange the code (S-4).

    Returns the token state to keep server-side (S-5, S-7).
    """
    stored = (pending or {}).get("state")
    given = args.get("state") or ""
    if not stored or not hmac.compare_digest(stored.encode(), given.encode()):
        raise StateMismatch(
            "This sign-in response does not belong to a launch started in this browser. Start again from the EHR."
        )
    if args.get("error"):
        raise AccessDenied(
            "The EHR did not give this app access (the request was denied). Start again from the EHR to allow access."
        )
    if not args.get("code"):
        raise LaunchError("The EHR's response had no authorization code. Start again from the EHR.")
    try:
        with _oauth(settings) as oauth:
            token = oauth.fetch_token(
                pending["token_endpoint"],
                grant_type="authorization_code",
                code=args["code"],
                code_verifier=pending["code_verifier"],
            )
    except (OAuthError, requests.RequestException, ValueError) as exc:
        log.warning("SMART code exchange failed at %s: %s", pending["token_endpoint"], describe(exc))
        raise TokenExchangeFailed("The EHR did not exchange the sign-in code. Start again from the EHR.") from None
    if not token.get("access_token"):
        raise TokenExchangeFailed("The EHR's token response had no access token. Start again from the EHR.")
    return {**token_state(token, pending), "user": fhir_user(token.get("id_token"), pending, settings)}


def fhir_user(id_token: str | None, pending: dict[str, Any], settings: ClientSettings) -> str | None:
    """The user: the ``fhirUser`` claim of the validated ``id_token`` (S-5), or None when the EHR sent none.

    The signature is checked with the keys at the discovery's ``jwks_uri``, ``aud`` must be our client id and
    ``iss`` the discovery's issuer; a token that fails any check stops the launch (someone is not who they say).
    """
    if not id_token:
        return None
    if not pending.get("jwks_uri"):
        log.warning("SMART id_token not validated: the EHR's SMART configuration has no jwks_uri")
        return None
    try:
        key = jwt.PyJWKClient(pending["jwks_uri"], timeout=settings.timeout).get_signing_key_from_jwt(id_token)
        claims = jwt.decode(
            id_token,
            key.key,
            algorithms=ID_TOKEN_ALGORITHMS,
            audience=settings.client_id,
            issuer=pending.get("issuer") or None,
            options={"require": ["exp", "iat", "sub"], "verify_iss": bool(pending.get("issuer"))},
            leeway=5,
        )
    except jwt.PyJWTError as exc:
        log.warning("SMART id_token rejected: %s", describe(exc))
        raise TokenExchangeFailed("The EHR's identity token could not be verified. Start again from the EHR.") from None
    user = claims.get("fhirUser") or claims.get("profile")
    return user if isinstance(user, str) else None


def token_state(token: dict[str, Any], pending: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """What the session keeps of a token response, with the absolute time after which it is refreshed."""
    now = time.time() if now is None else now
    kept = {member: token[member] for member in TOKEN_MEMBERS if member in token}
    expires_in = _expires_in(token)
    if expires_in is not None:
        kept["refresh_after"] = now + expires_in - min(REFRESH_LEEWAY_S, expires_in / 10)
    for member in ("iss", "token_endpoint"):
        kept[member] = pending[member]
    return kept


def _expires_in(token: dict[str, Any]) -> float | None:
    try:
        return float(token["expires_in"])
    except (KeyError, TypeError, ValueError):
        return None


def needs_refresh(state: dict[str, Any], now: float | None = None) -> bool:
    refresh_after = state.get("refresh_after")
    return refresh_after is not None and (time.time() if now is None else now) >= refresh_after


def refresh(state: dict[str, Any], *, settings: ClientSettings) -> dict[str, Any]:
    """A fresh access token with the refresh token (S-7); the launch context is kept, a new refresh token
    replaces the old one. Raises LaunchExpired when there is none or the EHR refuses."""
    if not state.get("refresh_token"):
        raise LaunchExpired("This launch has expired. Start again from the EHR.")
    try:
        with _oauth(settings) as oauth:
            token = oauth.refresh_token(state["token_endpoint"], refresh_token=state["refresh_token"])
    except (OAuthError, requests.RequestException, ValueError) as exc:
        log.info("SMART token refresh failed at %s: %s", state["token_endpoint"], describe(exc))
        raise LaunchExpired("This launch has expired. Start again from the EHR.") from None
    if not token.get("access_token"):
        raise LaunchExpired("This launch has expired. Start again from the EHR.")
    merged = {**state, **token_state(token, state)}
    if _expires_in(token) is None:
        merged.pop("refresh_after", None)
    return merged


def granted_scopes(state: dict[str, Any]) -> frozenset[str]:
    """The scopes the EHR granted (S-6); when it does not say, what we asked for."""
    return frozenset(str(state.get("scope") or SCOPE).split())


def fhir_getter(iss: str, access_token: str, http: requests.Session, timeout: float) -> Callable[[str], dict[str, Any]]:
    """An authenticated ``GET {iss}/{path}`` returning JSON; paths only, so the token never leaves ``iss``."""
    base = iss.rstrip("/")

    def get(path: str) -> dict[str, Any]:
        where = path.split("?", 1)[0].lstrip("/")
        if any(c in where for c in ":\\%") or "//" in where or any(s in (".", "..") for s in where.split("/")):
            raise ValueError("fhir_get takes a path relative to the FHIR base")
        response = http.get(
            f"{base}/{path.lstrip('/')}",
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/fhir+json"},
            timeout=timeout,
            allow_redirects=False,
        )
        response.raise_for_status()
        return response.json()

    return get


def patient_reference_id(value: str | None) -> str | None:
    """``Patient/123`` or ``123`` -> ``123``."""
    if not value:
        return None
    return value.rsplit("/", 1)[-1] if value.startswith("Patient/") else value


def quote_path(segment: str) -> str:
    return quote(segment, safe="")
