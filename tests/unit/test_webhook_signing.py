"""Webhook signing, retry timing and the webhook members of the clients file."""

from __future__ import annotations

import base64
import json
import os
import random
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from app.cds.clients import ClientRegistry
from app.webhooks import event_body
from app.webhooks.schedule import retry_after_seconds, retry_delay
from app.webhooks.signing import signed_headers


def new_secret(size: int = 32) -> str:
    return "whsec_" + base64.b64encode(os.urandom(size)).decode()


BODY = '{"data":{"job_id":"j1"},"timestamp":"2026-01-01T00:00:00.000Z","type":"discharge-summary.ready"}'


def test_a_signature_verifies_with_the_standardwebhooks_package():
    secret = new_secret()
    headers = signed_headers("evt-1", int(time.time()), BODY, [secret])
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(BODY, headers) == json.loads(BODY)


def test_the_signature_is_hmac_sha256_over_id_timestamp_and_body():
    import hashlib
    import hmac

    secret = new_secret()
    headers = signed_headers("evt-1", 1_700_000_000, BODY, [secret])
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"evt-1.1700000000.{BODY}".encode(), hashlib.sha256).digest()
    assert headers["webhook-signature"] == "v1," + base64.b64encode(digest).decode()


def test_during_rotation_every_secret_signs_and_each_alone_verifies():
    new, old = new_secret(), new_secret()
    headers = signed_headers("evt-2", int(time.time()), BODY, [new, old])
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(new).verify(BODY, headers)
    Webhook(old).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)


def test_a_tampered_body_fails_verification():
    secret = new_secret()
    headers = signed_headers("evt-3", int(time.time()), BODY, [secret])
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace("j1", "j2"), headers)


def test_an_old_timestamp_fails_verification():
    secret = new_secret()
    headers = signed_headers("evt-4", int(time.time()) - 600, BODY, [secret])
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(BODY, headers)


def test_the_event_body_has_the_recommended_shape():
    body = json.loads(
        event_body("discharge-summary.ready", {"job_id": "j1"}, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    )
    assert body == {
        "type": "discharge-summary.ready",
        "timestamp": "2026-01-02T03:04:05.000Z",
        "data": {"job_id": "j1"},
    }


def test_retry_delays_follow_the_schedule_with_jitter():
    schedule = (5.0, 300.0, 1800.0)
    rng = random.Random(7)
    for attempt, base in ((1, 5.0), (2, 300.0), (3, 1800.0), (9, 1800.0)):
        delays = [retry_delay(schedule, attempt, rng) for _ in range(50)]
        assert all(0.8 * base <= d <= 1.2 * base for d in delays)
        assert len(set(delays)) > 1


def test_retry_after_in_seconds_or_as_a_date_is_capped():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after_seconds("120", cap=3600) == 120
    assert retry_after_seconds("999999", cap=3600) == 3600
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=90), usegmt=True), 3600, now) == 90
    assert retry_after_seconds(format_datetime(now - timedelta(seconds=90), usegmt=True), 3600, now) == 0
    assert retry_after_seconds(None, 3600) is None
    assert retry_after_seconds("soon", 3600) is None


# The webhook members of CDS_CLIENTS_FILE.


def client_with(hook: dict, **backend) -> dict:
    client = {"iss": "https://ehr.example.org", "jwks_url": "https://ehr.example.org/jwks", "webhooks": [hook]}
    if backend:
        client["smart_backend"] = {
            "token_url": "https://ehr.example.org/token",
            "client_id": "gw",
            "scope": "s",
            **backend,
        }
    return {"clients": [client]}


def hook(**members) -> dict:
    return {
        "url": "https://hooks.example.org/in",
        "secret": new_secret(),
        "events": ["discharge-summary.ready"],
    } | members


def load_error(data: dict) -> str:
    with pytest.raises(ValueError) as error:
        ClientRegistry.from_mapping(data)
    return str(error.value)


def test_a_complete_webhook_entry_loads():
    entry = hook(previous_secrets=[new_secret()], payload="full")
    client = ClientRegistry.from_mapping(client_with(entry)).get("https://ehr.example.org")
    assert client.webhooks[0]["payload"] == "full"
    assert entry["secret"] not in repr(client)


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("abc", 'starting with "whsec_"'),
        ("whsec_not base64!", "valid base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "at least 24 bytes"),
    ],
)
def test_a_bad_secret_is_an_error_naming_the_field_not_the_secret(secret, problem):
    message = load_error(client_with(hook(secret=secret)))
    assert "clients[0].webhooks[0].secret" in message and problem in message
    assert secret.removeprefix("whsec_") not in message


def test_an_unpadded_secret_is_accepted():
    ClientRegistry.from_mapping(client_with(hook(secret=new_secret(32).rstrip("="))))


def test_a_bad_previous_secret_is_an_error_naming_its_index():
    message = load_error(client_with(hook(previous_secrets=[new_secret(), "whsec_AAAA"])))
    assert "clients[0].webhooks[0].previous_secrets[1]" in message


@pytest.mark.parametrize(
    ("members", "field"),
    [
        ({"events": []}, "events"),
        ({"events": ["ok", 3]}, "events"),
        ({"payload": "everything"}, "payload"),
        ({"url": "ftp://hooks.example.org/in"}, "url"),
        ({"retries": 3}, "retries"),
        ({"previous_secrets": "whsec_x"}, "previous_secrets"),
    ],
)
def test_bad_webhook_members_are_errors_naming_the_field(members, field):
    assert f"clients[0].webhooks[0].{field}" in load_error(client_with(hook(**members)))


def test_smart_backend_alg_is_rs384_or_es384():
    ClientRegistry.from_mapping(client_with(hook(), alg="ES384"))
    ClientRegistry.from_mapping(client_with(hook(), alg="RS384"))
    assert "clients[0].smart_backend.alg" in load_error(client_with(hook(), alg="HS256"))
