"""Webhook deliveries end to end: real local receivers, the ledger, and a worker driving the retries."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from dataclasses import dataclass

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from werkzeug import Response

from app.clock import app_clock
from app.jobs import ledger
from app.jobs.registry import JobContext, PermanentFailure
from app.jobs.worker import Worker
from app.webhooks import emit, enable, endpoints, init_app, is_disabled
from app.webhooks.delivery import KIND, deliver
from app.webhooks.endpoints import endpoint_id
from tests.conftest import LOCAL_BASE_URL
from tests.support.clock import FakeClock
from tests.support.tokens import TEST_ISSUER, clients_document

EVENT = "discharge-summary.ready"
TERMINAL = (ledger.SUCCEEDED, ledger.DEAD, ledger.EXPIRED)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


@dataclass
class Call:
    headers: dict
    body: str


class Receiver:
    """A webhook receiver answering from a script (status, headers, seconds to stall); records every call."""

    def __init__(self, *script: tuple):
        self.script = list(script) or [(200, {}, 0)]
        self.calls: list[Call] = []
        self.lock = threading.Lock()

    def __call__(self, request):
        with self.lock:
            self.calls.append(Call(dict(request.headers), request.get_data(as_text=True)))
            status, headers, stall = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if stall:
            time.sleep(stall)  # the receiver hangs (a slow server, not a clock): the delivery's timeout must end it
        return Response("ignored", status=status, headers=headers)


def answer(status: int, headers: dict | None = None, stall: float = 0) -> tuple:
    return (status, headers or {}, stall)


@pytest.fixture
def clock():
    # Wall time starts at the real time: receivers check a signature's timestamp against the system clock.
    return FakeClock(wall=time.time())


@pytest.fixture
def build(make_app, tmp_path, signing_key, clock):
    """An app whose trusted client subscribes ``hooks``; fast retries, loopback receivers allowed; on ``clock``."""

    def factory(hooks: list[dict], extra_clients: tuple = (), **overrides):
        document = clients_document(signing_key, ["http://127.0.0.1:*"])
        document["clients"][0]["webhooks"] = hooks
        document["clients"].extend(extra_clients)
        path = tmp_path / "webhook-clients.json"
        path.write_text(json.dumps(document))
        config = {
            "CDS_CLIENTS_FILE": str(path),
            "WEBHOOKS_ALLOW_PRIVATE": True,
            "PUBLIC_BASE_URL": LOCAL_BASE_URL,  # the switch works only with the service on this host
            "WEBHOOK_RETRY_SCHEDULE": "0.05,0.05,0.05",  # config reads it as text, as from the environment
            "WEBHOOK_TIMEOUT_S": 0.5,
            "CLOCK": clock,
        }
        app = make_app(**(config | overrides))
        init_app(app)
        return app

    return factory


def subscription(url: str, secret: str, **members) -> dict:
    return {"url": url, "secret": secret, "events": [EVENT], **members}


def job_id_for(url: str, event_id: str, iss: str = TEST_ISSUER) -> str:
    return f"webhook:{endpoint_id(iss, url)}:{event_id}"


def due_now(app) -> FakeClock:
    """The app's clock, brought up to the system clock: emit() and requeue stamp jobs with the system clock, so
    jobs made so far are due to the workers (a jump forward, never a wait)."""
    clock = app_clock(app)
    clock.advance(max(0.0, time.time() - clock.now()))
    return clock


def drive(app, job_id: str, rounds: int = 30) -> ledger.Job:
    """Run due delivery jobs until ``job_id`` ends, moving the clock 0.1 s between rounds (past a retry of the
    0.05 s schedule with its jitter); bounded."""
    worker = Worker(app, kinds=[KIND], lease_seconds=5)
    clock = due_now(app)
    for _ in range(rounds):
        worker.run_until_idle(max_jobs=20)
        job = ledger.get(app.extensions["db"], job_id)
        if job is not None and job.state in TERMINAL:
            return job
        clock.advance(0.1)
    return ledger.get(app.extensions["db"], job_id)


def thin(job_id: str = "job-1") -> dict:
    return {"job_id": job_id, "url": f"https://gateway.test/jobs/{job_id}"}


def test_retries_honour_retry_after_and_every_try_is_signed_with_the_same_id(build, httpserver):
    receiver = Receiver(answer(503, {"Retry-After": "1"}), answer(503, {"Retry-After": "1"}), answer(200))
    httpserver.expect_request("/hook", method="POST").respond_with_handler(receiver)
    secret, url = new_secret(), httpserver.url_for("/hook")
    app = build([subscription(url, secret)])

    assert emit(app, EVENT, "evt-retry", thin(), client_iss=TEST_ISSUER) == 1
    worker, clock = Worker(app, kinds=[KIND], lease_seconds=5), due_now(app)
    for tries in (1, 2):
        assert [o.state for o in worker.run_until_idle()] == [ledger.QUEUED]
        assert len(receiver.calls) == tries
        clock.advance(0.95)  # the receiver asked for 1 s (the schedule's 0.05 s would be due by now)
        assert worker.run_until_idle() == [] and len(receiver.calls) == tries
        clock.advance(0.1)
    assert [o.state for o in worker.run_until_idle()] == [ledger.SUCCEEDED]
    job = ledger.get(app.extensions["db"], job_id_for(url, "evt-retry"))

    assert job.state == ledger.SUCCEEDED
    assert job.result == {
        "endpoint_id": endpoint_id(TEST_ISSUER, url),
        "event_id": "evt-retry",
        "status": 200,
        "attempt": 3,
    }
    assert len(receiver.calls) == 3
    assert {call.headers["Webhook-Id"] for call in receiver.calls} == {"evt-retry"}
    assert len({call.body for call in receiver.calls}) == 1
    for call in receiver.calls:
        assert call.headers["Content-Type"] == "application/json"
        assert "gateway" in call.headers["User-Agent"]
        body = Webhook(secret).verify(call.body, call.headers)
        assert body["type"] == EVENT and body["data"] == thin()
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(receiver.calls[0].body.replace("job-1", "job-2"), receiver.calls[0].headers)


def test_410_disables_the_endpoint_and_later_events_dead_letter_without_a_request(build, httpserver):
    receiver = Receiver(answer(410), answer(200))
    httpserver.expect_request("/gone", method="POST").respond_with_handler(receiver)
    url = httpserver.url_for("/gone")
    app = build([subscription(url, new_secret())])
    engine = app.extensions["db"]

    emit(app, EVENT, "evt-a", thin(), client_iss=TEST_ISSUER)
    first = drive(app, job_id_for(url, "evt-a"))
    assert first.state == ledger.DEAD and first.attempts == 1
    assert "410" in first.last_error and "disabled" in first.last_error
    assert is_disabled(engine, endpoint_id(TEST_ISSUER, url))
    [listed] = endpoints(app)
    assert listed["disabled_at"] and "410" in listed["disabled_reason"] and "secret" not in listed

    emit(app, EVENT, "evt-b", thin("job-2"), client_iss=TEST_ISSUER)
    second = drive(app, job_id_for(url, "evt-b"))
    assert second.state == ledger.DEAD and "endpoint" in second.last_error and "disabled" in second.last_error
    assert len(receiver.calls) == 1

    # An operator re-enables the endpoint and requeues what was held back.
    assert enable(engine, endpoint_id(TEST_ISSUER, url))
    assert ledger.requeue(engine, second.id)
    assert drive(app, second.id).state == ledger.SUCCEEDED
    assert len(receiver.calls) == 2


def test_a_hung_receiver_times_out_and_the_delivery_is_retried(build, httpserver):
    receiver = Receiver(answer(200, stall=1.0), answer(204))
    httpserver.expect_request("/slow", method="POST").respond_with_handler(receiver)
    url = httpserver.url_for("/slow")
    app = build([subscription(url, new_secret())])

    emit(app, EVENT, "evt-slow", thin(), client_iss=TEST_ISSUER)
    job = drive(app, job_id_for(url, "evt-slow"))

    assert job.state == ledger.SUCCEEDED and job.result["status"] == 204 and job.result["attempt"] == 2
    assert "no answer within 0.5 s" in job.last_error  # the first try was cut at the timeout, not the 1 s stall


def test_attempts_end_with_the_schedule_and_the_job_dead_letters(build, httpserver):
    receiver = Receiver(answer(500))
    httpserver.expect_request("/down", method="POST").respond_with_handler(receiver)
    url = httpserver.url_for("/down")
    secret = new_secret()
    app = build([subscription(url, secret)])

    emit(app, EVENT, "evt-down", thin(), client_iss=TEST_ISSUER)
    job = drive(app, job_id_for(url, "evt-down"))

    assert job.state == ledger.DEAD and job.attempts == 4 == len(receiver.calls)
    assert "answered 500" in job.last_error
    assert secret not in job.last_error and "job-1" not in job.last_error and url not in job.last_error


def test_a_private_address_is_refused_when_not_allowed(build, httpserver):
    receiver = Receiver(answer(200))
    httpserver.expect_request("/private", method="POST").respond_with_handler(receiver)
    port = httpserver.port
    https_loopback, plain_http = f"https://127.0.0.1:{port}/private", f"http://localhost:{port}/private"
    app = build(
        [subscription(https_loopback, new_secret()), subscription(plain_http, new_secret())],
        WEBHOOKS_ALLOW_PRIVATE=False,
    )

    assert emit(app, EVENT, "evt-private", thin(), client_iss=TEST_ISSUER) == 2
    refused = drive(app, job_id_for(https_loopback, "evt-private"))
    not_https = drive(app, job_id_for(plain_http, "evt-private"))

    assert refused.state == ledger.DEAD and refused.attempts == 1
    assert "127.0.0.1, a loopback address" in refused.last_error and "WEBHOOKS_ALLOW_PRIVATE" in refused.last_error
    assert not_https.state == ledger.DEAD and "must use https" in not_https.last_error
    assert receiver.calls == [] and not [request for request, _ in httpserver.log if request.path == "/private"]


def test_a_receiver_holding_only_the_previous_secret_still_verifies(build, httpserver):
    receiver = Receiver(answer(200))
    httpserver.expect_request("/rotating", method="POST").respond_with_handler(receiver)
    url, new, old = httpserver.url_for("/rotating"), new_secret(), new_secret()
    app = build([subscription(url, new, previous_secrets=[old])])

    emit(app, EVENT, "evt-rotate", thin(), client_iss=TEST_ISSUER)
    assert drive(app, job_id_for(url, "evt-rotate")).state == ledger.SUCCEEDED

    [call] = receiver.calls
    assert len(call.headers["Webhook-Signature"].split(" ")) == 2
    Webhook(old).verify(call.body, call.headers)
    Webhook(new).verify(call.body, call.headers)


def test_emitting_the_same_event_twice_delivers_once(build, httpserver):
    receiver = Receiver(answer(200))
    httpserver.expect_request("/once", method="POST").respond_with_handler(receiver)
    url = httpserver.url_for("/once")
    app = build([subscription(url, new_secret())])

    assert emit(app, EVENT, "evt-once", thin(), client_iss=TEST_ISSUER) == 1
    assert emit(app, EVENT, "evt-once", thin(), client_iss=TEST_ISSUER) == 0
    assert drive(app, job_id_for(url, "evt-once")).state == ledger.SUCCEEDED
    assert emit(app, EVENT, "evt-once", thin(), client_iss=TEST_ISSUER) == 0
    Worker(app, kinds=[KIND]).run_until_idle()
    assert len(receiver.calls) == 1


def test_thin_payloads_carry_no_phi_and_full_subscribers_get_the_result(build, httpserver):
    thin_receiver, full_receiver = Receiver(answer(200)), Receiver(answer(200))
    httpserver.expect_request("/thin", method="POST").respond_with_handler(thin_receiver)
    httpserver.expect_request("/full", method="POST").respond_with_handler(full_receiver)
    thin_url, full_url = httpserver.url_for("/thin"), httpserver.url_for("/full")
    app = build([subscription(thin_url, new_secret()), subscription(full_url, new_secret(), payload="full")])
    phi = {"patient": {"name": "Jane Doe", "birthDate": "1950-01-01"}, "summary": "Discharged home on day 3."}

    assert emit(app, EVENT, "evt-payload", thin(), client_iss=TEST_ISSUER, full_data=phi) == 2
    drive(app, job_id_for(thin_url, "evt-payload"))
    drive(app, job_id_for(full_url, "evt-payload"))

    thin_body, full_body = json.loads(thin_receiver.calls[0].body), json.loads(full_receiver.calls[0].body)
    assert thin_body["data"] == thin()
    assert "Jane" not in thin_receiver.calls[0].body and "Discharged" not in thin_receiver.calls[0].body
    assert full_body["data"] == thin() | phi
    assert thin_body["timestamp"] == full_body["timestamp"]
    assert thin_receiver.calls[0].headers["Webhook-Id"] == full_receiver.calls[0].headers["Webhook-Id"]


def test_operator_alerts_go_to_subscribers_of_every_client(build, httpserver):
    receiver = Receiver(answer(200))
    httpserver.expect_request("/alerts", method="POST").respond_with_handler(receiver)
    url = httpserver.url_for("/alerts")
    alert = "jobs.dead-letter-alert"
    other = {
        "iss": "https://other.test",
        "jwks_url": "https://other.test/jwks",
        "webhooks": [{"url": url, "secret": new_secret(), "events": [alert]}],
    }
    app = build([{"url": url, "secret": new_secret(), "events": [alert, EVENT]}], extra_clients=(other,))

    assert emit(app, alert, "dlq-1", {"dead": 10}, client_iss=None) == 2
    assert emit(app, alert, "dlq-2", {"dead": 20}, client_iss="https://other.test") == 1
    assert emit(app, EVENT, "evt-x", thin(), client_iss="https://other.test") == 0


def test_an_expired_delivery_is_never_sent(build, httpserver):
    receiver = Receiver(answer(200))
    httpserver.expect_request("/late", method="POST").respond_with_handler(receiver)
    url = httpserver.url_for("/late")
    app = build([subscription(url, new_secret())])

    emit(app, EVENT, "evt-late", thin(), client_iss=TEST_ISSUER, expires_in=60)
    due_now(app).advance(61)  # a minute later, the worker's housekeeping sweeps it away first
    assert drive(app, job_id_for(url, "evt-late"), rounds=1).state == ledger.EXPIRED
    assert receiver.calls == []


def test_the_handler_itself_refuses_a_job_past_its_expiry(build, httpserver):
    receiver = Receiver(answer(200))
    httpserver.expect_request("/late", method="POST").respond_with_handler(receiver)
    url = httpserver.url_for("/late")
    app = build([subscription(url, new_secret())])
    emit(app, EVENT, "evt-stale", thin(), client_iss=TEST_ISSUER, expires_in=60)
    claimed = ledger.claim(app.extensions["db"], "test-worker", kinds=[KIND])

    due_now(app).advance(60)  # on the app's clock, which the handler reads: the expiry has come
    with app.app_context(), pytest.raises(PermanentFailure, match="expired"):
        deliver(JobContext(app, claimed))
    assert receiver.calls == []
