"""CDS client authentication (R-29..R-36): the Bearer JWT's issuer, key, signature, audience, time and jti."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import requests
from jwt import PyJWK

from app.cds.clients import (
    SIGNING_ALGORITHMS,
    ClientRegistry,
    TrustedClient,
    TrustedClients,
    has_private_material,
    verification_algorithms,
)
from app.cds.errors import ClientNotTrusted, ReplayCheckUnavailable
from app.cds.replay import CLOCK_LEEWAY_S, ReplayCache, StoreUnavailable
from app.clock import SYSTEM_CLOCK, Clock
from app.http import read_body

log = logging.getLogger(__name__)

_REQUIRED_CLAIMS = ["iss", "aud", "exp", "iat", "jti"]
_MAX_TOKEN_CHARS = 16_384
_JWKS_MAX_BYTES = 256 * 1024
_JWKS_MAX_AGE_SECONDS = 3600.0
_MAX_LIFETIME_SECONDS = 3600  # bounds the replay cache; clients sign tokens that live minutes
_NUMERIC_DATE_CLAIMS = ("exp", "iat", "nbf")
_LATEST_NUMERIC_DATE = 253_402_300_799  # 9999-12-31T23:59:59Z; also keeps float() of a huge integer from failing
_MAX_TENANT_CHARS = 200  # the feedback table's tenant column
# PyJWT's exceptions, most specific first, and the reason code each becomes.
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "issued_in_the_future"),
    (jwt.InvalidAudienceError, "wrong_audience"),
    (jwt.InvalidIssuerError, "wrong_issuer"),
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.DecodeError, "malformed_token"),
)


@dataclass(frozen=True)
class Principal:
    """The trusted client a call was authenticated as."""

    iss: str
    tenant: str | None
    client: TrustedClient
    jti: str


class ClientAuthenticator:
    """Verifies each call's client JWT against the trusted clients; raises ClientNotTrusted on any failure."""

    def __init__(
        self,
        clients: ClientRegistry | TrustedClients,
        public_base_url: str,
        replay: ReplayCache,
        session: requests.Session | None = None,
        leeway_seconds: float = CLOCK_LEEWAY_S,
        jwks_refetch_floor_seconds: float = 60,
        http_timeout: tuple[float, float] = (2.0, 3.0),
        clock: Clock = SYSTEM_CLOCK,
    ):
        self._clients = clients
        self._base = public_base_url.rstrip("/")
        self._replay = replay
        self._leeway = leeway_seconds
        self._inline: tuple[ClientRegistry | None, dict[str, _KeySet]] = (None, {})
        self._remote = _RemoteKeySets(session or requests.Session(), jwks_refetch_floor_seconds, http_timeout, clock)

    def authenticate(self, authorization_header: str | None, path: str) -> Principal:
        """The client behind ``Authorization: Bearer <JWT>``; ``path`` is app-relative (aud = base + path)."""
        iss: Any = None
        try:
            token = _bearer_token(authorization_header)
            header, unverified = _peek(token)
            iss = unverified.get("iss")
            registry = self._clients.current()  # one version of the clients file for the whole check
            client = registry.get(iss) if isinstance(iss, str) else None
            if client is None:
                raise ClientNotTrusted("unknown_issuer")
            _check_claim_types(unverified)
            claims = _verify(token, self._key(registry, client, header), self._base + path, iss, self._leeway)
            return self._principal(client, claims)
        except ClientNotTrusted as exc:
            log.warning("client JWT rejected: %s (iss %s)", exc.reason, _printable(iss))
            raise

    def _key(self, registry: ClientRegistry, client: TrustedClient, header: Mapping[str, Any]) -> PyJWK:
        """The client's key for the token's kid, bound to the token's alg only if the key's type allows it."""
        if client.jwks is not None:
            keys = self._inline_key_sets(registry)[client.iss]  # keys come from the file; a jku is not followed
        else:
            assert client.jwks_url is not None
            if "jku" in header and header["jku"] != client.jwks_url:
                raise ClientNotTrusted("jku_mismatch")
            keys = self._remote.key_set(client.jwks_url, header["kid"])
        return keys.key(header["kid"], header["alg"])

    def _inline_key_sets(self, registry: ClientRegistry) -> dict[str, _KeySet]:
        """The inline JWK Sets of ``registry``'s clients, parsed once per version of the clients file."""
        parsed_for, key_sets = self._inline
        if parsed_for is not registry:
            key_sets = {c.iss: _KeySet(c.jwks) for c in registry if c.jwks is not None}
            self._inline = (registry, key_sets)  # one assignment: a concurrent call sees a whole pair
        return key_sets

    def _principal(self, client: TrustedClient, claims: Mapping[str, Any]) -> Principal:
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise ClientNotTrusted("invalid_jti")
        claimed_tenant = claims.get("tenant")
        if client.tenant is not None and claimed_tenant is not None and claimed_tenant != client.tenant:
            raise ClientNotTrusted("tenant_mismatch")
        remaining = float(claims["exp"]) - time.time()
        if remaining > _MAX_LIFETIME_SECONDS:
            raise ClientNotTrusted("lifetime_too_long")
        ttl = max(math.ceil(remaining + self._leeway), 1)
        try:
            check = self._replay.check(json.dumps([client.iss, jti]), ttl)
        except StoreUnavailable as exc:
            log.error("client JWT replay check unavailable: %s", exc)
            raise ReplayCheckUnavailable("replay_check_unavailable") from None
        if not check.first_use:
            raise ClientNotTrusted("replayed_jti")
        cut_off = self._replay_cut_off(check.remembers_since)
        if claims["iat"] < cut_off:
            if claims["iat"] < check.remembers_since:
                raise ClientNotTrusted("issued_before_replay_memory")
            # Issued after the store started but within the clock leeway of it: most likely a fresh call, which
            # may come again (with a new token) once the store can vouch for it.
            retry_after = max(1, math.ceil(cut_off - time.time()))
            raise ReplayCheckUnavailable("replay_memory_starting", retry_after=retry_after)
        tenant = client.tenant or claimed_tenant
        return Principal(iss=client.iss, tenant=tenant, client=client, jti=jti)

    def _replay_cut_off(self, since: float) -> float:
        """The earliest iat the replay store can vouch for. The store lost what came before ``since`` (a
        restarted Redis, a new host file, a switch to a fallback), and a token used just before then may carry
        an iat up to the leeway ahead of that use: so the cut-off is the leeway after the (next whole second
        of the) start, and fresh calls in those first seconds are refused too."""
        return math.ceil(since) + self._leeway if math.isfinite(since) else since


def _bearer_token(header: str | None) -> str:
    if not header:
        raise ClientNotTrusted("missing_authorization")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise ClientNotTrusted("not_bearer")
    if len(token) > _MAX_TOKEN_CHARS:
        raise ClientNotTrusted("token_too_large")
    return token


def _peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims before verification: only to choose the client and key, and to refuse early."""
    try:
        decoded = jwt.decode_complete(token, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError, TypeError):
        raise ClientNotTrusted("malformed_token") from None
    header = decoded["header"]
    if header.get("alg") not in SIGNING_ALGORITHMS:
        raise ClientNotTrusted("alg_not_allowed")  # none, HS*, and anything not asymmetric
    if not isinstance(header.get("kid"), str) or not header["kid"]:
        raise ClientNotTrusted("missing_kid")
    typ = header.get("typ", "JWT")
    if not isinstance(typ, str) or typ.upper() != "JWT":
        raise ClientNotTrusted("bad_typ")
    return header, decoded["payload"]


def _check_claim_types(claims: Mapping[str, Any]) -> None:
    """exp, iat and nbf are JSON numbers (RFC 7519 NumericDate), tenant a short printable string or null: PyJWT
    alone would int() a string such as "9999999999" or a boolean, and a tenant of another type was ignored."""
    for name in _NUMERIC_DATE_CLAIMS:
        if name in claims and not _is_numeric_date(claims[name]):
            raise ClientNotTrusted(f"invalid_{name}")
    tenant = claims.get("tenant")
    if tenant is not None and not (
        isinstance(tenant, str) and 0 < len(tenant) <= _MAX_TENANT_CHARS and tenant.isprintable()
    ):
        raise ClientNotTrusted("invalid_tenant")


def _is_numeric_date(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0 <= value <= _LATEST_NUMERIC_DATE  # False for NaN, which Python's JSON parser accepts


def _verify(token: str, key: PyJWK, audience: str, iss: str, leeway: float) -> dict[str, Any]:
    """Signature with exactly the key's bound algorithm, then iss, aud, exp and iat, all claims required."""
    try:
        return jwt.decode(
            token,
            key=key,
            algorithms=[key.algorithm_name],
            audience=audience,
            issuer=iss,
            leeway=leeway,
            options={"require": _REQUIRED_CLAIMS},
        )
    except jwt.MissingRequiredClaimError as exc:
        raise ClientNotTrusted(f"missing_{exc.claim}") from None
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        reason = next((code for kind, code in _REASONS if isinstance(exc, kind)), "invalid_token")
        raise ClientNotTrusted(reason) from None


def _printable(iss: Any) -> str:
    return repr(iss[:100]) if isinstance(iss, str) else "absent"


class _KeySet:
    """A client's public signing keys by kid; private, symmetric and unknown-type keys are left out."""

    def __init__(self, jwks: Mapping[str, Any]):
        self._keys: dict[str, list[tuple[dict, frozenset[str]]]] = {}
        self._loaded: dict[tuple[int, str], PyJWK] = {}
        for jwk in jwks.get("keys", []):
            if isinstance(jwk, dict) and isinstance(jwk.get("kid"), str) and not has_private_material(jwk):
                algorithms = verification_algorithms(jwk)
                if algorithms:
                    self._keys.setdefault(jwk["kid"], []).append((jwk, algorithms))

    def __contains__(self, kid: str) -> bool:
        return kid in self._keys

    def key(self, kid: str, alg: str) -> PyJWK:
        """The key ``kid`` loaded for ``alg``; never a key whose type does not match the algorithm."""
        candidates = self._keys.get(kid)
        if not candidates:
            raise ClientNotTrusted("unknown_kid")
        for index, (jwk, algorithms) in enumerate(candidates):
            if alg in algorithms:
                loaded = self._loaded.get((index, alg))
                if loaded is None:
                    try:
                        loaded = PyJWK(jwk, algorithm=alg)
                    except jwt.PyJWTError:
                        raise ClientNotTrusted("unusable_key") from None
                    self._loaded[(index, alg)] = loaded
                return loaded
        raise ClientNotTrusted("alg_does_not_match_key")


@dataclass(frozen=True)
class _Fetched:
    keys: _KeySet | None  # None: never fetched successfully
    fetched_at: float
    attempted_at: float


class _RemoteKeySets:
    """JWK Sets from clients' jwks_url: cached (ages on ``clock``), refetched on an unknown kid at most once per
    floor per URL."""

    def __init__(self, session: requests.Session, floor_seconds: float, timeout: tuple[float, float], clock: Clock):
        self._session = session
        self._clock = clock
        self._floor = floor_seconds
        self._timeout = timeout
        self._cache: dict[str, _Fetched] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def key_set(self, url: str, kid: str) -> _KeySet:
        cached = self._cache.get(url)
        if cached is not None and self._usable(cached, kid):
            return cached.keys  # type: ignore[return-value]
        with self._lock(url):  # one fetch per URL at a time; the waiters then see its result
            cached = self._cache.get(url)
            now = self._clock.monotonic()
            if cached is None or (not self._usable(cached, kid) and now - cached.attempted_at >= self._floor):
                cached = self._cache[url] = self._refresh(url, cached, now)
        if cached.keys is None:
            raise ClientNotTrusted("jwks_unavailable")
        return cached.keys

    def _usable(self, cached: _Fetched, kid: str) -> bool:
        fresh = self._clock.monotonic() - cached.fetched_at < _JWKS_MAX_AGE_SECONDS
        return cached.keys is not None and kid in cached.keys and fresh

    def _lock(self, url: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(url, threading.Lock())

    def _refresh(self, url: str, cached: _Fetched | None, now: float) -> _Fetched:
        try:
            return _Fetched(_KeySet(self._download(url)), fetched_at=now, attempted_at=now)
        except (requests.RequestException, ValueError, RecursionError) as exc:
            log.warning("JWKS fetch from %s failed (%s); keeping any keys we had", url, type(exc).__name__)
            if cached is None:
                return _Fetched(None, fetched_at=-math.inf, attempted_at=now)
            return _Fetched(cached.keys, fetched_at=cached.fetched_at, attempted_at=now)

    def _download(self, url: str) -> dict[str, Any]:
        """GET a JWK Set with connect/read timeouts, an overall deadline, a size cap and no redirects."""
        deadline = time.monotonic() + sum(self._timeout)
        headers = {"Accept": "application/json"}
        with self._session.get(
            url, headers=headers, timeout=self._timeout, stream=True, allow_redirects=False
        ) as response:
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            body = read_body(response, limit=_JWKS_MAX_BYTES, deadline=deadline)
        data = json.loads(body)
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ValueError("not a JWK Set")
        return data
