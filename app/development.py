"""Development-only settings, and the rule that they work only while the service is reachable from this host alone.

The development clients file trusts the CDS Hooks Sandbox, whose signing key is published; a clients file made by
``gateway dev client`` trusts a key kept unguarded on a laptop; CDS_AUTH=off trusts everyone; FHIR_ALLOW_ANONYMOUS
and WEBHOOKS_ALLOW_PRIVATE open paths to internal servers. Each is fine on a laptop and dangerous anywhere else, so
with any of them the service starts only bound to loopback with PUBLIC_BASE_URL on localhost, and answers only
callers on this host (no forwarding proxy in between).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import request

from app.cds.clients import DEV_CLIENTS_FILE
from app.http import operation_outcome

log = logging.getLogger(__name__)

_FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Real-IP")
# The top-level member that marks a clients file as made for development (``gateway dev client`` writes it).
DEVELOPMENT_MARK = "_development_only"


def is_loopback(host: str | None) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1, IPv4-mapped loopback)."""
    if not host:
        return False
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def development_settings(settings: Mapping[str, Any]) -> list[str]:
    """The development-only settings in use, each named as an operator would set or fix it."""
    found = []
    clients_file = Path(settings["CDS_CLIENTS_FILE"]).resolve()
    if clients_file == DEV_CLIENTS_FILE:
        found.append("CDS_CLIENTS_FILE unset (the development clients file trusts the CDS Hooks Sandbox's public key)")
    elif trusts_a_published_key(clients_file):
        found.append(f"CDS_CLIENTS_FILE {str(clients_file)!r} trusts the CDS Hooks Sandbox, whose key is public")
    elif is_marked_development(clients_file):
        found.append(f"CDS_CLIENTS_FILE {str(clients_file)!r} was made by `gateway dev client` for development")
    if not settings["CDS_AUTH"]:
        found.append("CDS_AUTH=off")
    if settings["FHIR_ALLOW_ANONYMOUS"]:
        found.append("FHIR_ALLOW_ANONYMOUS=1")
    if settings["WEBHOOKS_ALLOW_PRIVATE"]:
        found.append("WEBHOOKS_ALLOW_PRIVATE=1")
    return found


def trusts_a_published_key(clients_file: Path) -> bool:
    """Whether a clients file trusts the CDS Hooks Sandbox, whose private key is public: its issuer, a JWKS URL
    on its host, or one of its keys inline (compared as numbers, whatever the base64 spelling). Unreadable
    files are left to the clients loader, which names the problem."""
    try:
        published = json.loads(DEV_CLIENTS_FILE.read_text(encoding="utf-8"))
        configured = json.loads(clients_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    sandbox_issuers = {c.get("iss") for c in _clients(published)}
    sandbox_hosts = {urlsplit(iss).hostname for iss in sandbox_issuers if isinstance(iss, str)}
    for client in _clients(configured):
        jwks_url = client.get("jwks_url")
        if client.get("iss") in sandbox_issuers or (
            isinstance(jwks_url, str) and urlsplit(jwks_url).hostname in sandbox_hosts
        ):
            return True
    return bool(_public_keys(published) & _public_keys(configured))


def is_marked_development(clients_file: Path) -> bool:
    """Whether a clients file carries the development mark; unreadable files are left to the clients loader."""
    try:
        document = json.loads(clients_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and bool(document.get(DEVELOPMENT_MARK))


def _clients(document: Any) -> list[dict]:
    clients = document.get("clients") if isinstance(document, dict) else None
    return [c for c in clients if isinstance(c, dict)] if isinstance(clients, list) else []


def _public_keys(document: Any) -> set[tuple]:
    keys = set()
    for client in _clients(document):
        jwks = client.get("jwks")
        for jwk in jwks.get("keys", ()) if isinstance(jwks, dict) else ():
            if isinstance(jwk, dict):
                keys.add((jwk.get("kty"), jwk.get("crv"), *(_number(jwk.get(m)) for m in ("x", "y", "n", "e"))))
    return keys


def _number(member: Any) -> int | None:
    """A JWK's base64url member as the number it encodes (padding and leading zero bytes aside)."""
    if not isinstance(member, str):
        return None
    try:
        return int.from_bytes(base64.urlsafe_b64decode(member + "=" * (-len(member) % 4)), "big")
    except (binascii.Error, ValueError):
        return None


def off_host_refusal(settings: Mapping[str, Any], binds: Iterable[str] | None = None) -> str | None:
    """One line naming the first development-only setting in use while the service is reachable from elsewhere
    (PUBLIC_BASE_URL not on localhost, or a bind that is not loopback: ``HOST``, or gunicorn's actual ``binds``),
    or None when the service may start."""
    in_use = development_settings(settings)
    why = _reachable_from_elsewhere(settings, binds) if in_use else None
    if not why:
        return None
    return (
        f"{in_use[0]}: development only, and the service is reachable from other hosts ({why}); "
        "a deployment states its trusted clients in CDS_CLIENTS_FILE and leaves the development switches off"
    )


def _reachable_from_elsewhere(settings: Mapping[str, Any], binds: Iterable[str] | None) -> str | None:
    base = settings["PUBLIC_BASE_URL"]
    if not is_loopback(urlsplit(base).hostname):
        return f"PUBLIC_BASE_URL is {base}"
    for bind in [settings.get("HOST") or "127.0.0.1"] if binds is None else binds:
        if not bind.startswith(("unix:", "fd://")) and not is_loopback(_bind_host(bind)):
            return f"it listens on {bind}"
    return None


def _bind_host(bind: str) -> str:
    """The host of a gunicorn bind or a HOST value: ``127.0.0.1:8080``, ``[::1]:8080``, ``0.0.0.0``, ``::``."""
    if bind.startswith("["):
        return bind[1 : bind.index("]")] if "]" in bind else bind
    if bind.count(":") > 1:  # a bare IPv6 address
        return bind
    return bind.rpartition(":")[0] if ":" in bind else bind


def init_app(app) -> None:
    """Say loudly which development settings are on, and answer only callers on this host while they are."""
    in_use = development_settings(app.config)
    app.config["DEVELOPMENT_SETTINGS"] = in_use
    if not in_use:
        return
    for setting in in_use:
        log.warning("development only: %s; the service answers callers on this host alone", setting)
    refusal = f"Development settings are on ({'; '.join(in_use)}): this service answers callers on this host only"

    @app.before_request
    def _callers_on_this_host_only():
        forwarded = any(name in request.headers for name in _FORWARDING_HEADERS)
        if forwarded or not is_loopback(request.remote_addr):
            return operation_outcome(403, "forbidden", refusal)
        return None
