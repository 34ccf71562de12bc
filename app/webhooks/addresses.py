"""The destination guard: which webhook URLs we may deliver to, and the checked addresses to connect to.

A receiver's URL comes from configuration, but its host name is resolved at delivery time, so a name that
(now) points at loopback, a private network or a cloud metadata address would turn the gateway into a way
into the internal network (SSRF). Every resolved address is checked and the delivery connects to one of those
checked addresses, never to a second lookup of the name, which closes the DNS rebinding gap.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORTS = {"http": 80, "https": 443}


class RefusedDestination(Exception):
    """The URL or one of its addresses may not receive webhooks; the message says why (never any secret)."""


class ResolutionFailed(Exception):
    """The host name could not be resolved in time; a later attempt may succeed."""


@dataclass(frozen=True)
class Destination:
    """A checked URL: where to connect (``addresses``) and what to ask for there."""

    scheme: str
    host: str  # the name for the Host header, SNI and certificate checks
    port: int
    target: str  # path and query
    addresses: tuple[str, ...]

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def refusal(address: Address) -> str | None:
    """Why ``address`` may not receive webhooks, or None for a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None:
            reason = refusal(embedded)
            return f"{reason} (embedded in {address})" if reason else None
    for reason, hit in (
        ("an unspecified", address.is_unspecified),
        ("a loopback", address.is_loopback),
        ("a link-local", address.is_link_local),
        ("a multicast", address.is_multicast),
        ("a private", address.is_private),
        ("a reserved", address.is_reserved),
        ("a non-global", not address.is_global),
    ):
        if hit:
            return f"{address}, {reason} address"
    return None


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def resolve(host: str, port: int, timeout: float) -> list[Address]:
    """Every address ``host`` resolves to, without a lookup for an IP literal; bounded by ``timeout`` seconds
    (getaddrinfo has no timeout of its own, so it runs on a daemon thread we stop waiting for)."""
    literal = _literal(host)
    if literal is not None:
        return [literal]
    found: list = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            found.append(exc)

    thread = threading.Thread(target=lookup, name="webhook-dns", daemon=True)
    thread.start()
    thread.join(timeout)
    if not found:
        raise ResolutionFailed(f"resolving {host} took longer than {timeout:g} s")
    if isinstance(found[0], OSError):
        raise ResolutionFailed(f"cannot resolve {host} ({type(found[0]).__name__})")
    addresses: list[Address] = []
    for _family, _type, _proto, _name, sockaddr in found[0]:
        address = _literal(str(sockaddr[0]))
        if address is not None and address not in addresses:
            addresses.append(address)
    if not addresses:
        raise ResolutionFailed(f"{host} has no addresses")
    return addresses


def check(url: str, *, allow_private: bool, timeout: float = 5.0) -> Destination:
    """Resolve and vet a webhook URL. Only https is allowed, and only to public addresses, unless
    ``allow_private`` (WEBHOOKS_ALLOW_PRIVATE, for development and closed networks) also admits http and
    loopback or private addresses. Raises RefusedDestination (permanent) or ResolutionFailed (transient)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.username or parts.password:
        raise RefusedDestination("the webhook URL must be an absolute http(s) URL without user info")
    if scheme != "https" and not allow_private:
        raise RefusedDestination("the webhook URL must use https (http only with WEBHOOKS_ALLOW_PRIVATE)")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise RefusedDestination("the webhook URL has an invalid port") from None
    host = parts.hostname.rstrip(".")
    addresses = resolve(host, port, timeout)
    if not allow_private:
        for address in addresses:
            reason = refusal(address)
            if reason:
                raise RefusedDestination(f"{host} resolves to {reason}; not delivered (WEBHOOKS_ALLOW_PRIVATE is off)")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Destination(scheme, host, port, target, tuple(str(a) for a in addresses))
