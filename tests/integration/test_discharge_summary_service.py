"""The discharge-summary service's edges, in process: what the card says when no draft can be made, the AI
down until the job dead-letters, the dead letter alert, and conditional create on a real FHIR server."""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import uuid

import pytest

from app.fhir.client import Client, pooled_session
from app.jobs import ledger
from app.jobs.monitor import DLQ_ALERT_EVENT, check_dead_letters
from app.jobs.worker import Worker
from tests.conftest import LOCAL_BASE_URL
from tests.support.http_servers import WebhookReceiver
from tests.support.processes import free_port
from tests.support.tokens import clients_document

SERVICE = "/cds-services/discharge-summary"


class LowestJitter(random.Random):
    """A generator whose every draw is the bottom of its range: full-jitter backoff waits 0 s."""

    def random(self) -> float:
        return 0.0


def hook(app, signing_key, fhir_server: str | None, encounter: str = "enc-1") -> dict:
    body = {
        "hookInstance": str(uuid.uuid4()),
        "hook": "encounter-discharge",
        "context": {"userId": "Practitioner/dr-1", "patientId": "pat-1", "encounterId": encounter},
    }
    if fhir_server:
        body["fhirServer"] = fhir_server
    token = signing_key.token(app.config["PUBLIC_BASE_URL"] + SERVICE)
    response = app.test_client().post(SERVICE, json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["cards"][0]


def clients(tmp_path, signing_key, **entry) -> str:
    document = clients_document(signing_key, ["http://127.0.0.1:*"])
    document["clients"][0].update(entry)
    path = tmp_path / f"clients-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(document))
    return str(path)


def test_no_fhir_server_means_no_job_and_a_card_that_says_why(make_app, signing_key):
    app = make_app(PUBLIC_BASE_URL=LOCAL_BASE_URL, FHIR_ALLOW_ANONYMOUS=True)
    card = hook(app, signing_key, None)
    assert card["summary"] == "No AI draft discharge summary for this encounter"
    assert "sent no FHIR server" in card["detail"]
    assert ledger.counts(app.extensions["db"])[ledger.QUEUED] == 0


def test_without_write_back_credentials_nothing_is_queued(make_app, signing_key):
    card = hook(make_app(), signing_key, "http://127.0.0.1:9/fhir/R4")
    assert "no SMART Backend Services credentials" in card["detail"]
    assert sum(ledger.counts(make_app().extensions["db"]).values()) == 0


def test_a_fhir_server_off_the_allowlist_is_refused(make_app, signing_key):
    card = hook(
        make_app(PUBLIC_BASE_URL=LOCAL_BASE_URL, FHIR_ALLOW_ANONYMOUS=True),
        signing_key,
        "https://elsewhere.example/fhir",
    )
    assert "not configured for the gateway" in card["detail"]


def test_the_ai_down_is_retried_then_dead_lettered_and_the_card_says_so(make_app, signing_key, fhir_server):
    app = make_app(
        PUBLIC_BASE_URL=LOCAL_BASE_URL,
        FHIR_ALLOW_ANONYMOUS=True,
        LLM_URL=f"http://127.0.0.1:{free_port()}",
        JOB_MAX_ATTEMPTS=3,
    )
    encounter = f"e-{uuid.uuid4().hex[:8]}"
    fhir_server.post_bundle(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "resource": {
                        "resourceType": "Encounter",
                        "id": encounter,
                        "status": "finished",
                        "class": {"code": "IMP"},
                        "subject": {"reference": "Patient/pat-1"},
                    },
                    "request": {"method": "PUT", "url": f"Encounter/{encounter}"},
                }
            ],
        }
    )
    first = hook(app, signing_key, fhir_server.base_url, encounter)
    assert first["summary"] == "A draft discharge summary is being prepared"
    # The job's own backoff, with every jitter draw at its floor (0 s): the retries are due at once.
    states = [outcome.state for outcome in Worker(app, rng=LowestJitter()).run_until_idle()]
    assert states == ["queued", "queued", "dead"]
    dead = ledger.find(app.extensions["db"], ledger.DEAD)[0]
    assert "ModelUnavailable" in dead.last_error
    again = hook(app, signing_key, fhir_server.base_url, encounter)
    assert again["summary"] == "The draft discharge summary could not be prepared"
    assert again["indicator"] == "warning" and "as usual" in again["detail"]


def test_the_dead_letter_alert_logs_and_tells_subscribers_once(make_app, signing_key, tmp_path, caplog):
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    with WebhookReceiver() as receiver:
        path = clients(
            tmp_path,
            signing_key,
            webhooks=[{"url": receiver.url + "/ops", "secret": secret, "events": [DLQ_ALERT_EVENT]}],
        )
        app = make_app(
            CDS_CLIENTS_FILE=path, DLQ_ALERT_THRESHOLD=2, WEBHOOKS_ALLOW_PRIVATE=True, PUBLIC_BASE_URL=LOCAL_BASE_URL
        )
        engine = app.extensions["db"]
        ledger.enqueue(engine, "doomed-1", "jobs.canary", {}, max_attempts=1)
        job = ledger.claim(engine, "w")
        ledger.fail(engine, job, "Boom: here", permanent=True)
        assert check_dead_letters(app) is None  # one dead job: under the threshold
        ledger.enqueue(engine, "doomed-2", "jobs.canary", {}, max_attempts=1)
        ledger.fail(engine, ledger.claim(engine, "w"), "Boom: here", permanent=True)
        with caplog.at_level(logging.ERROR):
            assert check_dead_letters(app) == 1
            assert check_dead_letters(app) == 1  # a second worker checking: no second webhook
        assert "dead letter queue holds 2 jobs" in caplog.text
        Worker(app).run_until_idle()
        assert len(receiver.received) == 1
        event = json.loads(receiver.received[0].body)
        assert event["type"] == DLQ_ALERT_EVENT and event["data"]["dead"] == 2


def test_conditional_create_writes_once(fhir_server):
    client = Client(fhir_server.base_url, None, pooled_session(), timeout=5)
    value = uuid.uuid4().hex
    resource = {
        "resourceType": "DocumentReference",
        "status": "current",
        "identifier": [{"system": "http://gateway.test/jobs", "value": value}],
        "content": [{"attachment": {"contentType": "text/plain", "data": base64.b64encode(b"draft").decode()}}],
    }
    condition = f"identifier=http%3A%2F%2Fgateway.test%2Fjobs%7C{value}"
    first, created = client.create(resource, if_none_exist=condition)
    second, created_again = client.create(resource, if_none_exist=condition)
    assert (created, created_again) == (True, False)
    assert first["id"] == second["id"]
    found = client.get(f"DocumentReference?{condition}")
    assert found["total"] == 1


@pytest.mark.parametrize("status", [400, 500])
def test_a_refused_create_is_an_error_not_a_silent_success(make_httpserver, status):
    make_httpserver.expect_request("/fhir/DocumentReference", method="POST").respond_with_data("no", status=status)
    client = Client(make_httpserver.url_for("/fhir"), "t", pooled_session(), timeout=2)
    from app.fhir.client import FhirError

    with pytest.raises(FhirError, match=str(status)):
        client.create({"resourceType": "DocumentReference"}, if_none_exist="identifier=x|y")
    make_httpserver.clear()


def test_ids_that_are_not_fhir_ids_are_refused_and_make_no_job(make_app, signing_key):
    app = make_app(PUBLIC_BASE_URL=LOCAL_BASE_URL, FHIR_ALLOW_ANONYMOUS=True)
    body = {
        "hookInstance": str(uuid.uuid4()),
        "hook": "encounter-discharge",
        "fhirServer": "http://127.0.0.1:9/fhir/R4",
        "context": {"userId": "Practitioner/dr-1", "patientId": "pat-1", "encounterId": "../../admin"},
    }
    token = signing_key.token(LOCAL_BASE_URL + SERVICE)
    response = app.test_client().post(SERVICE, json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 400
    assert response.get_json()["issue"][0]["expression"] == ["context.encounterId"]
    assert sum(ledger.counts(app.extensions["db"]).values()) == 0
