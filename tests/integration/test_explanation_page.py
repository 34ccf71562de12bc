"""The explanation page behind a card's SMART link: real hook calls store the result, the page renders it, and
newer values come from the real FHIR test server through a ``fhir_get`` like the launch's."""

from __future__ import annotations

import copy
import html
import json
import re
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from app import results
from app.ai import ModelUnavailable
from app.jobs import ledger
from app.smart import pages
from app.smart.pages import LaunchContext, allows, newer_values, render_error, render_result
from tests.conftest import PUBLIC_BASE_URL

SERVICE = "/cds-services/cardiovascular-risk"
SCOPES = frozenset({"launch", "openid", "fhirUser", "patient/Patient.r", "patient/Observation.rs"})
ID_PATTERN = r"[A-Za-z0-9_-]{22}"


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def engine(app):
    return app.extensions["db"]


def call_hook(app, signing_key, body: dict) -> dict:
    """One patient-view call through the Flask test client, with a signed client JWT; the only card."""
    token = signing_key.token(PUBLIC_BASE_URL + SERVICE)
    response = app.test_client().post(
        SERVICE, data=json.dumps(body), headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    (card,) = response.get_json()["cards"]
    return card


def smart_link(card: dict) -> dict:
    (link,) = [link for link in card["links"] if link.get("type") == "smart"]
    return link


def stored(app, card: dict) -> results.StoredResult:
    app.extensions["results_writer"].flush()  # written in the background, milliseconds after the card
    result = results.load(app.extensions["db"], smart_link(card)["appContext"])
    assert result is not None
    return result


def context(hook_body, **changes) -> LaunchContext:
    base = LaunchContext(
        patient=hook_body["prefetch"]["patient"],
        need_patient_banner=True,
        user="Practitioner/gw-test-practitioner",
        granted_scopes=SCOPES,
        fhir_get=None,
    )
    return replace(base, **changes)


def text_of(page: str) -> str:
    """The page's visible text: inline tags dropped, block tags made spaces, whitespace collapsed."""
    inline = re.sub(r"</?(strong|a|span|em)\b[^>]*>", "", page)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", inline)).split())


def down(app) -> None:
    class DownBackend:
        def infer(self, model, inputs, timeout=None):
            raise ModelUnavailable("unavailable", "connection refused")

    app.extensions["ai_guard"].backend = DownBackend()


@pytest.fixture
def fake_fhir():
    """A ``fhir_get`` that answers from a dict and records the paths asked for."""

    class Fake:
        def __init__(self):
            self.paths: list[str] = []
            self.answer: dict | Exception = {"resourceType": "Bundle", "type": "searchset", "entry": []}

        def __call__(self, path: str) -> dict:
            self.paths.append(path)
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

    return Fake()


# ---- the card and what it stores ------------------------------------------------------------------------------


def test_the_risk_card_links_to_the_app_with_an_opaque_id_that_loads_the_stored_result(app, signing_key, hook_body):
    card = call_hook(app, signing_key, hook_body)
    labels = [link["label"] for link in card["links"]]
    assert labels == [
        "ACC/AHA ASCVD Risk Estimator Plus",
        "2018 AHA/ACC cholesterol guideline",
        "Explain this result: inputs, dates, model",
    ]
    link = smart_link(card)
    assert link["url"] == PUBLIC_BASE_URL + "/smart/launch"
    assert re.fullmatch(ID_PATTERN, link["appContext"])
    assert "gw-test-patient-1" not in json.dumps(link)

    result = stored(app, card)
    assert result.kind == "cardiovascular-risk"
    assert result.patient_id == "gw-test-patient-1"
    assert result.client_iss == "https://ehr.test"
    assert result.fhir_server == hook_body["fhirServer"]
    assert result.expires_at - result.created_at == timedelta(seconds=86400)  # RESULT_TTL_S default
    data = result.data
    assert data["risk_text"] in card["summary"] and data["category"] in card["summary"]
    assert data["fallback"] is False and data["fallback_reason"] is None
    assert data["model"]["name"] == "ascvd-pce" and data["model"]["version"] in card["source"]["label"]
    assert data["guideline"]["url"] == card["source"]["url"]
    assert datetime.fromisoformat(data["made_at"].replace("Z", "+00:00")) <= datetime.now(UTC)
    by_name = {item["name"]: item for item in data["inputs"]}
    chol = by_name["total_cholesterol"]
    assert (chol["value"], chol["unit"], chol["date"], chol["source"]) == (
        213.0,
        "mg/dL",
        "2026-06-02",
        "Observation/obs-2093-3-0",
    )
    assert chol["loinc"] == ["2093-3", "14647-2"]
    assert by_name["systolic_bp"]["source"] == "Observation/obs-bp-0"
    assert {"age", "sex", "race", "hdl", "smoker", "diabetes", "treated_hypertension"} <= set(by_name)
    assert data["loinc"]["systolic_bp"] == ["8480-6", "55284-4", "85354-9"]


def test_the_fallback_card_links_too_and_its_result_says_why(app, signing_key, hook_body):
    down(app)
    card = call_hook(app, signing_key, hook_body)
    assert card["summary"].startswith("Cardiovascular risk unavailable")
    result = stored(app, card)
    assert result.data["fallback"] is True and result.data["fallback_reason"] == "unavailable"
    assert result.data["risk"] is None and result.data["model"]["version"] is None
    assert {item["name"] for item in result.data["inputs"]} >= {"total_cholesterol", "hdl", "systolic_bp"}


def test_when_the_result_cannot_be_stored_the_card_still_comes_without_the_link(
    app, signing_key, hook_body, monkeypatch, caplog
):
    def broken(*args, **kwargs):
        raise RuntimeError("database is down for gw-test-patient-1")

    monkeypatch.setattr(app.extensions["results_writer"], "submit", broken)
    card = call_hook(app, signing_key, hook_body)
    assert card["summary"].startswith("10-year ASCVD risk")
    assert [link.get("type", "absolute") for link in card["links"]] == ["absolute", "absolute"]
    assert "RuntimeError" in caplog.text and "gw-test-patient-1" not in caplog.text


# ---- the risk page --------------------------------------------------------------------------------------------


def test_the_risk_page_shows_the_number_inputs_dates_model_and_guideline(app, signing_key, hook_body):
    card = call_hook(app, signing_key, hook_body)
    result = stored(app, card)
    page = render_result(result, context(hook_body, granted_scopes=frozenset({"patient/Patient.r"})), csrf_token="c")
    text = text_of(page)
    assert f"{result.data['risk_text']}, {result.data['category']} (" in text
    assert "Total cholesterol 213 mg/dL measured 2026-06-02" in text
    assert "Systolic blood pressure" in text and "HDL cholesterol" in text
    assert "Observation/obs-2093-3-0" in text
    assert "Model Name ascvd-pce Version " + result.data["model"]["version"] in text.replace(":", "")
    assert f'<a href="{result.data["guideline"]["url"]}">ACC/AHA Pooled Cohort Equations 2013</a>' in page
    assert "The AI result was unavailable" not in text
    # the EHR granted Patient only: the page says that newer values could not be checked, and why
    assert "did not grant this app access to the patient's observations" in text
    # the statin benefit group, its advice and where the guideline says so
    assert "Statin benefit group: primary prevention at 40-75" in text
    assert "a moderate-intensity statin, to lower LDL-C by 30-49 %" in text
    assert f'<a href="{result.data["cholesterol_guideline"]["url"]}">2018 AHA/ACC cholesterol guideline</a>' in page
    assert "LDL cholesterol 131 mg/dL measured 2026-06-02" in text


def test_with_clinical_ascvd_the_page_says_why_there_is_no_risk_and_what_the_group_calls_for(
    app, signing_key, hook_body
):
    body = copy.deepcopy(hook_body)
    body["prefetch"]["conditions"]["entry"][0]["resource"]["code"] = {
        "coding": [{"system": "http://snomed.info/sct", "code": "22298006"}],
        "text": "Myocardial infarction",
    }
    card = call_hook(app, signing_key, body)
    assert card["summary"] == "Clinical ASCVD on record: high-intensity statin recommended"
    result = stored(app, card)
    text = text_of(render_result(result, context(body), csrf_token="c"))
    assert (
        "No risk was estimated: clinical ASCVD is on record, and the equations estimate the risk of a first event"
        in text
    )
    assert "Statin benefit group: clinical ASCVD" in text and "a high-intensity statin" in text
    assert "Clinical ASCVD on record: Myocardial infarction, since 2019-05-01" in text
    assert "Values found in the record" in text and "Inputs used" not in text
    assert "Version not run: no risk estimate is needed" in text and "To check or adjust the estimate" not in text


@pytest.mark.parametrize(("setting", "years"), [({}, 2), ({"CARDIOVASCULAR_RISK_OLD_AFTER_YEARS": "3"}, 3)])
def test_old_values_are_marked_with_the_sites_age_limit(make_app, signing_key, hook_body, setting, years):
    app = make_app(**setting)
    body = copy.deepcopy(hook_body)
    chol = body["prefetch"]["totalCholesterol"]
    chol["entry"] = chol["entry"][-1:]  # the 2022-02-14 result only
    card = call_hook(app, signing_key, body)
    assert card["summary"].endswith(f"; values over {years} years old")
    text = text_of(render_result(stored(app, card), context(body), csrf_token="c"))
    assert f"measured 2022-02-14 older than {years} years" in text


def test_the_page_is_accessible_html(app, signing_key, hook_body):
    result = stored(app, call_hook(app, signing_key, hook_body))
    page = render_result(result, context(hook_body), csrf_token="tok-123")
    assert page.startswith("<!doctype html>") and '<html lang="en">' in page
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert f'<link rel="stylesheet" href="{pages.STYLESHEET_URL}">' in page
    assert "<script" not in page and "style=" not in page and "<style" not in page  # CSP: style-src 'self'
    levels = [int(n) for n in re.findall(r"<h([1-6])[\s>]", page)]
    assert levels[0] == 1 and levels.count(1) == 1
    assert all(b - a <= 1 for a, b in zip(levels, levels[1:], strict=False))
    assert '<th scope="col">Input</th>' in page and page.count('<th scope="row">') == len(result.data["inputs"])
    assert "<caption>" in page and "<main" in page
    form = re.search(r'<form class="signout" method="post" action="/smart/logout">(.*?)</form>', page, re.S)
    assert form and '<input type="hidden" name="csrf_token" value="tok-123">' in form.group(1)


def test_the_stylesheet_is_served_from_the_apps_static_folder(app):
    response = app.test_client().get(pages.STYLESHEET_URL)
    assert response.status_code == 200 and response.mimetype == "text/css"
    assert b"@media" in response.data


def test_the_patient_banner_shows_only_when_the_ehr_asks_for_it(app, signing_key, hook_body):
    result = stored(app, call_hook(app, signing_key, hook_body))
    patient = hook_body["prefetch"]["patient"]
    shown = text_of(render_result(result, context(hook_body)))
    assert "Patient Gateway Testpatient" in shown or "Gateway Testpatient" in shown
    assert f"Born {patient['birthDate']}" in shown and f"Gender {patient['gender']}" in shown
    hidden = render_result(result, context(hook_body, need_patient_banner=False))
    assert 'class="banner"' not in hidden and "Testpatient" not in hidden
    unknown = text_of(render_result(result, context(hook_body, patient=None)))
    assert "patient's details could not be loaded" in unknown


def test_the_fallback_page_says_what_the_fallback_meant(app, signing_key, hook_body):
    down(app)
    result = stored(app, call_hook(app, signing_key, hook_body))
    page = render_result(result, context(hook_body))
    text = text_of(page)
    assert "No risk was calculated: the AI result was unavailable" in text
    assert "The AI result was unavailable because the model could not be reached" in text
    assert "The values shown below are the record's" in text
    assert '<a href="https://tools.acc.org/ascvd-risk-estimator-plus/">ACC/AHA ASCVD Risk Estimator Plus</a>' in page
    assert "Total cholesterol 213 mg/dL measured 2026-06-02" in text
    assert "unknown: the model gave no result" in text


def test_a_result_without_enough_inputs_says_what_was_missing(app, signing_key, hook_body):
    body = copy.deepcopy(hook_body)
    body["prefetch"]["totalCholesterol"] = {"resourceType": "Bundle", "type": "searchset", "entry": []}
    card = call_hook(app, signing_key, body)
    assert "not calculated" in card["summary"]
    text = text_of(render_result(stored(app, card), context(body)))
    assert "some inputs were missing or not usable" in text
    assert "Missing or not usable no total cholesterol in the record" in text


def test_record_values_are_escaped(app, signing_key, hook_body, engine):
    body = copy.deepcopy(hook_body)
    attack = "<script>alert(1)</script>"
    body["prefetch"]["patient"]["name"] = [{"given": [attack], "family": "O'Hara & <b>Sons</b>"}]
    conditions = body["prefetch"]["conditions"]["entry"]
    conditions.append(
        {
            "resource": {
                "resourceType": "Condition",
                "id": "cond-evil",
                "clinicalStatus": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
                },
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}], "text": attack},
                "subject": {"reference": "Patient/gw-test-patient-1"},
            }
        }
    )
    result = stored(app, call_hook(app, signing_key, body))
    assert attack in json.dumps(result.data)  # stored as the record's own words ...
    page = render_result(result, context(body))
    assert "<script" not in page and "<b>Sons" not in page  # ... and escaped on the page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "O&#39;Hara &amp; &lt;b&gt;Sons&lt;/b&gt;" in page
    evil = replace(result, data={**result.data, "fallback": True, "fallback_reason": attack})
    assert "<script" not in render_result(evil, context(body))


# ---- newer values ---------------------------------------------------------------------------------------------


def test_newer_values_come_from_the_fhir_server_and_are_marked(app, signing_key, hook_body, fhir_server):
    patient_id = f"explain-{uuid.uuid4().hex[:12]}"
    # The whole request moves to the new patient: prefetch of another patient than the context's is not used.
    body = json.loads(json.dumps(hook_body).replace(hook_body["context"]["patientId"], patient_id))
    result = stored(app, call_hook(app, signing_key, body))
    made_at = datetime.fromisoformat(result.data["made_at"].replace("Z", "+00:00"))
    later = (made_at + timedelta(minutes=5)).isoformat().replace("+00:00", "Z")
    earlier = (made_at - timedelta(days=1)).isoformat().replace("+00:00", "Z")

    def observation(oid, code, when, **value):
        return {
            "resource": {
                "resourceType": "Observation",
                "id": oid,
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "subject": {"reference": f"Patient/{patient_id}"},
                "effectiveDateTime": when,
                **value,
            },
            "request": {"method": "PUT", "url": f"Observation/{oid}"},
        }

    systolic = {"system": "http://loinc.org", "code": "8480-6"}
    diastolic = {"system": "http://loinc.org", "code": "8462-4"}
    fhir_server.post_bundle(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "resource": {"resourceType": "Patient", "id": patient_id, "gender": "male"},
                    "request": {"method": "PUT", "url": f"Patient/{patient_id}"},
                },
                observation(f"{patient_id}-chol-new", "2093-3", later, valueQuantity={"value": 187, "unit": "mg/dL"}),
                observation(f"{patient_id}-chol-old", "2093-3", earlier, valueQuantity={"value": 300, "unit": "mg/dL"}),
                observation(
                    f"{patient_id}-bp-new",
                    "85354-9",
                    later,
                    component=[
                        {"code": {"coding": [diastolic]}, "valueQuantity": {"value": 81, "unit": "mm[Hg]"}},
                        {"code": {"coding": [systolic]}, "valueQuantity": {"value": 128, "unit": "mm[Hg]"}},
                    ],
                ),
                observation(f"{patient_id}-glucose", "2339-0", later, valueQuantity={"value": 99, "unit": "mg/dL"}),
            ],
        }
    )
    http = requests.Session()
    http.trust_env = False
    asked: list[str] = []

    def fhir_get(path: str) -> dict:
        asked.append(path)
        response = http.get(f"{fhir_server.base_url}/{path}", timeout=10)
        response.raise_for_status()
        return response.json()

    found = newer_values(result, context(body, fhir_get=fhir_get))
    assert {(v.input, v.display, v.source) for v in found} == {
        ("total_cholesterol", "187 mg/dL", f"Observation/{patient_id}-chol-new"),
        ("systolic_bp", "128 mm[Hg]", f"Observation/{patient_id}-bp-new"),
    }
    (path,) = asked
    query = parse_qs(urlsplit(path).query)
    assert query["patient"] == [patient_id] and query["_sort"] == ["-date"] and query["_count"] == ["10"]
    assert query["date"] == [f"gt{result.data['made_at']}"]
    assert "http://loinc.org|2093-3" in query["code"][0].split(",")

    text = text_of(render_result(result, context(body, fhir_get=fhir_get)))
    assert f"Newer value since the card: 187 mg/dL, {later}" in text
    assert "Newer value since the card: 128 mm[Hg]" in text
    assert "300 mg/dL" not in text
    assert "the estimate above does not include them" in text


def test_no_newer_values_is_said_plainly(app, signing_key, hook_body, fake_fhir):
    result = stored(app, call_hook(app, signing_key, hook_body))
    text = text_of(render_result(result, context(hook_body, fhir_get=fake_fhir)))
    assert "No newer values were found in the EHR since the card was made" in text
    assert len(fake_fhir.paths) == 1 and fake_fhir.paths[0].startswith("Observation?patient=gw-test-patient-1&")


def test_without_the_observation_scope_the_fhir_server_is_not_asked(app, signing_key, hook_body, fake_fhir):
    result = stored(app, call_hook(app, signing_key, hook_body))
    narrow = context(hook_body, fhir_get=fake_fhir, granted_scopes=frozenset({"launch", "patient/Patient.r"}))
    with pytest.raises(pages.ScopeNotGranted):
        newer_values(result, narrow)
    page = render_result(result, narrow)
    assert "the EHR did not grant this app access to the patient&#39;s observations" in page
    assert fake_fhir.paths == []


@pytest.mark.parametrize(
    "failure",
    [
        requests.ConnectionError("refused"),
        requests.HTTPError("500 Server Error"),
        ValueError("not JSON"),
        {"resourceType": "OperationOutcome"},
    ],
)
def test_a_failing_fhir_server_is_a_sentence_not_an_error(app, signing_key, hook_body, fake_fhir, failure):
    result = stored(app, call_hook(app, signing_key, hook_body))
    fake_fhir.answer = failure
    text = text_of(render_result(result, context(hook_body, fhir_get=fake_fhir)))
    assert "Newer values could not be checked" in text
    assert "Total cholesterol 213 mg/dL" in text  # the rest of the page is still there


# ---- scopes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scopes", "access", "expected"),
    [
        ({"patient/Observation.rs"}, "search", True),
        ({"patient/Observation.rs"}, "read", True),
        ({"patient/Observation.r"}, "read", True),
        ({"patient/Observation.r"}, "search", False),
        ({"patient/Observation.read"}, "search", True),
        ({"patient/Observation.read"}, "rs", True),
        ({"patient/*.read"}, "search", True),
        ({"patient/*.rs"}, "read", True),
        ({"patient/*.*"}, "read", True),
        ({"user/Observation.rs"}, "search", True),
        ({"patient/Observation.rs?category=laboratory"}, "search", True),
        ({"patient/Observation.cruds"}, "search", True),
        ({"patient/Observation.write"}, "read", False),
        ({"patient/Observation.c"}, "read", False),
        ({"patient/Patient.r"}, "read", False),
        ({"system/Observation.rs"}, "read", False),
        ({"Observation.rs", "launch", "openid"}, "read", False),
        (set(), "read", False),
    ],
)
def test_allows_reads_smart_v1_and_v2_scopes(scopes, access, expected):
    assert allows(frozenset(scopes), "Observation", access) is expected


def test_allows_rejects_an_unknown_access():
    with pytest.raises(ValueError):
        allows(SCOPES, "Observation", "peek")


# ---- job results and error pages ------------------------------------------------------------------------------


def _job_result(engine, job_id: str) -> results.StoredResult:
    result_id = results.save(
        engine,
        "discharge-summary",
        {"job_id": job_id},
        client_iss=None,
        fhir_server=None,
        patient_id="p1",
        ttl_seconds=600,
    )
    return results.load(engine, result_id)


def test_a_queued_job_shows_its_status_in_words(app, engine, hook_body):
    job_id = f"discharge-summary:{uuid.uuid4().hex}"
    ledger.enqueue(engine, job_id, "discharge-summary", {"patient_id": "p1"}, max_attempts=3)
    result = _job_result(engine, job_id)
    with app.app_context():  # the page reads the job from the app's ledger
        text = text_of(render_result(result, context(hook_body)))
    assert "Discharge summary draft" in text and "Status Waiting to start" in text
    assert "Reload this page" in text and "The draft" not in text


def test_a_succeeded_job_shows_the_preliminary_draft(app, engine, hook_body):
    job_id = f"discharge-summary:{uuid.uuid4().hex}"
    ledger.enqueue(engine, job_id, "discharge-summary", {"patient_id": "p1"})
    claimed = ledger.claim(engine, "worker-1", kinds=["discharge-summary"])
    draft = "Discharge summary\n\nDiagnoses:\n- Pneumonia <resolved> & well\n"
    outcome = {
        "documentReference": "DocumentReference/doc-1",
        "docStatus": "preliminary",
        "model": {"name": "discharge-summary", "version": "1.0"},
        "summary": draft,
    }
    assert ledger.complete(engine, claimed, outcome)
    result = _job_result(engine, job_id)
    with app.app_context():
        page = render_result(result, context(hook_body))
    text = text_of(page)
    assert "Done: the draft is ready" in text
    assert "DocumentReference/doc-1" in text and "preliminary draft written by AI" in text
    assert "Pneumonia &lt;resolved&gt; &amp; well" in page
    block = re.search(r"<pre[^>]*>(.*?)</pre>", page, re.S)
    assert block and html.unescape(block.group(1)) == draft


def test_a_job_that_is_gone_or_failed_is_said_so(app, engine, hook_body):
    result = _job_result(engine, "discharge-summary:gone")
    with app.app_context():
        assert "This job could not be found" in text_of(render_result(result, context(hook_body)))
    ledger.enqueue(engine, "discharge-summary:dead", "discharge-summary", {"patient_id": "p1"}, max_attempts=1)
    claimed = ledger.claim(engine, "worker-1", kinds=["discharge-summary"])
    assert ledger.fail(engine, claimed, "E", permanent=True) == ledger.DEAD
    with app.app_context():
        page = render_result(_job_result(engine, "discharge-summary:dead"), context(hook_body))
    assert "Failed: the draft could not be made" in text_of(page)


def test_error_pages_are_plain_and_escaped():
    page = render_error("Launch denied <x>", "The EHR said no & <b>stop</b>.")
    text = text_of(page)
    assert "Launch denied <x>" in text and "The EHR said no & <b>stop</b>." in text
    assert "<b>" not in page and "<x>" not in page
    assert "csrf_token" not in page and 'class="banner"' not in page
    assert '<html lang="en">' in page
