"""Standard Webhooks signatures: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, one per secret."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook


def signature_header(event_id: str, timestamp: int, body: str, secrets: Iterable[str]) -> str:
    """The ``webhook-signature`` value: space-separated signatures, the current secret's first, then one per
    previous secret so that a receiver still holding an old secret verifies during a rotation."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return " ".join(Webhook(secret).sign(event_id, moment, body) for secret in secrets)


def signed_headers(event_id: str, timestamp: int, body: str, secrets: Iterable[str]) -> dict[str, str]:
    """The three Standard Webhooks headers for one delivery attempt."""
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(event_id, timestamp, body, secrets),
    }
