"""The ``webhook.deliver`` job: one signed POST of a stored event body to one endpoint, retried on schedule.

Success is any 2xx. 410 Gone disables the endpoint and dead-letters the delivery; every other answer,
a timeout or a connection error is retried after the schedule's delay (or the receiver's Retry-After) until
the schedule is used up, then dead-lettered. Errors recorded in the ledger name the endpoint id and the
reason, never the secret, the body or the URL (a URL may carry a token). Every attempt to send is in the audit
log (``job.webhook-delivery``: endpoint id, event type, thin or full, receiver host, status), since a full event
carries patient data out of the gateway.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import sqlalchemy as sa
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ReadTimeoutError, SSLError

from app.clock import app_clock
from app.jobs import ledger
from app.jobs.registry import JobContext, PermanentFailure, RetryLater, job_handler
from app.jobs.retry import RetryPolicy, ScheduleBackoff
from app.webhooks.addresses import RefusedDestination, ResolutionFailed, check
from app.webhooks.endpoints import disable, find, is_disabled
from app.webhooks.schedule import JITTER, retry_after_seconds
from app.webhooks.signing import signed_headers
from app.webhooks.transport import post

log = logging.getLogger(__name__)

KIND = "webhook.deliver"
# The Standard Webhooks schedule (WEBHOOK_RETRY_SCHEDULE) with jitter; attempts: the first try plus one per entry.
SCHEDULE = ScheduleBackoff(setting="WEBHOOK_RETRY_SCHEDULE", jitter=JITTER)
RETRY = RetryPolicy(max_attempts=None, backoff=SCHEDULE)
# Retry-After is honoured up to the schedule's longest delay, and always up to an hour even on a short schedule.
RETRY_AFTER_MIN_CAP_S = 3600.0
USER_AGENT = "clinical-ai-gateway-webhooks/1.0 (Standard Webhooks)"
AUDIT_EVENT = "job.webhook-delivery"  # one audit record per attempt to send an event out


@job_handler(KIND, retry=RETRY)
def deliver(ctx: JobContext) -> dict:
    """Deliver the stored event body to its endpoint, signed with the endpoint's current secrets."""
    payload, job, config = ctx.payload, ctx.job, ctx.app.config
    endpoint = payload["endpoint_id"]
    now = app_clock(ctx.app).now()  # wall seconds: the expiry is the ledger's, the signature's time the receiver's
    if job.expires_at is not None and datetime.fromtimestamp(now, UTC) >= job.expires_at:
        raise PermanentFailure(f"endpoint {endpoint}: the event expired before it could be delivered")
    if is_disabled(ctx.engine, endpoint):
        raise PermanentFailure(f"endpoint {endpoint} disabled; re-enable it and requeue to deliver")
    subscriber = find(ctx.app, payload["client_iss"], payload["url"])  # an unusable file: the previous version
    if subscriber is None:
        raise PermanentFailure(f"endpoint {endpoint} is no longer configured in CDS_CLIENTS_FILE")
    timeout = config["WEBHOOK_TIMEOUT_S"]
    try:
        destination = check(subscriber.url, allow_private=config["WEBHOOKS_ALLOW_PRIVATE"], timeout=timeout)
    except RefusedDestination as exc:
        raise PermanentFailure(f"endpoint {endpoint} refused: {exc}") from None
    except ResolutionFailed as exc:
        raise _again(ctx, f"endpoint {endpoint}: {exc}") from None

    body = payload["body"]
    headers = {
        **signed_headers(payload["event_id"], int(now), body, subscriber.secrets),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
    sent = {
        "endpoint": endpoint,
        "iss": subscriber.client_iss,
        "webhookEvent": payload["event_type"],
        "payloadKind": subscriber.payload,  # "full" events carry patient data out of the gateway
        "server": f"{destination.host}:{destination.port}",
    }
    started = time.monotonic()
    try:
        answer = post(destination, body.encode("utf-8"), headers, timeout)
    except (HTTPError, OSError) as exc:
        timed_out = isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)) and not isinstance(exc, NewConnectionError)
        outcome = "timeout" if timed_out else "unreachable"
        ctx.audit(AUDIT_EVENT, **sent, outcome=outcome, latency_ms=_since(started))
        if isinstance(exc, NewConnectionError):
            raise _again(ctx, f"endpoint {endpoint}: cannot connect (refused or unreachable)") from None
        if timed_out:
            raise _again(ctx, f"endpoint {endpoint}: no answer within {timeout:g} s") from None
        if isinstance(exc, SSLError):
            raise _again(ctx, f"endpoint {endpoint}: TLS failed (certificate or handshake)") from None
        raise _again(ctx, f"endpoint {endpoint}: connection failed ({type(exc).__name__})") from None
    ctx.audit(AUDIT_EVENT, **sent, status=answer.status, latency_ms=_since(started))

    if 200 <= answer.status < 300:
        return {
            "endpoint_id": endpoint,
            "event_id": payload["event_id"],
            "status": answer.status,
            "attempt": job.attempts,
        }
    if answer.status == 410:
        reason = "the receiver answered 410 Gone"
        disable(ctx.engine, endpoint, reason, url=subscriber.url, client_iss=subscriber.client_iss)
        log.warning("webhook endpoint %s disabled: %s", endpoint, reason)
        raise PermanentFailure(f"endpoint {endpoint}: {reason}; endpoint disabled")
    cap = max(*SCHEDULE.schedule(config), RETRY_AFTER_MIN_CAP_S)
    raise _again(ctx, f"endpoint {endpoint}: answered {answer.status}", retry_after_seconds(answer.retry_after, cap))


def _since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def _again(ctx: JobContext, reason: str, retry_after: float | None = None) -> Exception:
    """RetryLater after Retry-After or on the schedule (``RETRY``), or PermanentFailure once the job's attempts
    (the policy's, stored in its row at emit) are used up, saying so."""
    if ctx.job.attempts >= ctx.job.max_attempts:
        return PermanentFailure(f"{reason}; gave up after {ctx.job.attempts} attempts")
    return RetryLater(retry_after, reason)


def dead_deliveries(engine: sa.Engine, endpoint_id: str) -> list[str]:
    """Ids of the dead-lettered deliveries to an endpoint (its id is part of theirs), for a requeue."""
    prefix = f"webhook:{endpoint_id}:"
    query = sa.select(ledger.jobs.c.id).where(
        ledger.jobs.c.state == ledger.DEAD,
        ledger.jobs.c.kind == KIND,
        ledger.jobs.c.id.startswith(prefix, autoescape=True),
    )
    with engine.connect() as conn:
        return list(conn.execute(query.order_by(ledger.jobs.c.id)).scalars())
