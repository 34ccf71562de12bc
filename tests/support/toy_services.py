"""Toy CDS services, declared in one place, that exercise the framework itself rather than any clinical rule.

Each one takes one path through app.cds: prefetch used or fetched, a card function that raises, a fallback that
raises, no fallback at all (the generic fallback), and a ``budget_ms`` tighter than the hook budget. ``toy-explained``
is a whole service in the few lines below plus one template (``templates/smart/toy_explained.html`` next to this
module): its own model, its own explanation page and its own setting. They are declared only inside `declared()`
and removed when it ends, so the rest of the suite sees the registry unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from flask import Flask, current_app

from app.ai import infer, make_guard
from app.ai.local import LocalBackend
from app.cds.cards import Card, Source
from app.cds.service import Explanation, PrefetchKey, ServiceCall, Setting, cds_service, unregister

ECHO = "toy-echo"
RAISES = "toy-raises"
FALLBACK_RAISES = "toy-fallback-raises"
NO_FALLBACK = "toy-no-fallback"
BUDGET = "toy-budget"
UNBUDGETED = "toy-unbudgeted"
EXPLAINED = "toy-explained"
IDS = (ECHO, RAISES, FALLBACK_RAISES, NO_FALLBACK, BUDGET, UNBUDGETED, EXPLAINED)
TOY_MODEL = "toy-doubler"
TOY_SETTING = "TOY_GREETING_NUMBER"

BUDGET_MS = 300
PATIENT_TEMPLATE = "Patient/{{context.patientId}}"
# Valid Pooled Cohort Equations inputs: the model the budgeted services call answers for them.
PCE_INPUTS = {
    "age": 55,
    "sex": "male",
    "race": "white",
    "total_cholesterol": 213,
    "hdl": 50,
    "systolic_bp": 120,
    "treated_hypertension": False,
    "smoker": False,
    "diabetes": False,
}


def _family_name(call: ServiceCall) -> str:
    patients = call.resources("patient")
    names = patients[0].get("name") if patients else None
    return names[0].get("family", "?") if names else "unknown"


def echo_cards(call: ServiceCall) -> list[Card]:
    """One card naming the patient read from the ``patient`` prefetch (sent by the EHR or fetched)."""
    return [Card(summary=f"Echo: {_family_name(call)}", indicator="info", source=Source(label="toy echo"))]


def echo_fallback(call: ServiceCall, why: str) -> list[Card]:
    """The toy services' own fallback: says why, so a test can tell it from the generic one."""
    return [Card(summary=f"Toy fallback: {why}", indicator="warning", source=Source(label=f"toy fallback ({why})"))]


def raising_cards(call: ServiceCall) -> list[Card]:
    raise RuntimeError("a bug in the toy card function")


def raising_fallback(call: ServiceCall, why: str) -> list[Card]:
    raise RuntimeError("a bug in the toy fallback")


def model_cards(call: ServiceCall) -> list[Card]:
    """Calls the configured model through the guard, within this service's budget."""
    prediction = infer("ascvd-pce", PCE_INPUTS)
    return [
        Card(
            summary=f"Toy model answered: {prediction.model} {prediction.version}",
            indicator="info",
            source=Source(label="toy"),
        )
    ]


class Doubler:
    """The toy service's own model: doubles a number."""

    name, version = TOY_MODEL, "0.1"

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"doubled": inputs["number"] * 2}


def doubler_guard(app: Flask):
    """The toy model in process, behind a guard of its own (registered by the service's declaration)."""
    return make_guard(app, LocalBackend([Doubler()]), endpoint="toy:in-process", timeout=1.0)


def explained_cards(call: ServiceCall) -> list[Card]:
    """Asks its own model about its own setting, and links the card to its own explanation page."""
    number = current_app.config[TOY_SETTING]
    prediction = infer(TOY_MODEL, {"number": number})
    link = call.explain({"number": number, "doubled": prediction.outputs["doubled"], "model": prediction.version})
    card = Card(summary=f"Toy doubled {number}", indicator="info", source=Source(label="toy explained"))
    if link is not None:
        card.links.append(link)
    return [card]


def explained_view(result, context) -> dict[str, Any]:
    """The toy page's variables, from the stored result."""
    return {"toy": {"greeting": "Toy result", **result.data}}


def declare() -> None:
    """Register every toy service (their card functions are module functions, so declaring twice is a no-op)."""
    patient = {"patient": PrefetchKey(PATIENT_TEMPLATE)}
    common = {"hook": "patient-view", "description": "A toy service of the test suite."}
    cds_service(id=ECHO, title="Toy echo", prefetch=patient, fallback=echo_fallback, **common)(echo_cards)
    cds_service(id=RAISES, title="Toy raises", fallback=echo_fallback, **common)(raising_cards)
    cds_service(id=FALLBACK_RAISES, title="Toy fallback raises", fallback=raising_fallback, **common)(raising_cards)
    cds_service(id=NO_FALLBACK, title="Toy no fallback", **common)(raising_cards)
    cds_service(id=BUDGET, title="Toy budget", fallback=echo_fallback, budget_ms=BUDGET_MS, **common)(model_cards)
    # The same card function under the hook budget, to show that the budget above is what cut the call short.
    cds_service(id=UNBUDGETED, title="Toy unbudgeted", fallback=echo_fallback, **common)(_unbudgeted_cards)
    cds_service(
        id=EXPLAINED,
        title="Toy explained",
        fallback=echo_fallback,
        explanation=Explanation(
            label="How the toy answered",
            title="Toy: how this was made",
            template="smart/toy_explained.html",
            view=explained_view,
        ),
        settings={TOY_SETTING: Setting(int, 21, 1, 1000)},
        models={TOY_MODEL: doubler_guard},
        **common,
    )(explained_cards)


def _unbudgeted_cards(call: ServiceCall) -> list[Card]:
    return model_cards(call)


def remove() -> None:
    for service_id in IDS:
        unregister(service_id)


@contextlib.contextmanager
def declared() -> Iterator[None]:
    """The toy services, registered for the duration of the block."""
    declare()
    try:
        yield
    finally:
        remove()
