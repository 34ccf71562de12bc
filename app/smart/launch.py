"""The SMART EHR launch as plain functions: discovery, the authorize URL, the code exchange and token refresh.

Nothing here touches Flask's request or the session store, so each step is testable alone. Failures raise a
``LaunchError`` subclass that carries the HTTP status and the words the error page shows (never a token).
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import jwt
import orjson
import requests
from authlib.integrations.base_client import OAuthError
from authlib.integrations.requests_client import OAuth2Session

from app.cds.clients import FhirBase
from app.http import read_body
from app.logs import describe

log = logging.getLogger(__name__)

# The least the explanation page needs (S-8): who the user is, the patient for the banner, and live values.
# online_access: EHRs issue a refresh token only when asked, and the page refreshes while the session lives.
SCOPE = "launch openid fhirUser online_access patient/Patient.r patient/Observation.rs"
ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "ES256", "ES384", "PS256", "PS384"]
DISCOVERY_TTL_S = 300.0
DISCOVERY_FAILURE_TTL_S = 30.0  # a failed discovery is shown again, not retried, for this long
DISCOVERY_FETCHES_PER_MINUTE = 10  # per allowlist entry: a ":*" entry names a base on every port
DISCOVERY_MAX_BYTES = 256 * 1024
TOKEN_MAX_BYTES = 64 * 1024
FHIR_MAX_BYTES = 8 * 1024 * 1024  # one Patient, or a page of NEWER_COUNT observations
JWKS_MAX_BYTES = 256 * 1024
MAX_EXPIRES_IN_S = 10**9  # about 30 years: anything longer is not a token lifetime
WELL_KNOWN = "/.well-known/smart-configuration"
MAX_PARAMETER_CHARS = 2048  # iss and launch: they end up in a redirect URL
REFRESH_LEEWAY_S = 30.0
ID_TOKEN_LEEWAY_S = 5.0  # the EHR's clock and ours may differ a little
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
    title = "The EHR's SMART configuration cannot be used"


class DiscoveryTimedOut(DiscoveryFailed):
    status = 504


class TooManyDiscoveries(LaunchError):
    status = 429
    title = "Too many look-ups of this EHR's SMART configuration"


class PkceUnsupported(DiscoveryFailed):
    title = "The EHR does not support PKCE"


class NoPatientContext(LaunchError):
    title = "No patient in context"


class StateMismatch(LaunchError):
    title = "This sign-in did not start here"


class AccessDenied(LaunchError):
    status = 403
    title = "Access denied"


class TokenExchangeFailed(LaunchError):
    status = 502
    title = "The EHR did not grant access"


class TokenExchangeTimedOut(TokenExchangeFailed):
    status = 504


class CodeRefused(LaunchError):
    title = "The EHR did not accept this sign-in"


class UnusableJson(ValueError):
    """A body that is not the JSON object expected; ``what`` says why, quoting nothing of it."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


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


class _Unanswered(Exception):
    """The fetch in flight did not finish while a launch waited for it."""


@dataclass
class _Flight:
    """A discovery being fetched; launches for the same base wait for it instead of fetching again."""

    done: threading.Event = field(default_factory=threading.Event)
    waiters: int = 0


class DiscoveryCache:
    """SMART configurations per FHIR base, so launches cost the EHR a bounded number of requests whatever comes in.

    A configuration is kept ``ttl_s``; a failure is kept ``failure_ttl_s`` and shown again without asking; one
    fetch at a time per base (concurrent launches wait for it); and at most ``fetches_per_minute`` fetches per
    allowlist entry, which only a ``:*`` entry (a base on every port) can reach.
    """

    def __init__(
        self,
        ttl_s: float = DISCOVERY_TTL_S,
        failure_ttl_s: float = DISCOVERY_FAILURE_TTL_S,
        fetches_per_minute: int = DISCOVERY_FETCHES_PER_MINUTE,
        max_entries: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ttl, self.failure_ttl = ttl_s, failure_ttl_s
        self.fetches_per_minute, self.max_entries = fetches_per_minute, max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, SmartConfiguration | LaunchError]] = {}
        self._flights: dict[str, _Flight] = {}
        self._fetched: dict[str, deque[float]] = {}  # fetch times per allowlist entry, last minute

    def get(self, base: FhirBase, fetch: Callable[[], SmartConfiguration], wait_s: float) -> SmartConfiguration:
        """The configuration for ``base``: cached, or the answer of the fetch in flight, or ``fetch()``'s."""
        while True:
            with self._lock:
                now = self._clock()
                cached = self._entries.get(base.url)
                if cached is not None and cached[0] > now:
                    return _answer(cached[1])
                flight = self._flights.get(base.url)
                if flight is None:
                    self._spend(base, now)
                    flight = self._flights[base.url] = _Flight()
                    break
                flight.waiters += 1
            finished = flight.done.wait(wait_s)
            with self._lock:
                flight.waiters -= 1
            if not finished:
                raise _Unanswered
        return self._lead(base.url, flight, fetch)

    def waiting(self, base: FhirBase) -> int:
        """How many launches wait for the fetch in flight for ``base``."""
        with self._lock:
            flight = self._flights.get(base.url)
            return flight.waiters if flight else 0

    def _lead(self, key: str, flight: _Flight, fetch: Callable[[], SmartConfiguration]) -> SmartConfiguration:
        value: SmartConfiguration | LaunchError | None = None
        try:
            try:
                value, ttl = fetch(), self.ttl
            except LaunchError as exc:
                value, ttl = exc, self.failure_ttl
        finally:  # an unexpected error caches nothing, but must not leave the others waiting
            with self._lock:
                del self._flights[key]
                if value is not None:
                    self._store(key, value, self._clock() + ttl)
            flight.done.set()
        return _answer(value)

    def _spend(self, base: FhirBase, now: float) -> None:
        fetched = self._fetched.setdefault(base.entry, deque())
        while fetched and fetched[0] <= now - 60:
            fetched.popleft()
        if len(fetched) >= self.fetches_per_minute:
            raise TooManyDiscoveries(
                f"This app looked up the SMART configuration of the trusted FHIR server {base.entry} {len(fetched)} "
                "times in the last minute, the most it does; the EHR was not contacted for this launch. Start again "
                "from the EHR in a minute."
            )
        fetched.append(now)

    def _store(self, key: str, value: SmartConfiguration | LaunchError, expires: float) -> None:
        self._entries[key] = (expires, value)
        if len(self._entries) > self.max_entries:
            now = self._clock()
            for stale in [k for k, (until, _) in self._entries.items() if until <= now]:
                del self._entries[stale]
            while len(self._entries) > self.max_entries:
                del self._entries[min(self._entries, key=lambda k: self._entries[k][0])]


def _answer(value: SmartConfiguration | LaunchError) -> SmartConfiguration:
    if isinstance(value, LaunchError):
        raise type(value)(value.message)  # a new exception each time: threads may raise it at once
    return value


def discover(
    iss: str, base: FhirBase, http: requests.Session, timeout: float, cache: DiscoveryCache
) -> SmartConfiguration:
    """``GET {iss}/.well-known/smart-configuration`` (S-2) through ``cache``; raises a DiscoveryFailed that says
    what is wrong (PkceUnsupported when S256 is not offered)."""
    wait_s = 2 * timeout + 1
    try:
        return cache.get(base, lambda: fetch_configuration(iss, http, timeout), wait_s=wait_s)
    except _Unanswered:
        raise _failure(DiscoveryTimedOut, iss, f"did not answer within {wait_s:g} s") from None


def fetch_configuration(iss: str, http: requests.Session, timeout: float) -> SmartConfiguration:
    """Read and check an EHR's SMART configuration; every failure names its cause and quotes nothing the EHR sent."""
    document = _read_json(iss, http, timeout)
    plain_http = urlsplit(iss).scheme.lower() == "http"  # a development EHR on plain http (allowlisted as such)
    authorization = _endpoint(document, "authorization_endpoint", plain_http, iss)
    token = _endpoint(document, "token_endpoint", plain_http, iss)
    jwks_uri = _endpoint(document, "jwks_uri", plain_http, iss) if "jwks_uri" in document else None
    methods = document.get("code_challenge_methods_supported")
    if not isinstance(methods, list) or "S256" not in methods:
        raise _failure(
            PkceUnsupported,
            iss,
            "does not list S256 in code_challenge_methods_supported, so the launch cannot be protected with PKCE",
        )
    issuer = document.get("issuer")
    return SmartConfiguration(
        authorization_endpoint=authorization,
        token_endpoint=token,
        code_challenge_methods=frozenset(m for m in methods if isinstance(m, str)),
        issuer=issuer if isinstance(issuer, str) else None,
        jwks_uri=jwks_uri,
    )


def _read_json(iss: str, http: requests.Session, timeout: float) -> dict[str, Any]:
    """The configuration document: a 200 answer, at most DISCOVERY_MAX_BYTES read within ``timeout`` in all, that
    is a JSON object."""
    deadline = time.monotonic() + timeout
    try:
        with http.get(
            iss.rstrip("/") + WELL_KNOWN,
            headers={"Accept": "application/json"},
            timeout=timeout,
            allow_redirects=False,
            stream=True,
        ) as response:
            if response.status_code != 200:
                redirect = " (a redirect, which the app does not follow)" if response.is_redirect else ""
                raise _failure(DiscoveryFailed, iss, f"answered HTTP {response.status_code}{redirect}")
            body = read_body(response, limit=DISCOVERY_MAX_BYTES, deadline=deadline)
    except requests.Timeout:
        raise _failure(DiscoveryTimedOut, iss, f"did not answer within {timeout:g} s") from None
    except requests.exceptions.SSLError:
        raise _failure(DiscoveryFailed, iss, "could not be reached securely: the TLS connection failed") from None
    except requests.ConnectionError:
        raise _failure(DiscoveryFailed, iss, "could not be reached: no connection could be made") from None
    except requests.RequestException as exc:
        raise _failure(DiscoveryFailed, iss, f"could not be read ({type(exc).__name__})") from None
    except ValueError:
        raise _failure(DiscoveryFailed, iss, f"is larger than {DISCOVERY_MAX_BYTES // 1024} KB") from None
    try:
        return json_object(body)
    except UnusableJson as exc:
        raise _failure(DiscoveryFailed, iss, exc.what) from None


# What orjson's refusals mean, in words for the error page (orjson is strict: no NaN, no lone surrogates, and at
# most 1024 levels, so no document can exhaust the stack).
_JSON_PROBLEMS = (
    ("depth limit", "is nested too deeply to read (JSON more than 1024 levels deep)"),
    ("number is infinity", "has a number too large to read"),
    ("surrogate in string", "is not valid Unicode (it has a lone surrogate)"),
    ("not valid UTF-8", "is not valid UTF-8 text"),
)


def json_object(body: bytes) -> dict[str, Any]:
    """A body from the EHR that must be a JSON object; UnusableJson says what is wrong otherwise."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        what = next((words for marker, words in _JSON_PROBLEMS if marker in exc.msg), "is not JSON")
        raise UnusableJson(what) from None
    if not isinstance(document, dict):
        raise UnusableJson("is not a JSON object")
    return document


def _failure(kind: type[DiscoveryFailed], iss: str, what: str) -> DiscoveryFailed:
    """A discovery failure naming the document's URL and what is wrong with it, logged once where it happens."""
    log.warning("SMART discovery failed for %s: %s", iss, what)
    if kind is DiscoveryTimedOut or what.startswith("could not be reached"):
        advice = "The app cannot sign in with this EHR until it answers; if this persists, tell its administrators."
    else:
        advice = "The app cannot sign in with this EHR until its administrators fix this."
    return kind(f"The EHR's SMART configuration at {iss.rstrip('/')}{WELL_KNOWN} {what}. {advice}")


def _endpoint(document: dict, member: str, plain_http: bool, iss: str) -> str:
    """An endpoint URL from the configuration: absolute https (http too for an http EHR), no user info."""
    value = document.get(member)
    if value is None:
        raise _failure(DiscoveryFailed, iss, f"has no {member}")
    try:
        parts = urlsplit(value) if isinstance(value, str) else None
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme.lower() not in (("https", "http") if plain_http else ("https",))
        or not parts.hostname
        or "@" in parts.netloc
        or parts.fragment
        or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in value)
    ):
        kind = "an http(s)" if plain_http else "an https"
        raise _failure(DiscoveryFailed, iss, f"has no usable {member} (not {kind} URL)")
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


def _token_call(settings: ClientSettings, call: Callable[[OAuth2Session, dict[str, Any]], Any]) -> dict[str, Any]:
    """One call of the token endpoint (``call(oauth, options)`` passes ``options`` on to authlib), its answer read
    within ``settings.timeout`` in all and checked before authlib sees it (authlib raises on odd numbers)."""
    deadline = time.monotonic() + settings.timeout

    def checked(response: requests.Response) -> requests.Response:
        with response:
            try:
                body = read_body(response, limit=TOKEN_MAX_BYTES, deadline=deadline)
            except ValueError:
                raise UnusableJson(f"is larger than {TOKEN_MAX_BYTES // 1024} KB") from None
        if response.status_code >= 500:
            response.raise_for_status()
        response._content = orjson.dumps(_token_fields(json_object(body)))
        return response

    with _oauth(settings) as oauth:
        oauth.register_compliance_hook("access_token_response", checked)
        oauth.register_compliance_hook("refresh_token_response", checked)
        return dict(call(oauth, {"stream": True, "allow_redirects": False}))


def _token_fields(token: dict[str, Any]) -> dict[str, Any]:
    """The members of a token response the app reads, each of the type it must be; UnusableJson names the first
    that is not. An error response keeps only its error code and description."""
    if "error" in token:
        error = token["error"] if isinstance(token["error"], str) else "unknown_error"
        described = token.get("error_description")
        return {"error": error, **({"error_description": described} if isinstance(described, str) else {})}
    for name in ("access_token", "refresh_token", "scope", "id_token", "patient", "encounter", "token_type"):
        if token.get(name) is not None and not isinstance(token[name], str):
            raise UnusableJson(f"has a {name} that is not a string")
    if token.get("need_patient_banner") is not None and not isinstance(token["need_patient_banner"], bool):
        raise UnusableJson("has a need_patient_banner that is not true or false")
    kept = {name: token[name] for name in (*TOKEN_MEMBERS, "token_type") if token.get(name) is not None}
    expires_in = token.get("expires_in")
    if isinstance(expires_in, str) and expires_in.isascii() and expires_in.isdigit() and len(expires_in) <= 10:
        expires_in = int(expires_in)  # some EHRs send the number as a string
    if expires_in is not None:
        if not (_is_number(expires_in) and 0 <= expires_in <= MAX_EXPIRES_IN_S):
            raise UnusableJson("has an expires_in that is not a number of seconds")
        kept["expires_in"] = expires_in
    return kept


def _unicode(text: str) -> bool:
    """Whether ``text`` can be written out (PyJWT's JSON reader lets lone surrogates through)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_number(value: Any) -> bool:
    """A finite JSON number (not true or false, not an integer beyond any float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def begin(
    iss: str,
    launch: str,
    *,
    base_of: Callable[[str], FhirBase | None],
    settings: ClientSettings,
    http: requests.Session,
    cache: DiscoveryCache,
) -> tuple[str, dict[str, Any]]:
    """Check ``iss`` (S-1), discover (S-2) and build the authorize URL (S-3).

    ``base_of`` gives the allowlisted FHIR base ``iss`` names exactly, or None. Returns the URL to redirect the
    browser to and the pending launch, which the browser keeps sealed until the callback.
    """
    if not iss or not launch:
        raise LaunchError("The EHR must open this app with both iss and launch. Start again from the EHR.")
    if len(iss) > MAX_PARAMETER_CHARS or len(launch) > MAX_PARAMETER_CHARS:
        raise LaunchError(f"The EHR's iss or launch is longer than {MAX_PARAMETER_CHARS} characters.")
    base = base_of(iss)
    if base is None:
        raise IssuerNotAllowed(
            "This EHR's FHIR server (iss) is not one of the servers this gateway trusts: iss must be exactly a FHIR "
            "base listed in the trusted clients file, not a path under one. An administrator can add it."
        )
    config = discover(iss, base, http, settings.timeout, cache)
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
        "token_endpoint": config.token_endpoint,
        "issuer": config.issuer,
        "jwks_uri": config.jwks_uri,
    }
    return url, pending


def complete(
    pending: dict[str, Any] | None, args: dict[str, str], *, settings: ClientSettings, now: float | None = None
) -> dict[str, Any]:
    """Check the callback's ``state`` against this browser's pending launch, then exchange the code (S-4).

    Returns the token state to keep server-side (S-5, S-7). ``now`` (wall seconds, the app's clock) times the
    id_token's checks and the access token's refresh.
    """
    now = time.time() if now is None else now
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
        token = _token_call(
            settings,
            lambda oauth, options: oauth.fetch_token(
                pending["token_endpoint"],
                grant_type="authorization_code",
                code=args["code"],
                code_verifier=pending["code_verifier"],
                **options,
            ),
        )
    except OAuthError as exc:
        log.warning("SMART code exchange refused at %s: %s", pending["token_endpoint"], describe(exc))
        if exc.error == "invalid_grant":  # a stale, used or forged code: the request's fault, not the EHR's
            raise CodeRefused(
                "The EHR did not accept this sign-in (its code is used, expired or not the EHR's). Start again "
                "from the EHR."
            ) from None
        raise TokenExchangeFailed("The EHR did not exchange the sign-in code. Start again from the EHR.") from None
    except UnusableJson as exc:
        log.warning("SMART code exchange at %s: the token response %s", pending["token_endpoint"], exc.what)
        raise TokenExchangeFailed(
            f"The EHR's token response {exc.what}. Start again from the EHR; if this persists, tell its administrators."
        ) from None
    except requests.Timeout:
        raise TokenExchangeTimedOut(
            f"The EHR's token endpoint did not answer within {settings.timeout:g} s. Start again from the EHR."
        ) from None
    except (requests.RequestException, ValueError) as exc:
        log.warning("SMART code exchange failed at %s: %s", pending["token_endpoint"], describe(exc))
        raise TokenExchangeFailed("The EHR did not exchange the sign-in code. Start again from the EHR.") from None
    if not token.get("access_token"):
        raise TokenExchangeFailed("The EHR's token response had no access token. Start again from the EHR.")
    if not patient_reference_id(token.get("patient")):
        raise NoPatientContext(NO_PATIENT)
    return {**token_state(token, pending, now), "user": fhir_user(token.get("id_token"), pending, settings, now)}


def fhir_user(
    id_token: str | None, pending: dict[str, Any], settings: ClientSettings, now: float | None = None
) -> str | None:
    """The user: the ``fhirUser`` claim of the validated ``id_token`` (S-5), or None when the EHR sent none.

    The signature is checked with the keys at the discovery's ``jwks_uri``, ``aud`` must be our client id and
    ``iss`` the discovery's issuer, and ``exp``/``iat`` against ``now`` (wall seconds); a token that fails any
    check stops the launch (someone is not who they say).
    """
    if not id_token:
        return None
    if not pending.get("jwks_uri"):
        log.warning("SMART id_token not validated: the EHR's SMART configuration has no jwks_uri")
        return None
    try:
        key = _signing_key(pending["jwks_uri"], id_token, settings.timeout)
        claims = jwt.decode(
            id_token,
            key.key,
            algorithms=ID_TOKEN_ALGORITHMS,
            audience=settings.client_id,
            issuer=pending.get("issuer") or None,
            # PyJWT reads only the system clock: the times are checked below, on ours.
            options={
                "require": ["exp", "iat", "sub"],
                "verify_iss": bool(pending.get("issuer")),
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
        _check_times(claims, time.time() if now is None else now, ID_TOKEN_LEEWAY_S)
    except (jwt.PyJWTError, RecursionError) as exc:  # PyJWT reads the token's JSON with json.loads: no depth limit
        log.warning("SMART id_token rejected: %s", describe(exc))
        raise TokenExchangeFailed("The EHR's identity token could not be verified. Start again from the EHR.") from None
    user = claims.get("fhirUser") or claims.get("profile")
    return user if isinstance(user, str) and _unicode(user) else None


def _signing_key(jwks_uri: str, id_token: str, timeout: float) -> jwt.PyJWK:
    """The EHR's key that signed ``id_token``, from its JWK Set read within ``timeout`` in all and size-capped
    (PyJWKClient reads with urllib: a read timeout per byte, no overall deadline, no cap)."""
    deadline = time.monotonic() + timeout
    try:
        with requests.get(
            jwks_uri, headers={"Accept": "application/json"}, timeout=timeout, stream=True, allow_redirects=False
        ) as response:
            response.raise_for_status()
            key_set = jwt.PyJWKSet.from_dict(json_object(read_body(response, limit=JWKS_MAX_BYTES, deadline=deadline)))
    except (requests.RequestException, ValueError) as exc:
        raise jwt.PyJWKClientError(f"the EHR's JWK Set could not be read ({type(exc).__name__})") from None
    kid = jwt.get_unverified_header(id_token).get("kid")
    signing = [k for k in key_set.keys if k.public_key_use in ("sig", None)]
    matching = [k for k in signing if k.key_id == kid] if kid is not None else signing
    if len(matching) != 1:
        raise jwt.PyJWKClientError("no single key of the EHR's JWK Set matches the id_token's kid")
    return matching[0]


def _check_times(claims: dict[str, Any], now: float, leeway: float) -> None:
    """``exp`` not passed and ``iat`` (and ``nbf`` when sent) not ahead of ``now``, give or take ``leeway``."""
    times = {name: claims[name] for name in ("exp", "iat", "nbf") if name in claims}
    if not all(_is_number(value) for value in times.values()):
        raise jwt.InvalidTokenError("exp, iat and nbf must be finite numbers")
    if now >= times["exp"] + leeway:
        raise jwt.ExpiredSignatureError("Signature has expired")
    if max(times["iat"], times.get("nbf", times["iat"])) > now + leeway:
        raise jwt.ImmatureSignatureError("The token is not yet valid (iat or nbf)")


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
    """The token's lifetime in seconds (checked by ``_token_fields``), or None when the EHR gave none."""
    value = token.get("expires_in")
    return None if value is None else float(value)


def needs_refresh(state: dict[str, Any], now: float | None = None) -> bool:
    """Whether the access token is due for refresh at ``now`` (wall seconds; the system clock when None)."""
    refresh_after = state.get("refresh_after")
    return refresh_after is not None and (time.time() if now is None else now) >= refresh_after


def refresh(state: dict[str, Any], *, settings: ClientSettings, now: float | None = None) -> dict[str, Any]:
    """A fresh access token with the refresh token (S-7); the launch context is kept, a new refresh token
    replaces the old one, and the next refresh falls due from ``now`` (wall seconds). Raises LaunchExpired when
    there is none or the EHR refuses."""
    if not state.get("refresh_token"):
        raise LaunchExpired("This launch has expired. Start again from the EHR.")
    try:
        token = _token_call(
            settings,
            lambda oauth, options: oauth.refresh_token(
                state["token_endpoint"], refresh_token=state["refresh_token"], **options
            ),
        )
    except UnusableJson as exc:
        log.warning("SMART token refresh at %s: the token response %s", state["token_endpoint"], exc.what)
        raise LaunchExpired(
            f"This launch has expired: the EHR's token response {exc.what}. Start again from the EHR."
        ) from None
    except (OAuthError, requests.RequestException, ValueError) as exc:
        log.info("SMART token refresh failed at %s: %s", state["token_endpoint"], describe(exc))
        raise LaunchExpired("This launch has expired. Start again from the EHR.") from None
    if not token.get("access_token"):
        raise LaunchExpired("This launch has expired. Start again from the EHR.")
    merged = {**state, **token_state(token, state, now)}
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
        deadline = time.monotonic() + timeout
        with http.get(
            f"{base}/{path.lstrip('/')}",
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/fhir+json"},
            timeout=timeout,
            allow_redirects=False,
            stream=True,
        ) as response:
            response.raise_for_status()
            return json_object(read_body(response, limit=FHIR_MAX_BYTES, deadline=deadline))

    return get


NO_PATIENT = (
    "The EHR did not give this app a patient context, so no patient's data is shown. Open the app from the "
    "patient's chart in the EHR."
)


def patient_reference_id(value: Any) -> str | None:
    """``Patient/123`` or ``123`` -> ``123``; None for anything that names no patient."""
    if not isinstance(value, str) or not value.strip():
        return None
    return (value.rsplit("/", 1)[-1] if value.startswith("Patient/") else value) or None


def quote_path(segment: str) -> str:
    return quote(segment, safe="")
