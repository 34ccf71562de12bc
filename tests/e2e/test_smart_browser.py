"""A clinician in a real browser (headless Debian Chromium, driven by Selenium): from a cardiovascular-risk card's
smart link, through the EHR launch, consent and redirect, to the page that explains the AI result.

The gateway serves on a real loopback port; the EHR is the authlib-based double in tests/support/smart_ehr.py,
with the Medplum FHIR test server behind it.
"""

from __future__ import annotations

import json
import shutil
import threading
from urllib.parse import urlsplit

import pytest
import requests
from werkzeug.serving import make_server

from tests.conftest import require
from tests.support.processes import free_port
from tests.support.smart_ehr import SmartEhr
from tests.support.tokens import clients_document

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SERVICE = "/cds-services/cardiovascular-risk"


def browser_unavailable() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            return f"{path} is missing (apt-get install chromium chromium-driver; `make test` does it)"
    return None


@pytest.fixture
def browser():
    require(browser_unavailable())
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=390,844",  # a phone's screen: the page must be readable there
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def ehr(fhir_server):
    with SmartEhr(fhir_server.base_url) as double:
        yield double


@pytest.fixture
def gateway(make_app, tmp_path, signing_key, hook_body, fhir_server):
    """The gateway on a real port, trusting the test client and the EHR double's FHIR server."""
    patient = hook_body["prefetch"]["patient"]
    fhir_server.post_bundle(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"resource": patient, "request": {"method": "PUT", "url": f"Patient/{patient['id']}"}}],
        }
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    clients = tmp_path / "browser-clients.json"
    clients.write_text(json.dumps(clients_document(signing_key, ["http://127.0.0.1:*"])))
    app = make_app(PUBLIC_BASE_URL=base, CDS_CLIENTS_FILE=str(clients))
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield base
    server.shutdown()
    server.server_close()


def risk_card(gateway: str, signing_key, hook_body: dict, ehr: SmartEhr) -> dict:
    body = json.loads(json.dumps(hook_body).replace(hook_body["fhirServer"], ehr.fhir_base))  # entries live there
    token = signing_key.token(gateway + SERVICE)
    response = requests.post(gateway + SERVICE, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["cards"][0]


def test_a_clinician_follows_the_card_link_to_the_explanation(browser, gateway, ehr, signing_key, hook_body):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    card = risk_card(gateway, signing_key, hook_body, ehr)
    link = next(link for link in card["links"] if link["type"] == "smart")
    assert link["url"] == gateway + "/smart/launch" and link["appContext"]
    patient_id = hook_body["context"]["patientId"]

    browser.get(ehr.launch_url(link["url"], patient=patient_id, app_context=link["appContext"]))
    WebDriverWait(browser, 20).until(ec.element_to_be_clickable((By.ID, "allow"))).click()  # the EHR's consent
    WebDriverWait(browser, 20).until(lambda d: urlsplit(d.current_url).path == "/smart/app")

    page = browser.find_element(By.TAG_NAME, "body").text
    risk = card["summary"].split("%")[0].split()[-1]  # e.g. "5.4" from the card's summary
    assert f"{risk}%" in page.replace(" %", "%")
    assert "Gateway Testpatient" in page  # the patient banner (need_patient_banner is true)
    assert "ascvd-pce" in page and "2013.1" in page  # model and version
    assert "Pooled Cohort Equations" in page  # the guideline source
    assert "Total cholesterol" in page or "total cholesterol" in page.lower()
    assert "code=" not in browser.current_url and "token" not in browser.current_url
    cookies = {c["name"]: c for c in browser.get_cookies()}
    session_cookies = [c for c in cookies.values() if c["path"].startswith("/smart")]
    assert session_cookies and all(c["httpOnly"] and c["sameSite"] == "Lax" for c in session_cookies)
    assert all(len(c["value"]) < 100 for c in session_cookies)  # an id, not a token
    assert ehr.token_count("authorization_code") == 1
    assert ehr.fhir_requests and all(status == 200 for _, status in ehr.fhir_requests)


def test_a_denied_launch_ends_on_a_clear_page(browser, gateway, ehr, signing_key, hook_body):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    card = risk_card(gateway, signing_key, hook_body, ehr)
    link = next(link for link in card["links"] if link["type"] == "smart")
    browser.get(ehr.launch_url(link["url"], patient=hook_body["context"]["patientId"], app_context=link["appContext"]))
    WebDriverWait(browser, 20).until(ec.element_to_be_clickable((By.ID, "deny"))).click()
    WebDriverWait(browser, 20).until(lambda d: urlsplit(d.current_url).path == "/smart/callback")
    text = browser.find_element(By.TAG_NAME, "body").text.lower()
    assert "denied" in text
    assert ehr.token_count("authorization_code") == 0
