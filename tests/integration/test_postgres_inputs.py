"""On a real PostgreSQL server, where a NUL cannot be stored or even compared: no input is a 5xx, one bad row
never costs other clinicians their results, and a card never links to a result that does not exist."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from app import results
from app.db import make_engine, upgrade
from tests.conftest import PUBLIC_BASE_URL, require
from tests.support.assertions import wait_for
from tests.support.databases import ADMIN_URL, postgres_database, postgres_unavailable
from tests.support.fuzzing import (
    FIXTURE,
    assert_answered,
    assert_html_answered,
    assert_operation_outcome,
    encode,
    fuzz_settings,
    json_values,
    mutated_hooks,
    odd_contexts,
    texts,
)

SERVICE = "/cds-services/cardiovascular-risk"
DISCHARGE = "/cds-services/discharge-summary"
ADMIN_TOKEN = "admin-token-for-postgres"
NUL = "\x00"


@pytest.fixture(scope="module")
def shared_database():
    """One database for the tests that only add rows (creating and migrating one costs about 0.3 s)."""
    require(postgres_unavailable())
    with postgres_database() as url:
        yield url


@pytest.fixture
def database_url():
    """A database of this test's own, for tests that drop it or change its schema."""
    require(postgres_unavailable())
    with postgres_database() as url:
        yield url


def _app(make_app, url):
    app = make_app(DATABASE_URL=url, ADMIN_TOKEN=ADMIN_TOKEN)
    yield app
    app.extensions["results_writer"].flush()
    app.extensions["db"].dispose()


@pytest.fixture
def app(make_app, shared_database):
    yield from _app(make_app, shared_database)


@pytest.fixture
def own_app(make_app, database_url):
    yield from _app(make_app, database_url)


@pytest.fixture
def post(app, signing_key):
    return _poster(app, signing_key)


def _poster(app, signing_key):
    client = app.test_client()

    def send(path: str, body):
        token = signing_key.token(PUBLIC_BASE_URL + path)
        data = body if isinstance(body, bytes) else encode(body)
        return client.post(
            path, data=data, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        )

    return send


def explanation_link(response) -> str | None:
    """The appContext of the card's explanation link, or None when the card has none."""
    links = [link for card in response.get_json()["cards"] for link in card.get("links", ()) if link["type"] == "smart"]
    return links[0]["appContext"] if links else None


def not_stored(reason: str) -> float:
    return REGISTRY.get_sample_value("gateway_results_not_stored_total", {"reason": reason}) or 0.0


def with_context(**changes) -> dict:
    body = copy.deepcopy(FIXTURE)
    body["context"].update(changes)
    return body


# --- a NUL anywhere is a 400 naming the field, not a 500 (issue 9, item 4) -------------------------------------


@pytest.mark.parametrize(
    ("body", "expression"),
    [
        (with_context(patientId=f"gw-test{NUL}patient-1"), "context.patientId"),
        (with_context(encounterId=f"enc{NUL}1"), "context.encounterId"),
        (with_context(userId=f"Practitioner/gw{NUL}"), "context.userId"),
        ({**FIXTURE, "hookInstance": f"d1577c69{NUL}"}, "hookInstance"),
        ({**FIXTURE, "fhirServer": f"http://localhost:8081/fhir{NUL}"}, "fhirServer"),
    ],
    ids=["patientId", "encounterId", "userId", "hookInstance", "fhirServer"],
)
def test_a_nul_in_a_hook_id_is_a_400_naming_it(post, body, expression):
    assert assert_operation_outcome(post(SERVICE, body))["expression"] == [expression]


def test_a_nul_in_the_discharge_encounter_id_is_a_400_naming_it(post):
    body = with_context(encounterId=f"enc{NUL}1")
    body["hook"] = "encounter-discharge"
    assert assert_operation_outcome(post(DISCHARGE, body))["expression"] == ["context.encounterId"]


ENTRY = {
    "card": "4e0a3a1e-3283-4575-ab82-028d55fe2719",
    "outcome": "accepted",
    "acceptedSuggestions": [{"id": "e56e1945"}],
    "overrideReason": {"reason": {"code": "d7ecf885", "system": "urn:example"}, "userComment": "ok"},
    "outcomeTimestamp": "2021-12-11T10:05:31Z",
}


@pytest.mark.parametrize(
    ("change", "expression"),
    [
        ({"card": f"4e0a{NUL}"}, "feedback[0].card"),
        ({"card": "c" * 201}, "feedback[0].card"),
        ({"acceptedSuggestions": [{"id": f"s{NUL}"}]}, "feedback[0].acceptedSuggestions[0].id"),
        (
            {"overrideReason": {"reason": {"code": f"d{NUL}", "system": "urn:x"}}},
            "feedback[0].overrideReason.reason.code",
        ),
        ({"overrideReason": {"userComment": f"no{NUL}"}}, "feedback[0].overrideReason.userComment"),
        ({"outcomeTimestamp": "0001-01-01T00:00:00+14:00"}, "feedback[0].outcomeTimestamp"),
        ({"outcomeTimestamp": "2021-W49-6T10:05:31Z"}, "feedback[0].outcomeTimestamp"),
        ({"outcomeTimestamp": "20211211T100531Z"}, "feedback[0].outcomeTimestamp"),
    ],
    ids=["card-nul", "card-long", "suggestion", "code", "comment", "year-1", "week-date", "basic-format"],
)
def test_feedback_that_postgresql_could_not_store_is_a_400_naming_the_field(post, change, expression):
    response = post(SERVICE + "/feedback", {"feedback": [{**ENTRY, **change}]})
    assert assert_operation_outcome(response)["expression"] == [expression]


def test_feedback_with_a_comment_on_several_lines_is_stored(post, app):
    comment = "Patient declined.\n\tWill discuss at next visit."
    card = "card-with-a-long-comment"
    entry = {**ENTRY, "card": card, "overrideReason": {"userComment": comment}}
    assert post(SERVICE + "/feedback", {"feedback": [entry]}).status_code == 200
    query = sa.text("SELECT override_reason FROM feedback WHERE card_uuid = :card")
    with app.extensions["db"].connect() as conn:
        (stored,) = conn.execute(query, {"card": card}).scalars()
    assert stored == {"userComment": comment}


@pytest.mark.parametrize(
    "path", ["/jobs/%00", "/admin/jobs/%00", "/admin/jobs/a%00b/requeue", "/admin/jobs/dead?kind=%00"]
)
def test_a_nul_in_a_job_id_or_kind_is_a_4xx(app, signing_key, path):
    method = "POST" if path.endswith("requeue") else "GET"
    token = signing_key.token(PUBLIC_BASE_URL + "/jobs/\x00") if path.startswith("/jobs") else ADMIN_TOKEN
    response = app.test_client().open(path, method=method, headers={"Authorization": f"Bearer {token}"})
    assert assert_operation_outcome(response) and response.status_code in (400, 404)


def test_a_nul_in_a_launchs_app_context_is_a_404_page(app):
    store = app.extensions["smart_app"].store
    token = {"access_token": "at", "iss": "http://127.0.0.1:1/fhir", "appContext": f"x{NUL}" * 11}
    session = store.create({"token": {**token, "need_patient_banner": False}, "csrf": "c"})
    client = app.test_client()
    client.set_cookie("smart_session", session.token, path="/smart")
    response = client.get("/smart/app")
    assert_html_answered(response)
    assert response.status_code == 404


# --- fuzzing on PostgreSQL: every card's link loads ------------------------------------------------------------


@fuzz_settings(300)
@given(body=st.one_of(odd_contexts(), mutated_hooks()))
def test_fuzzed_hooks_on_postgresql_are_never_a_5xx_and_every_link_loads(app, post, body):
    response = post(SERVICE, body)
    assert_answered(response)
    if response.status_code == 200 and (result_id := explanation_link(response)):
        app.extensions["results_writer"].flush()
        assert results.load(app.extensions["db"], result_id) is not None


@fuzz_settings(200)
@given(
    change=st.dictionaries(
        st.sampled_from(["card", "outcome", "acceptedSuggestions", "overrideReason", "outcomeTimestamp", "x"]),
        st.one_of(texts, json_values),
        max_size=2,
    )
)
def test_fuzzed_feedback_on_postgresql_is_never_a_5xx(post, change):
    assert_answered(post(SERVICE + "/feedback", {"feedback": [{**ENTRY, **change}]}))


@fuzz_settings(150)
@given(job_id=texts, kind=st.one_of(st.none(), texts))
def test_fuzzed_job_ids_on_postgresql_are_never_a_5xx(app, signing_key, job_id, kind):
    client = app.test_client()
    segment = quote(job_id.encode("utf-8", "surrogatepass"), safe="")
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for path in (f"/admin/jobs/{segment}", f"/jobs/{segment}"):
        response = client.get(path, headers=admin)
        if response.status_code != 308:  # Werkzeug merges the slashes of a decoded %2F
            assert_answered(response)
    if kind is not None:
        query = {"kind": kind.encode("utf-8", "replace").decode()}
        assert_answered(client.get("/admin/jobs/dead", query_string=query, headers=admin))


# --- one bad row never costs other clinicians their results (issue 9, item 5) ----------------------------------


class TableLock:
    """Holds ai_results locked in another session, so the writer's rows queue up and go in one big batch."""

    def __init__(self, url: str):
        self.conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))

    def __enter__(self):
        self.conn.execute("LOCK TABLE ai_results IN ACCESS EXCLUSIVE MODE")
        return self

    def __exit__(self, *exc):
        self.conn.rollback()
        self.conn.close()


def test_one_poisoned_hook_among_200_costs_no_other_card_its_result(app, post, shared_database):
    bodies = [with_context() for _ in range(200)]
    bodies[97] = with_context(patientId=f"gw-test{NUL}patient-1")  # the NUL that used to poison its batch
    writer = app.extensions["results_writer"]
    with TableLock(shared_database):
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda body: post(SERVICE, body), bodies))
        assert writer._queue.qsize() > 100  # the rows wait in one queue: they will share a batch
    writer.flush(timeout=30)

    links = {i: explanation_link(r) for i, r in enumerate(responses) if r.status_code == 200}
    assert responses[97].status_code == 400 or links.get(97) is None or results.load(app.extensions["db"], links[97])
    others = {i: link for i, link in links.items() if i != 97}
    assert len(others) == 199 and all(others.values())
    missing = [i for i, link in others.items() if results.load(app.extensions["db"], link) is None]
    assert missing == []


def test_a_row_the_database_refuses_is_written_alone_and_reported(database_url, caplog):
    engine = make_engine(database_url)
    with engine.begin() as conn:  # a refusal we did not foresee: here, a constraint only the database knows
        conn.execute(sa.text("ALTER TABLE ai_results ADD CONSTRAINT no_poison CHECK (patient_id <> 'poisoned')"))
    writer = results.ResultWriter(engine, batch=500)
    before = not_stored("rejected")
    with TableLock(database_url):
        ids = [
            writer.submit(
                "cardiovascular-risk",
                {"n": i},
                client_iss=None,
                fhir_server=None,
                patient_id="poisoned" if i == 120 else f"patient-{i}",
                ttl_seconds=600,
            )
            for i in range(200)
        ]
    writer.flush(timeout=30)

    stored = [i for i, result_id in enumerate(ids) if results.load(engine, result_id) is not None]
    assert stored == [i for i in range(200) if i != 120]
    assert not_stored("rejected") == before + 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.name == "app.results"]
    assert len(errors) == 1 and "poisoned" not in errors[0] and "patient" not in errors[0]
    engine.dispose()


def test_rows_that_meet_a_held_lock_are_written_once_it_is_free_and_links_pause_meanwhile(shared_database):
    engine = sa.create_engine(shared_database, connect_args={"options": "-c lock_timeout=50"})
    writer = results.ResultWriter(engine)
    before = not_stored("rejected")

    def submit(i: int) -> str | None:
        return writer.submit(
            "cardiovascular-risk", {"n": i}, client_iss=None, fhir_server=None, patient_id="p", ttl_seconds=60
        )

    with TableLock(shared_database):
        ids = [submit(i) for i in range(20)]
        wait_for(lambda: not writer.reachable, "timed out waiting for the writer to meet the lock", timeout=20)
        assert submit(20) is None  # no link while the writer cannot write
    writer.flush(timeout=30)

    assert all(results.load(engine, result_id) is not None for result_id in ids)
    assert not_stored("rejected") == before and writer.reachable
    engine.dispose()


# --- while the database cannot be reached, cards carry no link ---------------------------------------------------


def _database_name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def drop_database(url: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{_database_name(url)}" WITH (FORCE)')


def recreate_database(url: str) -> None:
    """The database back, migrated, all at once (made under another name, then renamed)."""
    name = _database_name(url)
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}_new"')
    upgrade(f"{url}_new")
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}_new" RENAME TO "{name}"')


def test_no_card_links_to_a_result_while_the_database_is_down_and_links_return_with_it(
    own_app, signing_key, database_url
):
    app = own_app
    post = _poster(app, signing_key)
    writer = app.extensions["results_writer"]
    assert explanation_link(post(SERVICE, FIXTURE)) is not None
    assert writer.flush()
    before = not_stored("database-unreachable")

    drop_database(database_url)
    first = post(SERVICE, FIXTURE)  # answered before the writer knows: its row waits for the database
    wait_for(lambda: not writer.reachable, "timed out waiting for the writer to notice the outage", timeout=20)
    during = post(SERVICE, FIXTURE)

    assert first.status_code == during.status_code == 200
    assert explanation_link(during) is None
    assert not_stored("database-unreachable") == before + 1

    recreate_database(database_url)
    wait_for(lambda: writer.reachable, "timed out waiting for the writer to reach the database again", timeout=20)
    assert writer.flush()
    assert results.load(app.extensions["db"], explanation_link(first)) is not None  # waited out the outage
    after = explanation_link(post(SERVICE, FIXTURE))
    assert after is not None and writer.flush()
    assert results.load(app.extensions["db"], after) is not None


def test_rows_waiting_out_an_outage_longer_than_their_life_are_dropped_and_reported(database_url):
    engine = make_engine(database_url)
    writer = results.ResultWriter(engine)
    writer.RETRY_MAX_S = 0.2
    before = not_stored("expired")
    drop_database(database_url)
    result_id = writer.submit(
        "cardiovascular-risk", {}, client_iss=None, fhir_server=None, patient_id="p", ttl_seconds=0.5
    )
    assert result_id is not None
    assert writer.flush(timeout=10)  # dropped once expired, not retried for ever
    assert not_stored("expired") == before + 1
    assert not writer.reachable
    recreate_database(database_url)
    wait_for(lambda: writer.reachable, "timed out waiting for the writer to reach the database again", timeout=20)
    engine.dispose()
