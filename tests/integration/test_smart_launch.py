"""The SMART EHR launch end to end: the gateway (Flask test client) and the EHR double (authlib's authorization
server on a real port, in front of the real FHIR test server), with each browser hop followed by hand."""

from __future__ import annotations

import html
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import sqlalchemy as sa
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from app.smart.app_routes import CONTENT_SECURITY_POLICY
from app.smart.launch import SCOPE
from tests.conftest import PUBLIC_BASE_URL
from tests.support.clock import FakeClock
from tests.support.processes import free_port
from tests.support.smart_ehr import SmartEhr
from tests.support.tokens import clients_document

PATIENT_ID = "smart-launch-patient"
OTHER_PATIENT_ID = "smart-launch-other-patient"
LAUNCH_URL = PUBLIC_BASE_URL + "/smart/launch"
COOKIE = "smart_session"
# A risk result made before the seeded cholesterol value, so the page's live check finds it as newer.
RISK_DATA = {
    "risk_text": "12.3 %",
    "category": "intermediate",
    "made_at": "2026-10-01T00:00:00Z",
    "loinc": {"total_cholesterol": ["2093-3"]},
}


@dataclass
class Page:
    url: str
    status: int
    headers: dict[str, str]
    text: str
    set_cookies: list[str]

    @property
    def location(self) -> str | None:
        return self.headers.get("Location")


class Browser:
    """One browser: the gateway through Flask's test client (its own cookie jar), the EHR over HTTP. Redirects
    are followed by hand so every URL the browser visits is recorded."""

    def __init__(self, app):
        self.client = app.test_client()
        self.http = requests.Session()
        self.http.trust_env = False
        self.visited: list[str] = []

    def request(self, method: str, url: str, data: dict | None = None) -> Page:
        self.visited.append(url)
        if url.startswith("/"):
            url = PUBLIC_BASE_URL + url
        if url.startswith(PUBLIC_BASE_URL):
            parts = urlsplit(url)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            response = self.client.open(path, method=method, data=data, base_url=PUBLIC_BASE_URL)
            return Page(
                url,
                response.status_code,
                dict(response.headers),
                response.get_data(as_text=True),
                response.headers.getlist("Set-Cookie"),
            )
        response = self.http.request(method, url, data=data, allow_redirects=False, timeout=15)
        return Page(url, response.status_code, dict(response.headers), response.text, [])

    def get(self, url: str) -> Page:
        return self.request("GET", url)

    def follow(self, url: str, *, stop_at: str | None = None, hops: int = 10) -> Page:
        """GET ``url`` and follow redirects; stop before visiting a URL that starts with ``stop_at``."""
        page = self.get(url)
        for _ in range(hops):
            if page.status not in (301, 302, 303, 307) or not page.location:
                return page
            nxt = page.location
            if nxt.startswith("/") and not page.url.startswith(PUBLIC_BASE_URL) and not page.url.startswith("/"):
                parts = urlsplit(page.url)
                nxt = f"{parts.scheme}://{parts.netloc}{nxt}"
            if stop_at and nxt.startswith(stop_at):
                page.headers["X-Stopped-Before"] = nxt
                return page
            page = self.get(nxt)
        raise AssertionError("too many redirects")

    def cookie(self) -> str | None:
        cookie = self.client.get_cookie(COOKIE, domain="gateway.test", path="/smart")
        return cookie.value if cookie else None


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seeded(fhir_server):
    """A patient with a recent cholesterol value on the real FHIR server."""
    entries = []
    for pid, family in ((PATIENT_ID, "Launch"), (OTHER_PATIENT_ID, "Other")):
        entries.append(
            {
                "resource": {
                    "resourceType": "Patient",
                    "id": pid,
                    "name": [{"family": family, "given": ["Smart"]}],
                    "gender": "female",
                    "birthDate": "1960-04-02",
                },
                "request": {"method": "PUT", "url": f"Patient/{pid}"},
            }
        )
    entries.append(
        {
            "resource": {
                "resourceType": "Observation",
                "id": "smart-launch-chol",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "2093-3"}]},
                "subject": {"reference": f"Patient/{PATIENT_ID}"},
                "effectiveDateTime": "2026-11-01T09:00:00Z",
                "valueQuantity": {"value": 213, "unit": "mg/dL"},
            },
            "request": {"method": "PUT", "url": "Observation/smart-launch-chol"},
        }
    )
    fhir_server.post_bundle({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    return fhir_server


@pytest.fixture
def gateway(make_app, tmp_path, signing_key, ehr):
    """A gateway whose only trusted FHIR server is the EHR double's."""
    clients = tmp_path / "smart-clients.json"
    clients.write_text(json.dumps(clients_document(signing_key, [ehr.fhir_base])))
    app = make_app(CDS_CLIENTS_FILE=str(clients))
    return app


@pytest.fixture
def clock():
    # Wall time starts at the real time: the EHR double stamps its id_tokens (iat, exp) with the system clock.
    return FakeClock(wall=time.time())


@pytest.fixture
def clocked_gateway(make_app, tmp_path, signing_key, ehr, clock):
    """The gateway on ``clock``: token refresh, id_token times and session lifetimes move only when a test says."""
    clients = tmp_path / "smart-clients.json"
    clients.write_text(json.dumps(clients_document(signing_key, [ehr.fhir_base])))
    return make_app(CDS_CLIENTS_FILE=str(clients), CLOCK=clock)


@pytest.fixture
def result_id(gateway):
    return store_result(gateway, patient=PATIENT_ID)


def store_result(
    app, *, patient: str, kind: str = "cardiovascular-risk", data: dict | None = None, age_s: float = 0
) -> str:
    """A stored result for the page (``age_s`` past its one-hour lifetime makes it expired)."""
    from app import results

    return results.save(
        app.extensions["db"],
        kind,
        data if data is not None else RISK_DATA,
        client_iss="https://ehr.test",
        fhir_server=None,
        patient_id=patient,
        ttl_seconds=3600,
        now=datetime.now(UTC) - timedelta(seconds=age_s),
    )


@pytest.fixture
def rendered(monkeypatch):
    """Every render_result call's arguments, so tests can see the LaunchContext the page was given."""
    from app.smart import pages

    calls: list[dict] = []
    real = pages.render_result

    def spy(result, context, *, csrf_token=""):
        page = real(result, context, csrf_token=csrf_token)
        calls.append({"result": result, "context": context, "csrf_token": csrf_token, "page": page})
        return page

    monkeypatch.setattr(pages, "render_result", spy)
    return calls


# -- helpers ---------------------------------------------------------------------------------


def launch_to_app(browser: Browser, ehr: SmartEhr, app_context: str, patient: str = PATIENT_ID) -> Page:
    """The clinician clicks the card's link: EHR launch -> authorize (auto-allowed) -> callback -> /smart/app."""
    return browser.follow(ehr.launch_url(LAUNCH_URL, patient, app_context))


def callback_url(browser: Browser, ehr: SmartEhr, app_context: str) -> str:
    """Run a launch up to the EHR's redirect back, and return the callback URL without visiting it."""
    page = browser.follow(
        ehr.launch_url(LAUNCH_URL, PATIENT_ID, app_context), stop_at=PUBLIC_BASE_URL + "/smart/callback"
    )
    return page.headers["X-Stopped-Before"]


def session_state(app, browser: Browser) -> dict:
    return app.extensions["smart_app"].store.load(browser.cookie()).state


def session_rows(app) -> int:
    with app.extensions["db"].connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM smart_sessions")).scalar_one()


def launch_cookies(browser: Browser) -> list:
    return [c for c in browser.client._cookies.values() if c.key.startswith("smart_launch_")]


def gateway_trusting(make_app, tmp_path, signing_key, fhir_servers: list[str], **config):
    clients = tmp_path / "other-clients.json"
    clients.write_text(json.dumps(clients_document(signing_key, fhir_servers)))
    return make_app(CDS_CLIENTS_FILE=str(clients), **config)


# -- tests -----------------------------------------------------------------------------------


def test_launch_reaches_the_page_with_tokens_kept_server_side(gateway, ehr, result_id, rendered):
    browser = Browser(gateway)
    page = launch_to_app(browser, ehr, result_id)

    assert page.status == 200, page.text
    assert page.url == PUBLIC_BASE_URL + "/smart/app"
    assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert page.headers["Cache-Control"] == "no-store"

    authorize = parse_qs(urlsplit(next(u for u in browser.visited if "/authorize?" in u)).query)
    assert authorize["aud"] == [ehr.fhir_base]
    assert authorize["scope"] == [SCOPE]
    assert authorize["code_challenge_method"] == ["S256"]
    assert len(authorize["state"][0]) >= 40 and "launch" in authorize

    cookie = browser.client.get_cookie(COOKIE, domain="gateway.test", path="/smart")
    assert cookie.http_only and cookie.secure and cookie.same_site == "Lax" and cookie.path == "/smart"

    state = session_state(gateway, browser)["token"]
    secrets_kept = [state["access_token"], state["refresh_token"]]
    for secret in secrets_kept:
        assert all(secret not in url for url in browser.visited)
        assert secret not in page.text and secret not in cookie.value

    assert "213" in page.text  # the newer value, read live with the launch's token
    assert f'name="csrf_token" value="{session_state(gateway, browser)["csrf"]}"' in page.text
    (call,) = rendered
    context = call["context"]
    assert call["csrf_token"] == session_state(gateway, browser)["csrf"]
    assert context.patient["id"] == PATIENT_ID
    assert context.need_patient_banner is True
    assert context.user == "Practitioner/smart-ehr-clinician"
    assert "patient/Observation.rs" in context.granted_scopes
    bundle = context.fhir_get(f"Observation?patient={PATIENT_ID}&code=http://loinc.org|2093-3")
    assert bundle["resourceType"] == "Bundle" and bundle["entry"][0]["resource"]["valueQuantity"]["value"] == 213


def test_consent_page_allow_completes_the_launch(gateway, ehr, result_id):
    ehr.consent = "ask"
    browser = Browser(gateway)
    consent = browser.follow(ehr.launch_url(LAUNCH_URL, PATIENT_ID, result_id))
    assert consent.status == 200 and "/authorize?" in consent.url and 'value="allow"' in consent.text.replace("'", '"')

    action = html.unescape(re.search(r"action='([^']+)'", consent.text).group(1))
    answer = browser.request("POST", ehr.base_url + action, data={"decision": "allow"})
    assert answer.status == 302
    assert browser.follow(answer.location).status == 200


def test_callback_rotates_the_session_id(gateway, ehr, result_id):
    browser = Browser(gateway)
    url = callback_url(browser, ehr, result_id)
    before = browser.cookie()
    assert browser.follow(url).status == 200
    after = browser.cookie()
    assert after and after != before
    assert gateway.extensions["smart_app"].store.load(before) is None


def test_state_mismatch_is_refused(gateway, ehr, result_id):
    browser = Browser(gateway)
    url = callback_url(browser, ehr, result_id)
    tampered = re.sub(r"state=[^&]+", "state=forged", url)
    page = browser.get(tampered)
    assert page.status == 400 and page.location is None
    assert ehr.token_count("authorization_code") == 0


def test_stolen_callback_url_in_another_browser_is_refused(gateway, ehr, result_id):
    victim = Browser(gateway)
    url = callback_url(victim, ehr, result_id)

    assert Browser(gateway).get(url).status == 400  # no session at all
    attacker = Browser(gateway)
    callback_url(attacker, ehr, result_id)  # a pending launch of its own, with its own state
    assert attacker.get(url).status == 400
    assert ehr.token_count("authorization_code") == 0

    assert victim.follow(url).status == 200


def test_server_without_s256_is_refused_before_any_redirect(gateway, ehr, result_id):
    ehr.advertise_s256 = False
    browser = Browser(gateway)
    page = browser.follow(ehr.launch_url(LAUNCH_URL, PATIENT_ID, result_id))
    assert page.status == 502 and page.location is None
    assert "PKCE" in page.text
    assert not any(path.startswith("/authorize") for _, path in ehr.received)


def test_iss_off_the_allowlist_is_refused_without_contacting_it(gateway, seeded):
    with SmartEhr(seeded.base_url) as stranger:
        browser = Browser(gateway)
        page = browser.get(f"{LAUNCH_URL}?iss={stranger.fhir_base}&launch=abc")
        assert page.status == 400 and page.location is None
        assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert stranger.received == []
    assert browser.get(f"{LAUNCH_URL}?iss=https://evil.example/fhir&launch=abc").status == 400
    assert browser.cookie() is None


@pytest.mark.parametrize("suffix", ["%23", "%3Fx=1", "/x%23y"])
def test_iss_with_a_query_or_fragment_is_refused(gateway, ehr, suffix):
    page = Browser(gateway).get(f"{LAUNCH_URL}?iss={ehr.fhir_base}{suffix}&launch=abc")
    assert page.status == 400 and page.location is None
    assert ehr.received == []


def test_a_malformed_iss_is_a_400_page_not_a_500(gateway):
    page = Browser(gateway).get(f"{LAUNCH_URL}?iss=http://%5B::1&launch=abc")
    assert page.status == 400 and page.location is None


def test_a_forged_id_token_stops_the_launch(gateway, ehr, result_id):
    ehr.forge_id_token = True
    page = launch_to_app(Browser(gateway), ehr, result_id)
    assert page.status >= 400 and "identity token could not be verified" in page.text


def test_access_denied_shows_a_403_page(gateway, ehr, result_id):
    ehr.consent = "deny"
    browser = Browser(gateway)
    page = browser.follow(ehr.launch_url(LAUNCH_URL, PATIENT_ID, result_id))
    assert page.status == 403
    assert "denied" in page.text.lower()
    assert ehr.token_count("authorization_code") == 0


def test_narrower_granted_scopes_reach_the_page(gateway, ehr, result_id, rendered):
    ehr.withhold_scopes = {"patient/Observation.rs"}
    browser = Browser(gateway)
    page = launch_to_app(browser, ehr, result_id)
    assert page.status == 200
    context = rendered[0]["context"]
    assert "patient/Observation.rs" not in context.granted_scopes
    assert "did not grant this app access to the patient" in page.text
    assert "patient/Patient.r" in context.granted_scopes
    with pytest.raises(requests.HTTPError):
        context.fhir_get(f"Observation?patient={PATIENT_ID}")


def test_expired_access_token_is_refreshed_once(clocked_gateway, clock, ehr, rendered):
    gateway = clocked_gateway
    ehr.token_lifetime_s = 600  # refreshed REFRESH_LEEWAY_S (30 s) before it ends: 570 s after the sign-in
    result_id = store_result(gateway, patient=PATIENT_ID)
    browser = Browser(gateway)
    assert launch_to_app(browser, ehr, result_id).status == 200
    first = session_state(gateway, browser)["token"]
    clock.advance(569)
    assert browser.get("/smart/app").status == 200
    assert ehr.token_count("refresh_token") == 0  # not due yet
    clock.advance(2)

    page = browser.get("/smart/app")
    assert page.status == 200
    assert ehr.token_count("refresh_token") == 1
    second = session_state(gateway, browser)["token"]
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]
    assert second["appContext"] == result_id and second["patient"] == PATIENT_ID
    assert rendered[-1]["context"].patient["id"] == PATIENT_ID  # fetched with the new token
    assert browser.get("/smart/app").status == 200
    assert ehr.token_count("refresh_token") == 1


def test_failed_refresh_shows_the_expired_page(clocked_gateway, clock, ehr):
    gateway = clocked_gateway
    ehr.token_lifetime_s = 600
    browser = Browser(gateway)
    assert launch_to_app(browser, ehr, store_result(gateway, patient=PATIENT_ID)).status == 200
    ehr.refuse_refresh = True
    clock.advance(571)

    page = browser.get("/smart/app")
    assert page.status == 401 and "expired" in page.text.lower()
    assert browser.get("/smart/app").status == 401  # the session is gone


def test_an_id_token_expired_on_the_app_clock_stops_the_launch(clocked_gateway, clock, ehr):
    """The id_token's exp is checked on the app's clock (which tests move), not only on the system's."""
    result_id = store_result(clocked_gateway, patient=PATIENT_ID)
    browser = Browser(clocked_gateway)
    url = callback_url(browser, ehr, result_id)
    clock.advance(400)  # the double's id_token lives 300 s from the code exchange, which comes next
    page = browser.follow(url)
    assert page.status == 502 and "identity token could not be verified" in page.text
    assert ehr.token_count("authorization_code") == 1 and browser.cookie() is None


def test_a_session_ends_on_the_app_clock(clocked_gateway, clock, ehr):
    result_id = store_result(clocked_gateway, patient=PATIENT_ID)
    browser = Browser(clocked_gateway)
    assert launch_to_app(browser, ehr, result_id).status == 200
    clock.advance(3599)  # SMART_SESSION_TTL_S is 3600 s
    assert browser.get("/smart/app").status == 200
    clock.advance(1)
    assert browser.get("/smart/app").status == 401


def test_unknown_app_context_shows_404(gateway, ehr):
    browser = Browser(gateway)
    page = launch_to_app(browser, ehr, "no-such-result")
    assert page.status == 404 and "no longer available" in page.text


def test_expired_result_shows_404(gateway, ehr):
    result = store_result(gateway, patient=PATIENT_ID, age_s=7200)
    assert launch_to_app(Browser(gateway), ehr, result).status == 404


def test_result_for_another_patient_is_refused(gateway, ehr):
    result = store_result(gateway, patient=OTHER_PATIENT_ID)
    assert launch_to_app(Browser(gateway), ehr, result, patient=PATIENT_ID).status == 403


def test_job_result_loads_its_job(gateway, ehr, rendered):
    from app.jobs import ledger

    payload = {"encounter": "e1", "patient_id": PATIENT_ID}
    ledger.enqueue(gateway.extensions["db"], "job-smart-1", "discharge-summary", payload)
    result = store_result(gateway, patient=PATIENT_ID, kind="discharge-summary", data={"job_id": "job-smart-1"})
    assert launch_to_app(Browser(gateway), ehr, result).status == 200
    assert "Waiting to start" in rendered[0]["page"]  # the queued job's status, read from the ledger


def test_no_app_page_without_a_completed_launch(gateway):
    page = Browser(gateway).get("/smart/app")
    assert page.status == 401
    assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY


def test_logout_requires_the_csrf_token(gateway, ehr, result_id):
    browser = Browser(gateway)
    assert launch_to_app(browser, ehr, result_id).status == 200
    csrf = session_state(gateway, browser)["csrf"]

    assert browser.request("POST", "/smart/logout").status == 400
    assert browser.request("POST", "/smart/logout", data={"csrf_token": "forged"}).status == 400
    assert browser.get("/smart/app").status == 200

    page = browser.request("POST", "/smart/logout", data={"csrf_token": csrf})
    assert page.status == 200
    assert any(c.startswith(f"{COOKIE}=;") and "Path=/smart" in c for c in page.set_cookies)
    assert browser.get("/smart/app").status == 401


def test_database_keeps_neither_the_cookie_nor_clear_tokens(gateway, ehr, result_id):
    browser = Browser(gateway)
    assert launch_to_app(browser, ehr, result_id).status == 200
    token = session_state(gateway, browser)["token"]
    with gateway.extensions["db"].connect() as conn:
        rows = conn.execute(sa.text("SELECT id, state FROM smart_sessions")).all()
    assert len(rows) == 1
    assert rows[0].id != browser.cookie()
    assert token["access_token"] not in rows[0].state and PATIENT_ID not in rows[0].state


def test_the_double_checks_pkce(ehr):
    """The authorization server double really verifies code_verifier against code_challenge."""
    verifier = secrets.token_urlsafe(48)
    launch = ehr.register_launch(PATIENT_ID, "ctx")
    redirect_uri = "http://client.test/cb"
    http = requests.Session()
    query = {
        "response_type": "code",
        "client_id": ehr.client.client_id,
        "redirect_uri": redirect_uri,
        "scope": SCOPE,
        "state": "s" * 43,
        "aud": ehr.fhir_base,
        "launch": launch,
        "code_challenge": create_s256_code_challenge(verifier),
        "code_challenge_method": "S256",
    }
    answer = http.get(ehr.base_url + "/authorize", params=query, allow_redirects=False, timeout=10)
    code = parse_qs(urlsplit(answer.headers["Location"]).query)["code"][0]
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "client_id": ehr.client.client_id,
    }

    wrong = http.post(ehr.base_url + "/token", data={**form, "code_verifier": secrets.token_urlsafe(48)}, timeout=10)
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    missing = http.post(ehr.base_url + "/token", data=form, timeout=10)
    assert missing.status_code == 400
    right = http.post(ehr.base_url + "/token", data={**form, "code_verifier": verifier}, timeout=10)
    assert right.status_code == 200 and right.json()["patient"] == PATIENT_ID


def test_a_launch_started_elsewhere_does_not_end_the_session(gateway, ehr, result_id):
    browser = Browser(gateway)
    assert launch_to_app(browser, ehr, result_id).status == 200
    # Another site sends the browser to our launch URL with a trusted iss and a made-up launch.
    started = browser.get(f"{LAUNCH_URL}?iss={ehr.fhir_base}&launch=made-up")
    assert started.status == 302
    assert browser.get("/smart/app").status == 200


def test_two_launches_in_one_browser_each_complete(gateway, ehr, result_id):
    browser = Browser(gateway)
    first = callback_url(browser, ehr, result_id)
    second = callback_url(browser, ehr, result_id)
    assert browser.follow(first).status == 200  # the first launch's state is still known
    assert browser.follow(second).status == 200


# -- a launch costs the server nothing until the EHR signs in (issue 9) ------------------------------------------


def test_launches_without_a_session_write_no_row_and_ask_the_ehr_once(gateway, ehr):
    for i in range(200):
        page = Browser(gateway).get(f"{LAUNCH_URL}?iss={ehr.fhir_base}&launch=made-up-{i}")
        assert page.status == 302 and "/authorize?" in page.location
    assert session_rows(gateway) == 0
    assert ehr.discovery_count() == 1


def test_the_pending_launch_waits_in_the_browser_sealed(gateway, ehr, result_id):
    browser = Browser(gateway)
    url = callback_url(browser, ehr, result_id)
    (cookie,) = launch_cookies(browser)
    assert cookie.http_only and cookie.secure and cookie.same_site == "Lax" and cookie.path == "/smart"
    authorize = parse_qs(urlsplit(next(u for u in browser.visited if "/authorize?" in u)).query)
    assert authorize["state"][0] not in cookie.value and "code_verifier" not in "".join(browser.visited)
    assert session_rows(gateway) == 0

    assert browser.follow(url).status == 200
    assert launch_cookies(browser) == []  # used once
    assert session_rows(gateway) == 1
    assert browser.get(url).status == 400  # a replayed callback finds no pending launch


def test_a_browser_keeps_at_most_five_pending_launches(gateway, ehr, result_id):
    browser = Browser(gateway)
    urls = [callback_url(browser, ehr, result_id) for _ in range(7)]
    assert len(launch_cookies(browser)) == 5
    assert browser.get(urls[0]).status == 400  # the oldest were dropped
    assert browser.follow(urls[-1]).status == 200


def test_concurrent_launches_share_one_discovery(gateway, ehr):
    ehr.hold_discovery = True
    base = next(c.fhir_base(ehr.fhir_base) for c in gateway.extensions["cds"].clients)
    cache = gateway.extensions["smart_app"].discovery
    statuses: list[int] = []

    def launch(i: int) -> None:
        statuses.append(Browser(gateway).get(f"{LAUNCH_URL}?iss={ehr.fhir_base}&launch=l{i}").status)

    threads = [threading.Thread(target=launch, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while cache.waiting(base) < 11:  # one fetch in flight, the other launches wait for it
        assert time.monotonic() < deadline, f"{cache.waiting(base)} launches waiting, {ehr.discovery_count()} fetches"
        time.sleep(0.01)  # a bounded poll for the launch threads to reach the wait (not a clock)
    ehr.release_discovery()
    for thread in threads:
        thread.join(10)
    assert statuses == [302] * 12
    assert ehr.discovery_count() == 1


@pytest.mark.parametrize("suffix", ["/Patient", "/Patient/1", "/..%2fevil", "/%2e%2e/x", "/x/..", "/.", "/R4"])
def test_an_iss_under_an_allowlisted_base_is_refused_without_contacting_it(gateway, ehr, suffix):
    page = Browser(gateway).get(f"{LAUNCH_URL}?iss={ehr.fhir_base}{suffix}&launch=abc")
    assert page.status == 400 and page.location is None
    assert "not a path under one" in page.text
    assert ehr.received == []


def test_other_spellings_of_an_allowlisted_base_are_the_same_base(gateway, ehr):
    spelled = ehr.fhir_base.replace("http://", "HTTP://") + "/"
    assert Browser(gateway).get(f"{LAUNCH_URL}?iss={spelled}&launch=a").status == 302
    assert Browser(gateway).get(f"{LAUNCH_URL}?iss={ehr.fhir_base}&launch=b").status == 302
    assert ehr.discovery_count() == 1  # one cache entry for both spellings


@pytest.mark.parametrize(
    ("setup", "status", "problem"),
    [
        ({"discovery_status": 500}, 502, "answered HTTP 500"),
        ({"discovery_status": 404}, 502, "answered HTTP 404"),
        ({"discovery_status": 302}, 502, "answered HTTP 302 (a redirect, which the app does not follow)"),
        ({"discovery_body": b"<html>not json</html>"}, 502, "is not JSON"),
        ({"discovery_body": ["S256"]}, 502, "is not a JSON object"),
        ({"discovery_body": {"token_endpoint": "http://x.test/t"}}, 502, "has no authorization_endpoint"),
        (
            {"discovery_body": {"authorization_endpoint": "javascript:alert(1)", "token_endpoint": "http://x.test/t"}},
            502,
            "has no usable authorization_endpoint (not an http(s) URL)",
        ),
        ({"advertise_s256": False}, 502, "does not list S256 in code_challenge_methods_supported"),
    ],
)
def test_each_discovery_failure_is_a_page_naming_the_problem(gateway, ehr, setup, status, problem):
    for name, value in setup.items():
        setattr(ehr, name, value)
    for i in range(3):
        page = Browser(gateway).get(f"{LAUNCH_URL}?iss={ehr.fhir_base}&launch=l{i}")
        assert page.status == status and page.location is None
        text = html.unescape(page.text)
        assert problem in text and f"{ehr.fhir_base}/.well-known/smart-configuration" in text
        assert "try again later" not in text.lower()
    assert ehr.discovery_count() == 1  # the failure is shown again, not asked again
    assert not any(path.startswith("/authorize") for _, path in ehr.received)


def test_a_failing_discovery_is_asked_once_for_two_hundred_launches(gateway, ehr):
    ehr.discovery_status = 503
    for i in range(200):
        assert Browser(gateway).get(f"{LAUNCH_URL}?iss={ehr.fhir_base}&launch=l{i}").status == 502
    assert ehr.discovery_count() == 1
    assert session_rows(gateway) == 0


def test_nothing_the_ehr_sends_reaches_the_error_page(gateway, ehr):
    ehr.discovery_body = {
        "authorization_endpoint": "<script>alert('authorize')</script>",
        "token_endpoint": "http://x.test/t",
        "code_challenge_methods_supported": ["<b>S256</b>"],
    }
    page = Browser(gateway).get(f"{LAUNCH_URL}?iss={ehr.fhir_base}&launch=x")
    assert page.status == 502 and "authorization_endpoint" in page.text
    assert "<script" not in page.text and "alert" not in page.text and "<b>" not in page.text


def test_an_unreachable_ehr_is_named(make_app, tmp_path, signing_key):
    closed = f"http://127.0.0.1:{free_port()}/fhir"
    app = gateway_trusting(make_app, tmp_path, signing_key, [closed])
    page = Browser(app).get(f"{LAUNCH_URL}?iss={closed}&launch=x")
    assert page.status == 502 and "could not be reached: no connection could be made" in page.text


def test_an_ehr_that_does_not_answer_in_time_is_named(make_app, tmp_path, signing_key, seeded):
    with SmartEhr(seeded.base_url) as slow:
        slow.hold_discovery = True
        app = gateway_trusting(make_app, tmp_path, signing_key, [slow.fhir_base], FHIR_TIMEOUT_S=1)
        page = Browser(app).get(f"{LAUNCH_URL}?iss={slow.fhir_base}&launch=x")
        slow.release_discovery()
    assert page.status == 504 and "did not answer within 1 s" in page.text


def test_a_wildcard_port_entry_admits_its_host_on_any_port_with_the_same_path(make_app, tmp_path, signing_key, ehr):
    app = gateway_trusting(make_app, tmp_path, signing_key, ["http://127.0.0.1:*/fhir/R4"])
    assert Browser(app).get(f"{LAUNCH_URL}?iss={ehr.fhir_base}&launch=x").status == 302
    assert Browser(app).get(f"{LAUNCH_URL}?iss={ehr.base_url}&launch=x").status == 400
    assert Browser(app).get(f"{LAUNCH_URL}?iss={ehr.fhir_base}/Patient&launch=x").status == 400


def test_a_token_response_without_a_patient_shows_no_patient_data(gateway, ehr, result_id, rendered):
    ehr.omit_patient = True
    browser = Browser(gateway)
    page = launch_to_app(browser, ehr, result_id)
    assert page.status == 400
    assert "did not give this app a patient context" in page.text
    assert "Launch" not in page.text and "213" not in page.text and "12.3" not in page.text
    assert rendered == [] and ehr.fhir_requests == []  # no result page, no banner, no live values
    assert ehr.token_count("authorization_code") == 1
    assert session_rows(gateway) == 0 and browser.cookie() is None
    assert browser.get("/smart/app").status == 401


def test_a_session_without_a_patient_shows_no_result(gateway, ehr, result_id, rendered):
    """A session kept from before the callback checked for a patient still shows no patient data."""
    browser = Browser(gateway)
    assert launch_to_app(browser, ehr, result_id).status == 200
    store = gateway.extensions["smart_app"].store
    session = store.load(browser.cookie())
    token = {k: v for k, v in session.state["token"].items() if k != "patient"}
    store.save(session, {**session.state, "token": token})
    page = browser.get("/smart/app")
    assert page.status == 400 and "did not give this app a patient context" in page.text
    assert len(rendered) == 1


def test_a_result_that_names_no_patient_is_not_shown(gateway, ehr):
    from app import results

    result = results.save(
        gateway.extensions["db"],
        "cardiovascular-risk",
        RISK_DATA,
        client_iss="x",
        fhir_server=None,
        patient_id=None,
        ttl_seconds=600,
    )
    assert launch_to_app(Browser(gateway), ehr, result).status == 403
