"""Development-only settings, and the rule that they work only while the service is reachable from this host alone.

The development clients file trusts the CDS Hooks Sandbox, whose signing key is published; a clients file made by
``gateway dev client`` trusts a key kept unguarded on a laptop; CDS_AUTH=off trusts everyone; FHIR_ALLOW_ANONYMOUS
and WEBHOOKS_ALLOW_PRIVATE open paths to internal servers. Each is fine on a laptop and dangerous anywhere else, so
with any of them the service starts only bound to loopback with PUBLIC_BASE_URL on localhost, and answers only
callers on this host (no forwarding proxy in between, no browser page of another site, no DNS-rebound name).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import os
import socket
import stat
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
from cryptography.hazmat.primitives import serialization
from flask import request

from app.cds.clients import DEV_CLIENTS_FILE
from app.http import operation_outcome
from app.smart.keys import public_jwk_members

log = logging.getLogger(__name__)

# Headers a forwarding proxy adds (besides any X-Forwarded-*), lower case: their presence means the caller is
# somewhere else.
_FORWARDING_HEADERS = frozenset(
    {
        "forwarded",
        "via",
        "x-real-ip",
        "x-client-ip",
        "true-client-ip",
        "cf-connecting-ip",
        "x-original-forwarded-for",
        "x-envoy-external-address",
    }
)
# The member that marks a clients file, or one client entry in it, as made for development (``gateway dev client``
# writes it); present at all, whatever its value, it marks.
DEVELOPMENT_MARK = "_development_only"
# Where ``gateway dev client`` keeps its private key by default, under INSTANCE_PATH.
DEV_CLIENT_DIR = "dev-client"
DEV_CLIENT_KEY_FILE = "client-es384.pem"
# Every development client key made for an instance, wherever it lives (public JWKs), under INSTANCE_PATH.
DEV_CLIENT_KEYS_FILE = "dev-client-keys.json"
# The browser pages that may call a development service: the CDS Hooks Sandbox, and pages on this host.
SANDBOX_ORIGIN = "https://sandbox.cds-hooks.org"


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
    clients_file = _development_clients_file(settings)
    found = [clients_file] if clients_file else []
    if not settings["CDS_AUTH"]:
        found.append("CDS_AUTH=off")
    if settings["FHIR_ALLOW_ANONYMOUS"]:
        found.append("FHIR_ALLOW_ANONYMOUS=1")
    if settings["WEBHOOKS_ALLOW_PRIVATE"]:
        found.append("WEBHOOKS_ALLOW_PRIVATE=1")
    return found


def _development_clients_file(settings: Mapping[str, Any]) -> str | None:
    """Why CDS_CLIENTS_FILE is a development one, or None when it is a deployment's own."""
    clients_file = Path(settings["CDS_CLIENTS_FILE"]).resolve()
    if clients_file == DEV_CLIENTS_FILE:
        return "CDS_CLIENTS_FILE unset (the development clients file trusts the CDS Hooks Sandbox's public key)"
    if trusts_a_published_key(clients_file):
        return f"CDS_CLIENTS_FILE {str(clients_file)!r} trusts the CDS Hooks Sandbox, whose key is public"
    if is_marked_development(clients_file) or trusts_the_dev_client(clients_file, settings.get("INSTANCE_PATH")):
        return f"CDS_CLIENTS_FILE {str(clients_file)!r} was made by `gateway dev client` for development"
    return None


def job_worker_refusal(settings: Mapping[str, Any]) -> str | None:
    """Why a job worker may not start with these settings, or None. A worker listens nowhere, but it works for
    whatever web server shares its ledger, so its development switches also need a deployment in development:
    a development clients file, CDS_AUTH=off, or PUBLIC_BASE_URL set on localhost (the general rule has checked
    that it is local; here it must be set, not defaulted, since a worker's environment may lack the server's)."""
    in_use = development_settings(settings)
    if not in_use or _development_clients_file(settings) or not settings["CDS_AUTH"]:
        return None
    if settings.get("PUBLIC_BASE_URL_SET"):
        return None
    return (
        f"{in_use[0]}: development only, and CDS_CLIENTS_FILE is a deployment's own with PUBLIC_BASE_URL unset; a "
        "job worker runs the jobs of every web server sharing its database, so its development switches need a "
        "development clients file or PUBLIC_BASE_URL set on localhost"
    )


def _runs_as_job_worker() -> bool:
    """Whether this process is ``gateway jobs worker`` (or ``flask --app app jobs worker``), read from its
    command line because the application is built before click reaches the command."""
    argv = sys.argv[1:]
    return any(argv[i : i + 2] == ["jobs", "worker"] for i in range(len(argv)))


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
    """Whether a clients file, or any client entry in it, carries the development mark (whatever its value, so
    that an entry merged into another file or a mark emptied still counts); unreadable files are left to the
    clients loader."""
    try:
        document = json.loads(clients_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    marked = [document, *_clients(document)] if isinstance(document, dict) else []
    return any(DEVELOPMENT_MARK in entry for entry in marked)


def trusts_the_dev_client(clients_file: Path, instance_path: str | None) -> bool:
    """Whether a clients file trusts a key ``gateway dev client`` made for this instance (kept unguarded on a
    laptop, in INSTANCE_PATH/dev-client or a ``--dir`` of its own), however its entry was renamed or unmarked."""
    if not instance_path:
        return False
    try:
        configured = json.loads(clients_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    trusted = _public_keys(configured)
    return any(_key_numbers(members) in trusted for members in dev_client_keys(instance_path))


def dev_client_keys(instance_path: str) -> list[dict[str, str]]:
    """The public JWKs of the keys ``gateway dev client`` made for this instance: the default folder's key, and
    every key it recorded in INSTANCE_PATH/dev-client-keys.json (those made with ``--dir`` too)."""
    found = []
    try:
        key = serialization.load_pem_private_key(
            (Path(instance_path) / DEV_CLIENT_DIR / DEV_CLIENT_KEY_FILE).read_bytes(), password=None
        )
        found.append(public_jwk_members(key))
    except (OSError, ValueError, TypeError):  # none, unreadable, or not a key the command makes
        pass
    try:
        recorded = json.loads((Path(instance_path) / DEV_CLIENT_KEYS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = []
    return found + [jwk for jwk in recorded if isinstance(jwk, dict)] if isinstance(recorded, list) else found


def _clients(document: Any) -> list[dict]:
    clients = document.get("clients") if isinstance(document, dict) else None
    return [c for c in clients if isinstance(c, dict)] if isinstance(clients, list) else []


def _public_keys(document: Any) -> set[tuple]:
    keys = set()
    for client in _clients(document):
        jwks = client.get("jwks")
        for jwk in jwks.get("keys", ()) if isinstance(jwks, dict) else ():
            if isinstance(jwk, dict):
                keys.add(_key_numbers(jwk))
    return keys


def _key_numbers(jwk: Mapping[str, Any]) -> tuple:
    """A public JWK as its type, curve and numbers, whatever their base64 spelling."""
    return (jwk.get("kty"), jwk.get("crv"), *(_number(jwk.get(m)) for m in ("x", "y", "n", "e")))


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
    (PUBLIC_BASE_URL not on localhost, or a bind that is not loopback: ``HOST``, or the addresses actually
    listened on, ``binds``), or None when the service may start."""
    in_use = development_settings(settings)
    why = _reachable_from_elsewhere(settings, binds) if in_use else None
    if not why:
        return None
    return (
        f"{in_use[0]}: development only, and the service is reachable from other hosts ({why}); "
        "a deployment states its trusted clients in CDS_CLIENTS_FILE and leaves the development switches off"
    )


def reload_refusal(settings: Mapping[str, Any], path: Path) -> str | None:
    """Why a changed CDS_CLIENTS_FILE may not replace the clients loaded before, or None. A change never turns
    development-only trust on in a service that started without it (its callers were never limited to this host),
    and otherwise meets the rule of a start, checked against the addresses actually listened on."""
    changed = {**settings, "CDS_CLIENTS_FILE": str(path)}
    in_use = development_settings(changed)
    if in_use and not settings.get("DEVELOPMENT_SETTINGS"):
        return f"{in_use[0]}: development only, and this service started without development settings"
    return off_host_refusal(changed) or off_host_refusal(changed, tcp_listeners())


def _reachable_from_elsewhere(settings: Mapping[str, Any], binds: Iterable[str] | None) -> str | None:
    base = settings["PUBLIC_BASE_URL"]
    if not is_loopback(urlsplit(base).hostname):
        return f"PUBLIC_BASE_URL is {base}"
    if binds is None:
        host = settings.get("HOST") or "127.0.0.1"
        return None if is_loopback(_bind_host(host)) else f"HOST is {host}"
    for bind in binds:
        if bind.startswith("unix:"):  # only a proxy calls a unix socket, and then every caller looks alike
            return f"it listens on {bind}, which a proxy would forward to"
        if not is_loopback(_bind_host(bind)):
            return f"it listens on {bind}"
    return None


def _bind_host(bind: str) -> str:
    """The host of a gunicorn bind or a HOST value: ``127.0.0.1:8080``, ``[::1]:8080``, ``0.0.0.0``, ``::``."""
    if bind.startswith("["):
        return bind[1 : bind.index("]")] if "]" in bind else bind
    if bind.count(":") > 1:  # a bare IPv6 address
        return bind
    return bind.rpartition(":")[0] if ":" in bind else bind


def bind_spelling(address: Any) -> str:
    """A socket's address as gunicorn spells a bind: ``127.0.0.1:8080``, ``[::1]:8080``, ``unix:/path``."""
    if isinstance(address, tuple):
        host, port = address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"unix:{address!r}" if isinstance(address, bytes) else f"unix:{address}"


def tcp_listeners() -> list[str]:
    """The TCP addresses this process listens on, however it came to (a --bind, another config file, an inherited
    socket), spelled as binds; read from /proc, so none are seen off Linux."""
    try:
        descriptors = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return []
    found = (_listening_address(fd) for fd in descriptors)
    return [bind_spelling(address) for address in found if isinstance(address, tuple)]


def _listening_address(fd: int) -> Any:
    """The address a listening stream socket ``fd`` is bound to, or None (not a socket, not listening, closed)."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
        duplicate = os.dup(fd)  # a socket object of our own to query, closed without touching ``fd``
    except OSError:
        return None
    try:
        sock = socket.socket(fileno=duplicate)
    except OSError:
        os.close(duplicate)
        return None
    with sock:
        try:
            listening = sock.type == socket.SOCK_STREAM and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            return sock.getsockname() if listening else None
        except OSError:
            return None


def _flask_run_host() -> list[str]:
    """The host ``flask run`` is about to listen on (it loads the application before it binds), if this is it."""
    from flask.cli import run_command

    context = click.get_current_context(silent=True)
    if context is None or context.command is not run_command or not context.params.get("host"):
        return []
    return [f"{context.params['host']}:{context.params.get('port')}"]


def is_development_origin(origin: str | None) -> bool:
    """An Origin a development service answers across sites: the CDS Hooks Sandbox, or a page on this host."""
    if not origin:
        return False
    if origin == SANDBOX_ORIGIN:
        return True
    try:
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and is_loopback(parts.hostname) and parts.port != 0
    except ValueError:
        return False


def _named_host(host_header: str) -> str | None:
    """The host a Host header names (port aside), or None when it is malformed."""
    try:
        return urlsplit(f"//{host_header}").hostname
    except ValueError:
        return None


def _forwarded(headers) -> bool:
    names = (name.lower() for name, _ in headers.items())
    return any(name in _FORWARDING_HEADERS or name.startswith("x-forwarded-") for name in names)


def init_app(app) -> None:
    """Say loudly which development settings are on, refuse to start where other hosts could call, and answer only
    callers on this host, under a loopback name, while they are on."""
    in_use = development_settings(app.config)
    app.config["DEVELOPMENT_SETTINGS"] = in_use
    if not in_use:
        return
    refusal = off_host_refusal(app.config, [*tcp_listeners(), *_flask_run_host()])
    if not refusal and _runs_as_job_worker():
        refusal = job_worker_refusal(app.config)
    if refusal:
        from app.config import ConfigError  # app.config imports this module

        raise ConfigError(refusal)  # a gunicorn worker prints it as one line, then the arbiter halts
    for setting in in_use:
        log.warning("development only: %s; the service answers callers on this host alone", setting)
    refusal = f"Development settings are on ({'; '.join(in_use)}): this service answers callers on this host only"

    @app.before_request
    def _callers_on_this_host_only():
        # A page of another site resolving its own name to 127.0.0.1 (DNS rebinding) still sends its own name.
        named = _named_host(request.host)
        if _forwarded(request.headers) or not is_loopback(request.remote_addr) or not is_loopback(named):
            return operation_outcome(403, "forbidden", refusal)
        return None
