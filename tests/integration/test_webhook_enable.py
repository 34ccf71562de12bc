"""``jobs webhooks list`` and ``jobs webhooks enable URL``: an endpoint that answered 410 Gone is re-enabled by an
operator, and with --requeue the events it missed are delivered."""

from __future__ import annotations

import base64
import json
import os

import pytest

from app.jobs import ledger
from app.jobs.worker import Worker
from app.webhooks import emit, is_disabled
from app.webhooks.delivery import KIND
from app.webhooks.endpoints import endpoint_id
from tests.conftest import LOCAL_BASE_URL
from tests.support.http_servers import WebhookReceiver
from tests.support.tokens import TEST_ISSUER, clients_document

EVENT = "discharge-summary.ready"


@pytest.fixture
def receiver():
    answers = {"status": 410}
    with WebhookReceiver(lambda _: answers["status"]) as server:
        server.answers = answers
        yield server


@pytest.fixture
def app(make_app, tmp_path, signing_key, receiver):
    document = clients_document(signing_key, ["http://127.0.0.1:*"])
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    document["clients"][0]["webhooks"] = [{"url": receiver.url + "/gone", "secret": secret, "events": [EVENT]}]
    path = tmp_path / "clients-enable.json"
    path.write_text(json.dumps(document))
    return make_app(CDS_CLIENTS_FILE=str(path), WEBHOOKS_ALLOW_PRIVATE=True, PUBLIC_BASE_URL=LOCAL_BASE_URL)


def cli(app, *args):
    return app.test_cli_runner().invoke(args=["jobs", "webhooks", *args])


def deliver(app) -> list[str]:
    return [outcome.state for outcome in Worker(app, kinds=[KIND]).run_until_idle()]


def test_an_endpoint_disabled_by_410_is_listed_re_enabled_and_its_missed_events_requeued(app, receiver):
    url = receiver.url + "/gone"
    endpoint = endpoint_id(TEST_ISSUER, url)
    emit(app, EVENT, "event-1", {"jobId": "j-1"}, client_iss=TEST_ISSUER)
    assert deliver(app) == ["dead"]  # 410 Gone: disabled
    emit(app, EVENT, "event-2", {"jobId": "j-2"}, client_iss=TEST_ISSUER)
    assert deliver(app) == ["dead"]  # disabled: dead-lettered without a request
    assert len(receiver.received) == 1 and is_disabled(app.extensions["db"], endpoint)

    listed = cli(app, "list", "--json")
    assert listed.exit_code == 0, listed.output
    (entry,) = [json.loads(line) for line in listed.output.splitlines()]
    assert (entry["id"], entry["url"], entry["disabled_reason"]) == (endpoint, url, "the receiver answered 410 Gone")

    receiver.answers["status"] = 200
    enabled = cli(app, "enable", url, "--requeue")
    assert enabled.exit_code == 0, enabled.output
    assert f"endpoint {endpoint} ({TEST_ISSUER}) enabled" in enabled.output
    assert "2 dead deliveries requeued" in enabled.output
    assert not is_disabled(app.extensions["db"], endpoint)
    assert sorted(deliver(app)) == ["succeeded", "succeeded"]
    assert [json.loads(r.body)["data"]["jobId"] for r in receiver.received[1:]] == ["j-1", "j-2"]
    assert json.loads(cli(app, "list", "--json").output)["disabled_at"] is None


def test_enabling_an_endpoint_that_is_not_disabled_says_so(app, receiver):
    result = cli(app, "enable", receiver.url + "/gone")
    assert result.exit_code == 0, result.output
    assert "was not disabled" in result.output


def test_without_requeue_dead_deliveries_stay_dead(app, receiver):
    emit(app, EVENT, "event-1", {"jobId": "j-1"}, client_iss=TEST_ISSUER)
    deliver(app)
    assert cli(app, "enable", receiver.url + "/gone").exit_code == 0
    assert ledger.counts(app.extensions["db"])[ledger.DEAD] == 1


@pytest.mark.parametrize("args", [["https://nowhere.example/hooks"], ["{url}", "--client", "https://other.example"]])
def test_an_unknown_url_is_a_clear_error(app, receiver, args):
    result = cli(app, "enable", *(a.format(url=receiver.url + "/gone") for a in args))
    assert result.exit_code != 0
    assert "no webhook endpoint has the URL" in result.output
    assert "gateway jobs webhooks list" in result.output
