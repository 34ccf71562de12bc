"""The trusted CDS clients (CDS_CLIENTS_FILE): who may call us, with which keys, for which FHIR servers."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, unquote, urlsplit

from jwt import PyJWK
from jwt.exceptions import PyJWTError

log = logging.getLogger(__name__)

DEV_CLIENTS_FILE = Path(__file__).resolve().parent / "dev_clients.json"

_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
SIGNING_ALGORITHMS = _RSA_ALGORITHMS | frozenset(_EC_ALGORITHMS.values()) | {"EdDSA"}
PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CLIENT_MEMBERS = ("iss", "jwks", "jwks_url", "fhir_servers", "tenant", "smart_backend", "webhooks")
_WEBHOOK_MEMBERS = ("url", "secret", "previous_secrets", "events", "payload")
_SMART_BACKEND_ALGORITHMS = ("RS384", "ES384")
WEBHOOK_SECRET_MIN_BYTES = 24


def verification_algorithms(jwk: Mapping[str, Any]) -> frozenset[str]:
    """The asymmetric algorithms a public JWK may verify: set by its type and curve, narrowed by its alg."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA":
        algorithms = _RSA_ALGORITHMS
    elif kty == "EC" and crv in _EC_ALGORITHMS:
        algorithms = frozenset({_EC_ALGORITHMS[crv]})
    elif kty == "OKP" and crv in _OKP_CURVES:
        algorithms = frozenset({"EdDSA"})
    else:
        return frozenset()
    if "alg" in jwk:
        algorithms = algorithms & {jwk["alg"]}
    key_ops = jwk.get("key_ops")
    if jwk.get("use", "sig") != "sig" or (key_ops is not None and "verify" not in key_ops):
        return frozenset()
    return algorithms


def has_private_material(jwk: Mapping[str, Any]) -> bool:
    """True when a JWK carries private or symmetric key members (it must never be configured or used)."""
    return any(member in jwk for member in PRIVATE_JWK_MEMBERS)


class _Place(NamedTuple):
    scheme: str
    host: str
    port: int | None  # None: any port (allowlist entries ending in ":*")
    path: str  # decoded, no trailing slash


class FhirBase(NamedTuple):
    """An allowlisted FHIR base named exactly: its normalised spelling, and the allowlist entry it matched."""

    url: str
    entry: str


# Not in a decoded path segment: an escaped separator, a path parameter (Tomcat reads "..;x" as ".."),
# a "%" left after decoding (double escaping), or a query or fragment escaped into the path.
_SEGMENT_FORBIDDEN = frozenset("/\\;%?#")


def _decoded_path(raw: str) -> str | None:
    """A URL path as a server that decodes it sees it, or None when decoding could move it elsewhere: an escaped
    "/" or "\\", a ";" parameter, double escaping, a segment of dots only ("..", "%2e%2e", "..."), or anything but
    printable ASCII (spaces, controls, bytes that are not UTF-8)."""
    segments = []
    for raw_segment in raw.split("/"):
        segment = unquote(raw_segment)
        if not all("!" <= c <= "~" for c in segment) or _SEGMENT_FORBIDDEN.intersection(segment):
            return None
        if segment and segment.strip(".") == "":
            return None
        segments.append(segment)
    return "/".join(segments).rstrip("/")


def _place(url: Any, wildcard_port: bool = False) -> _Place | None:
    """Scheme, host, port and decoded path of an http(s) URL, or None for anything we would not fetch from."""
    if not isinstance(url, str) or "\\" in url or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return None
    scheme = parts.scheme.lower()
    netloc = parts.netloc
    any_port = wildcard_port and netloc.endswith(":*")
    if any_port:
        netloc = netloc[:-2]
        parts = urlsplit(f"{scheme}://{netloc}{parts.path}")
    if scheme not in _DEFAULT_PORTS or "@" in netloc or not netloc.isascii() or not parts.hostname:
        return None
    try:
        port = None if any_port else (parts.port if parts.port is not None else _DEFAULT_PORTS[scheme])
    except ValueError:
        return None
    path = _decoded_path(parts.path)
    return None if path is None else _Place(scheme, parts.hostname, port, path)


def _admits(entry: _Place, target: _Place) -> bool:
    """Whether ``target`` is on ``entry``'s server at or under its path (compared decoded, segment by segment)."""
    return _same_server(entry, target) and (
        not entry.path or target.path == entry.path or target.path.startswith(entry.path + "/")
    )


def _same_server(entry: _Place, target: _Place) -> bool:
    return entry.scheme == target.scheme and entry.host == target.host and entry.port in (None, target.port)


def _spelling(place: _Place) -> str:
    """The normalised URL of a place: lower-case scheme and host, no default port, no trailing slash."""
    host = f"[{place.host}]" if ":" in place.host else place.host
    port = "" if place.port == _DEFAULT_PORTS[place.scheme] else f":{place.port}"
    return f"{place.scheme}://{host}{port}{quote(place.path, safe='/!$&()*+,=:@~')}"


@dataclass(frozen=True)
class TrustedClient:
    """One CDS client we trust: its issuer, its public keys, and the FHIR servers we may call for it."""

    iss: str
    jwks: dict | None = None
    jwks_url: str | None = None
    fhir_servers: tuple[str, ...] = ()
    tenant: str | None = None
    smart_backend: dict | None = None
    webhooks: tuple[dict, ...] = field(default=(), repr=False)  # they hold secrets
    _allowlist: tuple[_Place, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        places = tuple(_place(url, wildcard_port=True) for url in self.fhir_servers)
        if None in places:
            raise ValueError(f"fhir_servers of {self.iss!r} must be absolute http(s) URLs without user info")
        object.__setattr__(self, "_allowlist", places)

    def allows_fhir_server(self, url: str) -> bool:
        """SSRF guard: is ``url`` on one of this client's FHIR servers (same origin, decoded path at or under)?"""
        target = _place(url)
        return target is not None and any(_admits(entry, target) for entry in self._allowlist)

    def fhir_base(self, url: str) -> FhirBase | None:
        """The FHIR server ``url`` names exactly (case of scheme and host, default port and trailing slash aside),
        or None: a SMART ``iss`` must be a base itself, not a path under one, and has no query or fragment.
        An entry with port ``*`` names that host and path on any port."""
        target = _place(url) if isinstance(url, str) and not {"?", "#"} & set(url) else None
        if target is None:
            return None
        for entry, spelled in zip(self._allowlist, self.fhir_servers, strict=True):
            if _same_server(entry, target) and entry.path == target.path:
                return FhirBase(_spelling(target), spelled)
        return None


class ClientRegistry:
    """The trusted clients by issuer, validated when loaded."""

    def __init__(self, clients: Iterable[TrustedClient] = ()):
        self._by_iss: dict[str, TrustedClient] = {}
        for client in clients:
            if client.iss in self._by_iss:
                raise ValueError(f"duplicate trusted client iss {client.iss!r}")
            self._by_iss[client.iss] = client

    @classmethod
    def from_file(cls, path: str | Path) -> ClientRegistry:
        """Load and validate a CDS_CLIENTS_FILE; errors name the file and the field."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the trusted clients file ({exc.strerror})") from None
        except ValueError as exc:
            raise ValueError(f"{path}: the trusted clients file is not valid JSON ({exc})") from None
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: Any, source: str = "trusted clients") -> ClientRegistry:
        """Validate a decoded clients document; errors name ``source`` and the field path."""
        return cls(_Loader(source).clients(data))

    def get(self, iss: str) -> TrustedClient | None:
        return self._by_iss.get(iss)

    def current(self) -> ClientRegistry:
        """Itself: a fixed registry is its own current version (as ``TrustedClients.current`` reads the file)."""
        return self

    def __iter__(self) -> Iterator[TrustedClient]:
        return iter(self._by_iss.values())

    def __len__(self) -> int:
        return len(self._by_iss)


class TrustedClients:
    """The trusted clients as CDS_CLIENTS_FILE says now: one per application (``trusted_clients(app)``), read by
    the client authenticator, the SMART launch and webhooks alike.

    ``current()`` re-reads the file when it was replaced or its size or modification time changed. A new version
    is validated whole before it replaces the old one in a single assignment, so every caller gets one complete
    version or the other; an invalid or unreadable change keeps the clients loaded before, with one ERROR line
    per change. Iterating or ``get`` reads ``current()`` (a call that needs one version throughout keeps it)."""

    def __init__(self, path: str | Path, refuse: Callable[[Path], str | None] | None = None):
        """``refuse(path)`` says why a new version may not be used here (a development-only file on a service
        reachable from other hosts), or None; the version loaded at start was checked with the other settings."""
        self.path = Path(path)
        self._refuse = refuse
        stamp = self._stamp()  # before reading: a change while we read is seen on the next call
        self._loaded: tuple[tuple[int, ...] | None, ClientRegistry] = (stamp, ClientRegistry.from_file(self.path))
        self._reload_lock = threading.Lock()

    def current(self) -> ClientRegistry:
        """The registry for the file as it is now (one ``stat`` when it did not change)."""
        stamp, registry = self._loaded
        if self._stamp() == stamp:
            return registry
        with self._reload_lock:  # one reader reloads; the others wait for it rather than parse the file too
            stamp, registry = self._loaded
            now = self._stamp()
            if now == stamp:
                return registry
            try:
                fresh = ClientRegistry.from_file(self.path)
            except ValueError as exc:  # the message names the file and the field, never a key or a secret
                log.error(
                    "CDS_CLIENTS_FILE changed but cannot be used (%s); keeping the %d clients loaded before",
                    exc,
                    len(registry),
                )
                self._loaded = (now, registry)
                return registry
            refusal = self._refuse(self.path) if self._refuse else None
            if refusal:
                log.error(
                    "CDS_CLIENTS_FILE changed to a file refused here (%s); keeping the %d clients loaded before",
                    refusal,
                    len(registry),
                )
                self._loaded = (now, registry)
                return registry
            log.info("CDS_CLIENTS_FILE reloaded: %d trusted clients", len(fresh))
            self._loaded = (now, fresh)
            return fresh

    def get(self, iss: str) -> TrustedClient | None:
        return self.current().get(iss)

    def __iter__(self) -> Iterator[TrustedClient]:
        return iter(self.current())

    def __len__(self) -> int:
        return len(self.current())

    def _stamp(self) -> tuple[int, ...] | None:
        """What tells a changed file: device, inode (a replace by rename), size, modification time; None when
        it cannot be read."""
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


_EXTENSION = "trusted_clients"


def install_trusted_clients(app, refuse: Callable[[Path], str | None] | None = None) -> TrustedClients:
    """Load CDS_CLIENTS_FILE (an invalid file stops the start) as the application's one ``TrustedClients``."""
    clients = app.extensions[_EXTENSION] = TrustedClients(app.config["CDS_CLIENTS_FILE"], refuse)
    return clients


def trusted_clients(app) -> TrustedClients:
    """The application's trusted clients (installed by the CDS area's setup)."""
    return app.extensions[_EXTENSION]


class _Loader:
    """Validation of a clients document, one check per field, each error naming its place."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, problem: str) -> ValueError:
        return ValueError(f"{self.source}: {where}: {problem}")

    def clients(self, data: Any) -> list[TrustedClient]:
        if not isinstance(data, dict) or not isinstance(data.get("clients"), list):
            raise self.fail("clients", 'the document must be an object with a "clients" array')
        self.known_members(data, ("clients",), "")
        seen: dict[str, int] = {}
        clients = []
        for index, entry in enumerate(data["clients"]):
            client = self.client(entry, f"clients[{index}]")
            if client.iss in seen:
                also = f"clients[{seen[client.iss]}]"
                raise self.fail(f"clients[{index}].iss", f"duplicate issuer {client.iss!r} (also {also})")
            seen[client.iss] = index
            clients.append(client)
        return clients

    def client(self, entry: Any, where: str) -> TrustedClient:
        if not isinstance(entry, dict):
            raise self.fail(where, "must be an object")
        self.known_members(entry, _CLIENT_MEMBERS, where + ".")
        iss = self.text(entry, "iss", where)
        if ("jwks" in entry) == ("jwks_url" in entry):
            raise self.fail(where, 'give exactly one of "jwks" (inline JWK Set) or "jwks_url"')
        jwks = self.jwks(entry["jwks"], f"{where}.jwks") if "jwks" in entry else None
        jwks_url = self.url(entry["jwks_url"], f"{where}.jwks_url") if "jwks_url" in entry else None
        servers = entry.get("fhir_servers", [])
        if not isinstance(servers, list):
            raise self.fail(f"{where}.fhir_servers", "must be an array of URLs")
        for i, url in enumerate(servers):
            if _place(url, wildcard_port=True) is None:
                raise self.fail(
                    f"{where}.fhir_servers[{i}]",
                    "must be an absolute http(s) URL: no user info, escaped separators, dot segments or ';'",
                )
        return TrustedClient(
            iss=iss,
            jwks=jwks,
            jwks_url=jwks_url,
            fhir_servers=tuple(servers),
            tenant=self.text(entry, "tenant", where, max_chars=200) if "tenant" in entry else None,
            smart_backend=self.smart_backend(entry["smart_backend"], f"{where}.smart_backend")
            if "smart_backend" in entry
            else None,
            webhooks=self.webhooks(entry.get("webhooks", []), f"{where}.webhooks"),
        )

    def jwks(self, jwks: Any, where: str) -> dict:
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
            raise self.fail(where, 'must be a JWK Set: an object with a non-empty "keys" array')
        kids: set[str] = set()
        for i, jwk in enumerate(jwks["keys"]):
            here = f"{where}.keys[{i}]"
            if not isinstance(jwk, dict):
                raise self.fail(here, "must be a JWK object")
            for member in PRIVATE_JWK_MEMBERS:
                if member in jwk:
                    raise self.fail(f"{here}.{member}", "private or symmetric key material: public keys only")
            kid = self.text(jwk, "kid", here)
            if kid in kids:
                raise self.fail(f"{here}.kid", f"duplicate kid {kid!r}")
            kids.add(kid)
            algorithms = verification_algorithms(jwk)
            if not algorithms:
                raise self.fail(here, "not a public signing key for RS*, PS*, ES256/384/512 or EdDSA")
            try:
                PyJWK(jwk, algorithm=min(algorithms))
            except PyJWTError as exc:
                raise self.fail(here, f"cannot be loaded as a key ({exc})") from None
        return jwks

    def smart_backend(self, value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, "must be an object with token_url, client_id and scope")
        self.url(value.get("token_url"), f"{where}.token_url")
        self.text(value, "client_id", where)
        self.text(value, "scope", where, max_chars=4000)
        if value.get("alg", "RS384") not in _SMART_BACKEND_ALGORITHMS:
            raise self.fail(f"{where}.alg", f"must be one of {', '.join(_SMART_BACKEND_ALGORITHMS)}")
        return value

    def webhooks(self, value: Any, where: str) -> tuple[dict, ...]:
        if not isinstance(value, list):
            raise self.fail(where, "must be an array")
        for i, hook in enumerate(value):
            here = f"{where}[{i}]"
            if not isinstance(hook, dict):
                raise self.fail(here, "must be an object with url, secret and events")
            self.known_members(hook, _WEBHOOK_MEMBERS, here + ".")
            self.url(hook.get("url"), f"{here}.url")
            self.webhook_secret(hook.get("secret"), f"{here}.secret")
            previous = hook.get("previous_secrets", [])
            if not isinstance(previous, list):
                raise self.fail(f"{here}.previous_secrets", "must be an array of secrets")
            for j, secret in enumerate(previous):
                self.webhook_secret(secret, f"{here}.previous_secrets[{j}]")
            events = hook.get("events")
            if not isinstance(events, list) or not events or not all(isinstance(e, str) and e for e in events):
                raise self.fail(f"{here}.events", "must be a non-empty array of event names")
            if hook.get("payload", "thin") not in ("thin", "full"):
                raise self.fail(f"{here}.payload", 'must be "thin" (the default) or "full"')
        return tuple(value)

    def webhook_secret(self, value: Any, where: str) -> str:
        """A Standard Webhooks secret: ``whsec_`` + base64 of at least 24 random bytes. Errors never echo it."""
        if not isinstance(value, str) or not value.startswith("whsec_"):
            raise self.fail(where, 'must be a string starting with "whsec_"')
        try:
            encoded = value[len("whsec_") :]
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)  # padding may be omitted
        except (binascii.Error, ValueError):
            raise self.fail(where, 'must be valid base64 after "whsec_"') from None
        if len(key) < WEBHOOK_SECRET_MIN_BYTES:
            raise self.fail(where, f"must decode to at least {WEBHOOK_SECRET_MIN_BYTES} bytes")
        return value

    def text(self, mapping: dict, member: str, where: str, max_chars: int = 500) -> str:
        value = mapping.get(member)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{where}.{member}", "must be a non-empty string")
        if len(value) > max_chars or not value.isprintable():
            # The feedback table stores iss and tenant (500 and 200 characters).
            raise self.fail(f"{where}.{member}", f"must be printable and at most {max_chars} characters")
        return value

    def url(self, value: Any, where: str) -> str:
        if _place(value) is None:
            raise self.fail(where, "must be an absolute http(s) URL: no user info, escaped separators or dot segments")
        return value

    def known_members(self, mapping: dict, members: tuple[str, ...], prefix: str) -> None:
        for member in mapping:
            if member not in members and not member.startswith("_"):
                raise self.fail(prefix + member, f"unknown member (expected one of {', '.join(members)})")
