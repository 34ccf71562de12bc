"""Every cardiovascular-risk card the service gives for the Synthea sample and a synthetic population is short and
clean: a summary under 140 characters, Markdown that renders (CommonMark with GitHub tables) without stray escapes
or asterisks and without raw HTML, no internal record ids, units as clinicians write them, about ten lines."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

import app.ai
from app.cds.cards import Card
from app.cds.request import HookRequest
from app.cds.service import ServiceCall
from cds_services import cardiovascular_risk as service
from cds_services.cardiovascular_risk import CardOptions, build_cards, extract_inputs, fallback, needs_risk
from tests.support.fhir_builders import bundle
from tests.support.models import model_app
from tests.support.population import AS_OF, iter_population

SYNTHEA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "synthea-r4"
MARKDOWN = MarkdownIt("commonmark").enable("table")
RESOURCE_ID = re.compile(
    r"\b(?:Patient|Observation|Condition|MedicationRequest|Medication|Encounter|Practitioner)/\S"
    r"|urn:uuid:|\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"
)
RENDERED_TAGS = {"p", "table", "thead", "tbody", "tr", "th", "td", "ul", "li", "em", "strong", "br"}
MAX_LINES = 12  # visible lines: the advice, the table's header and rows, the statin line; notes are rare


def _patients_of(resources: list[dict]) -> Iterator[list[dict]]:
    """Resources in patient order (each patient's Patient first) cut into one list per patient."""
    current: list[dict] = []
    for resource in resources:
        if resource["resourceType"] == "Patient" and current:
            yield current
            current = []
        current.append(resource)
    if current:
        yield current


def _synthea() -> list[list[dict]]:
    if not (SYNTHEA / "bundles").is_dir():
        return []
    return [
        [entry["resource"] for entry in json.loads(path.read_text())["entry"]]
        for path in sorted((SYNTHEA / "bundles").glob("*.json"))
    ]


def _call(resources: list[dict]) -> ServiceCall:
    [patient] = [r for r in resources if r["resourceType"] == "Patient"]
    others = [r for r in resources if r["resourceType"] in ("Observation", "Condition", "MedicationRequest")]
    prefetch = {"patient": patient, "observations": bundle(*others)}
    request = HookRequest(
        hook="patient-view",
        hook_instance="0b8f9a3e-2b5c-4a53-9d3c-3c0c6a3a6f10",
        context={"userId": "Practitioner/d1", "patientId": patient["id"]},
        prefetch=prefetch,
    )
    return ServiceCall(request=request, prefetch=prefetch)


def cards_for(resources: list[dict], day: date, monkeypatch) -> list[Card]:
    """The hook's cards with informational cards off and on, and the fallback card, for one patient."""
    of = {kind: [r for r in resources if r["resourceType"] == kind] for kind in ("Observation", "Condition")}
    medications = [r for r in resources if r["resourceType"] in ("MedicationRequest", "Medication")]
    [patient] = [r for r in resources if r["resourceType"] == "Patient"]
    inputs = extract_inputs(patient, of["Observation"], of["Condition"], medications, day)
    inputs.patient_id = patient["id"]
    prediction = app.ai.infer("ascvd-pce", inputs.model_inputs()) if needs_risk(inputs) else None
    found = build_cards(inputs, prediction) + build_cards(inputs, prediction, CardOptions(info_cards=True))
    monkeypatch.setattr(service, "today", lambda: day)
    return found + fallback(_call(resources), "timed out")


def texts(card: Card) -> list[str]:
    """Every text of a card a clinician reads."""
    found = [card.summary, card.detail or "", card.source.label]
    found += [link.label for link in card.links] + [reason.display or "" for reason in card.overrideReasons]
    for suggestion in card.suggestions:
        found += [suggestion.label] + [action.description for action in suggestion.actions]
    return found


def check(card: Card, who: str) -> None:
    assert 0 < len(card.summary) < 140 and "\n" not in card.summary, who
    for text in texts(card):
        assert not RESOURCE_ID.search(text), (who, text)
        assert "mm Hg" not in text and "mm[Hg]" not in text, (who, text)
    detail = card.detail or ""
    rendered = MARKDOWN.render(detail)
    tags = set(re.findall(r"</?([a-z0-9]+)", rendered))
    assert tags <= RENDERED_TAGS, (who, tags - RENDERED_TAGS)  # no raw HTML came through
    visible = html.unescape(re.sub(r"<[^>]+>", " ", rendered))
    assert "\\" not in visible and "*" not in visible, (who, visible)
    # Nothing in these records needs escaping: a renderer weaker than CommonMark shows no backslash either.
    assert "\\" not in detail, (who, detail)
    if "| --- |" in detail:
        assert "<table>" in rendered, who
    lines = [line for line in detail.splitlines() if line.strip() and not line.startswith("| ---")]
    assert len(lines) <= MAX_LINES, (who, detail)


@pytest.fixture
def model():
    with model_app().app_context():
        yield


@pytest.mark.parametrize("day", [date(2021, 4, 1), date.today()], ids=["data's own time", "today"])
def test_every_card_for_the_synthea_sample_is_short_and_clean(day, model, monkeypatch):
    patients = _synthea()
    if not patients:
        pytest.skip(f"Synthea sample data not found at {SYNTHEA}")
    produced = 0
    for resources in patients:
        for card in cards_for(resources, day, monkeypatch):
            check(card, resources[0]["id"] if resources[0]["resourceType"] == "Patient" else "?")
            produced += 1
    assert produced >= len(patients) * 2  # an informational card at least, and the fallback's for most


def test_every_card_for_a_synthetic_population_is_short_and_clean(model, monkeypatch):
    seen: dict[str, int] = {}
    for resources in _patients_of([resource for _, resource in iter_population(400, seed=11)]):
        for card in cards_for(resources, AS_OF, monkeypatch):
            check(card, resources[0]["id"])
            head = card.summary.split(":")[0]
            key = "risk" if head.startswith("10-year ASCVD risk ") and "not calculated" not in head else head
            seen[key] = seen.get(key, 0) + 1
    # the population reaches every kind of card: risk, clinical ASCVD, missing data, not applicable, fallback
    assert {"risk", "Clinical ASCVD on record", "10-year ASCVD risk not calculated"} <= set(seen), seen
    assert any(k.startswith("Cardiovascular risk not assessed") for k in seen), seen
    assert any(k.startswith("Cardiovascular risk unavailable") for k in seen), seen
