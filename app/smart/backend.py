"""SMART Backend Services client (S-9..S-11): signed client assertions, a cached access token, one retry on 401."""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from typing import Any

import jwt
import requests

from app import http
from app.clock import SYSTEM_CLOCK, Clock
from app.smart.keys import ALGORITHMS, KeyStore

log = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME_S = 270  # S-10: at most 300 s; a little less leaves room for clock skew at the EHR
DEFAULT_EXPIRES_IN = 300  # S-11: tokens live about 5 minutes when the server does not say
REFRESH_MARGIN_S = 30.0
_ERROR_CODE = re.compile(r"[\x20-\x21\x23-\x5b\x5d-\x7e]{1,64}")  # RFC 6749 error: NQSCHAR, kept short


class BackendAuthError(requests.RequestException):
    """The token endpoint refused us or could not be reached; ``error`` is its OAuth error code (or ours for
    transport problems), never the response body. A RequestException, so FHIR callers treat it as unreachable."""

    def __init__(self, error: str, status: int | None = None):
        self.error = error
        self.status = status
        super().__init__(f"token endpoint: {error}" + (f" (HTTP {status})" if status else ""))


class BackendAuthTimeout(BackendAuthError, requests.Timeout):
    """The token endpoint did not answer within the timeout."""


class BackendServicesClient:
    """Access to one EHR's FHIR server as ourselves (client_credentials + private_key_jwt), thread-safe."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        scope: str,
        keys: KeyStore,
        alg: str = "RS384",
        session: requests.Session | None = None,
        timeout: float = 5.0,
        refresh_margin: float = REFRESH_MARGIN_S,
        clock: Clock = SYSTEM_CLOCK,
    ):
        if alg not in ALGORITHMS:
            raise ValueError(f"alg must be one of {', '.join(ALGORITHMS)} (got {alg!r})")
        self.token_url = token_url
        self.client_id = client_id
        self.scope = scope
        self.alg = alg
        self.timeout = timeout
        self.refresh_margin = refresh_margin
        self.granted_scope: str | None = None
        self._keys = keys
        self._clock = clock  # the token's renewal time; the assertion's iat stays on the EHR's shared wall clock
        self._session = session or http.pooled_session()
        self._lock = threading.Lock()
        self._token: str | None = None
        self._renew_at = 0.0  # monotonic time after which the cached token is not used

    def __repr__(self) -> str:  # never show the token
        return f"BackendServicesClient({self.token_url!r}, client_id={self.client_id!r}, alg={self.alg!r})"

    def assertion(self) -> str:
        """A fresh client assertion (S-10): our active key for ``alg``, kid and typ in the header, a new jti."""
        kid, key = self._keys.signing_key(self.alg)
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_S,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, key, algorithm=self.alg, headers={"kid": kid, "typ": "JWT"})

    def access_token(self) -> str:
        """The cached access token, or a new one when it is missing or close to expiry (one refresh at a time)."""
        with self._lock:
            if self._token is None or self._clock.monotonic() >= self._renew_at:
                self._token = None
                self._fetch()
            return self._token  # type: ignore[return-value]

    def invalidate(self, token: str | None = None) -> None:
        """Forget the cached token (only if it is still ``token``, when given: another thread may have renewed)."""
        with self._lock:
            if token is None or token == self._token:
                self._token = None

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """Send with our bearer token; on a 401, renew the token once and retry once (S-11). A second 401 is
        returned as it is. Token endpoint failures raise BackendAuthError."""
        kwargs.setdefault("timeout", self.timeout)
        headers = dict(kwargs.pop("headers", None) or {})
        token = self.access_token()
        response = self._session.request(method, url, headers={**headers, "Authorization": f"Bearer {token}"}, **kwargs)
        if response.status_code != 401:
            return response
        response.close()
        log.info("FHIR server answered 401 to client %s; renewing the access token once", self.client_id)
        self.invalidate(token)
        token = self.access_token()
        return self._session.request(method, url, headers={**headers, "Authorization": f"Bearer {token}"}, **kwargs)

    __call__ = request  # a Sender for app.fhir.client.Client

    def _fetch(self) -> None:
        """POST the client_credentials grant (S-9) and cache the answer; the caller holds the lock."""
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.assertion(),
        }
        started = self._clock.monotonic()
        try:
            response = self._session.post(
                self.token_url,
                data=form,
                headers={"Accept": "application/json"},
                timeout=self.timeout,
                allow_redirects=False,
            )
        except requests.Timeout:
            raise BackendAuthTimeout("timeout") from None
        except requests.RequestException as exc:
            raise BackendAuthError(f"unreachable ({type(exc).__name__})") from None
        body = _json_object(response)
        if response.status_code != 200:
            error = body.get("error")
            code = error if isinstance(error, str) and _ERROR_CODE.fullmatch(error) else "unexpected_response"
            log.warning("token endpoint refused client %s: %s (HTTP %d)", self.client_id, code, response.status_code)
            raise BackendAuthError(code, response.status_code)
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise BackendAuthError("invalid_token_response", response.status_code)
        if str(body.get("token_type", "")).lower() != "bearer":
            raise BackendAuthError("unsupported_token_type", response.status_code)
        expires_in = _seconds(body.get("expires_in"))
        margin = max(self.refresh_margin, 0.1 * expires_in)
        self._token = token
        self._renew_at = started + expires_in - margin
        scope = body.get("scope")
        self.granted_scope = scope if isinstance(scope, str) else self.scope
        log.info("access token for client %s: expires in %ss, scope %r", self.client_id, expires_in, scope)


def _json_object(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _seconds(value: Any) -> float:
    """expires_in as seconds; absent or malformed means the SMART default of five minutes."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return float(DEFAULT_EXPIRES_IN)
    return seconds if seconds > 0 else float(DEFAULT_EXPIRES_IN)
