"""Webhooks (Standard Webhooks): subscribers in CDS_CLIENTS_FILE, each delivery a job in the ledger.

``emit`` fixes an event's body once and enqueues one ``webhook.deliver`` job per subscriber under an id
derived from the event and the endpoint, so emitting the same event again never delivers it twice.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from flask import Flask

from app.clock import app_clock, wall_time
from app.jobs.monitor import DLQ_ALERT_EVENT, on_dead_letter_alert
from app.jobs.registry import submit
from app.webhooks.cli import init_webhooks_cli
from app.webhooks.delivery import KIND  # importing delivery registers the ``webhook.deliver`` job handler
from app.webhooks.endpoints import current_registry, disable, enable, endpoints, is_disabled, subscribers

__all__ = ["disable", "emit", "enable", "endpoints", "init_app", "is_disabled"]


def init_app(app: Flask) -> None:
    """Send the dead letter queue alert to its subscribers, and add ``webhooks`` to ``flask jobs`` (registered
    by the jobs area first)."""
    on_dead_letter_alert(app, "webhooks", _send_dead_letter_alert)
    init_webhooks_cli(app, app.cli.commands["jobs"])


def _send_dead_letter_alert(app: Flask, event_id: str, data: dict) -> None:
    """The operators' alert goes to the subscribers of every client (``client_iss=None``)."""
    emit(app, DLQ_ALERT_EVENT, event_id, data, client_iss=None)


def delivery_job_id(endpoint_id: str, event_id: str) -> str:
    return f"webhook:{endpoint_id}:{event_id}"


def event_body(event_type: str, data: dict, timestamp: datetime) -> str:
    """The body every attempt sends, byte for byte: ``{"type", "timestamp", "data"}``."""
    stamp = timestamp.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return json.dumps({"type": event_type, "timestamp": stamp, "data": data}, separators=(",", ":"), sort_keys=True)


def emit(
    app: Flask,
    event_type: str,
    event_id: str,
    data: dict,
    *,
    client_iss: str | None,
    full_data: dict | None = None,
    expires_in: float | None = None,
) -> int:
    """Enqueue one delivery of event ``event_id`` to every endpoint subscribed to ``event_type``: those of the
    trusted client ``client_iss``, or of every client when it is None (operator alerts). ``data`` is the thin
    payload (ids and a URL, never PHI); ``full_data`` is merged in for endpoints configured with
    ``"payload": "full"``. ``expires_in`` (seconds) stops deliveries that have become clinically stale.
    Returns how many deliveries were newly enqueued (0 for an event emitted before)."""
    now = wall_time(app_clock(app))
    bodies = {
        "thin": event_body(event_type, data, now),
        "full": event_body(event_type, {**data, **(full_data or {})}, now),
    }
    created = 0
    for subscriber in subscribers(current_registry(app), client_iss):
        if event_type not in subscriber.events:
            continue
        payload = {
            "event_id": event_id,
            "event_type": event_type,
            "endpoint_id": subscriber.id,
            "client_iss": subscriber.client_iss,
            "url": subscriber.url,
            "body": bodies[subscriber.payload],
        }
        created += submit(
            app,
            KIND,
            delivery_job_id(subscriber.id, event_id),
            payload,
            expires_in=expires_in,
        )
    return created
