"""Webhook endpoints: their ids, the subscribers configured in CDS_CLIENTS_FILE, and the disabled state we keep.

An endpoint is one (client issuer, URL) pair. Its configuration (secret, events, payload) lives in the
clients file and is read afresh when it changes (``app.cds.clients.TrustedClients``, the registry the CDS
endpoints authenticate with), so a rotated secret takes effect on the next attempt; the
only state we keep is whether it was disabled (a 410 Gone from the receiver) until an operator re-enables it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from flask import Flask
from sqlalchemy.dialects import postgresql, sqlite

from app.cds.clients import ClientRegistry, trusted_clients
from app.clock import utc_now
from app.db import UTCDateTime, metadata

webhook_endpoints = sa.Table(
    "webhook_endpoints",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("url", sa.Text, nullable=True),
    sa.Column("client_iss", sa.Text, nullable=True),
    sa.Column("disabled_at", UTCDateTime, nullable=True),
    sa.Column("disabled_reason", sa.Text, nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)


def endpoint_id(client_iss: str, url: str) -> str:
    """The stable id of a subscriber: the same (issuer, URL) always gives the same id."""
    return hashlib.sha256(f"{client_iss}|{url}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Subscriber:
    """One configured webhook endpoint of one trusted client."""

    id: str
    client_iss: str
    url: str
    events: tuple[str, ...]
    payload: str  # "thin" or "full"
    secret: str = field(repr=False)
    previous_secrets: tuple[str, ...] = field(default=(), repr=False)

    @property
    def secrets(self) -> tuple[str, ...]:
        """The current secret first, then those still honoured during a rotation."""
        return (self.secret, *self.previous_secrets)


def subscribers(registry: ClientRegistry, client_iss: str | None = None) -> list[Subscriber]:
    """Every configured endpoint, or only those of ``client_iss`` when given."""
    found = []
    for client in registry:
        if client_iss is not None and client.iss != client_iss:
            continue
        for hook in client.webhooks:
            found.append(
                Subscriber(
                    id=endpoint_id(client.iss, hook["url"]),
                    client_iss=client.iss,
                    url=hook["url"],
                    events=tuple(hook["events"]),
                    payload=hook.get("payload", "thin"),
                    secret=hook["secret"],
                    previous_secrets=tuple(hook.get("previous_secrets", ())),
                )
            )
    return found


def current_registry(app: Flask) -> ClientRegistry:
    """The clients file as it is now: the application's one registry, re-read when the file changes (an invalid
    change keeps the clients loaded before, see ``app.cds.clients.TrustedClients``)."""
    return trusted_clients(app).current()


def find(app: Flask, client_iss: str, url: str) -> Subscriber | None:
    """The endpoint as configured now, or None when it was removed from the clients file."""
    wanted = endpoint_id(client_iss, url)
    return next((s for s in subscribers(current_registry(app), client_iss) if s.id == wanted), None)


def _upsert(engine: sa.Engine):
    return (postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert)(webhook_endpoints)


def disable(
    engine: sa.Engine,
    endpoint_id: str,
    reason: str,
    *,
    url: str | None = None,
    client_iss: str | None = None,
    now: datetime | None = None,
) -> None:
    """Stop delivering to an endpoint (deliveries to it dead-letter) until :func:`enable`."""
    now = utc_now(now)
    values = {"disabled_at": now, "disabled_reason": reason, "updated_at": now}
    statement = (
        _upsert(engine)
        .values(id=endpoint_id, url=url, client_iss=client_iss, **values)
        .on_conflict_do_update(index_elements=["id"], set_=values)
    )
    with engine.begin() as conn:
        conn.execute(statement)


def enable(engine: sa.Engine, endpoint_id: str, *, now: datetime | None = None) -> bool:
    """Deliver to the endpoint again; True when it had been disabled. Requeue its dead deliveries separately."""
    statement = (
        webhook_endpoints.update()
        .where(webhook_endpoints.c.id == endpoint_id, webhook_endpoints.c.disabled_at.is_not(None))
        .values(disabled_at=None, disabled_reason=None, updated_at=utc_now(now))
        .returning(webhook_endpoints.c.id)
    )
    with engine.begin() as conn:
        return conn.execute(statement).first() is not None


def with_url(app: Flask, url: str, client_iss: str | None = None) -> list[tuple[str, str | None]]:
    """(endpoint id, client issuer) of every endpoint with this URL: configured in the clients file, or kept
    disabled here (when it has left the file since). Only those of ``client_iss`` when given."""
    found = {s.id: s.client_iss for s in subscribers(current_registry(app), client_iss) if s.url == url}
    query = sa.select(webhook_endpoints.c.id, webhook_endpoints.c.client_iss).where(webhook_endpoints.c.url == url)
    if client_iss is not None:
        query = query.where(webhook_endpoints.c.client_iss == client_iss)
    with app.extensions["db"].connect() as conn:
        for row in conn.execute(query):
            found.setdefault(row.id, row.client_iss)
    return sorted(found.items())


def is_disabled(engine: sa.Engine, endpoint_id: str) -> bool:
    query = sa.select(webhook_endpoints.c.disabled_at).where(webhook_endpoints.c.id == endpoint_id)
    with engine.connect() as conn:
        return conn.execute(query).scalar() is not None


def endpoints(app: Flask) -> list[dict[str, Any]]:
    """The configured endpoints with their state, for operators; never their secrets."""
    with app.extensions["db"].connect() as conn:
        states = {row.id: row for row in conn.execute(sa.select(webhook_endpoints))}
    listed = []
    for sub in subscribers(current_registry(app)):
        state = states.get(sub.id)
        disabled_at = state.disabled_at if state is not None else None
        listed.append(
            {
                "id": sub.id,
                "client_iss": sub.client_iss,
                "url": sub.url,
                "events": list(sub.events),
                "payload": sub.payload,
                "previous_secrets": len(sub.previous_secrets),
                "disabled_at": disabled_at.isoformat() if disabled_at else None,
                "disabled_reason": state.disabled_reason if disabled_at else None,
            }
        )
    return listed
