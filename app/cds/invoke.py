"""Running a service for one hook call: prefetch within the deadline, cards, and a fallback that never fails."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from app.ai import InferenceError, ModelUnavailable, reason_text
from app.ai.guard import deadline as model_deadline
from app.cds.cards import Card, Source
from app.cds.clients import TrustedClient
from app.cds.prefetch import FhirAccess, PrefetchResolver
from app.cds.request import HookRequest
from app.cds.service import CdsService, ServiceCall
from app.logs import describe
from app.metrics import FALLBACKS
from app.results import explanation_link

log = logging.getLogger(__name__)

# Share of the budget that prefetch fill-in may use; the rest is kept for the model and the answer.
FETCH_SHARE = 0.7


def generic_fallback(service: CdsService, why: str) -> list[Card]:
    """The card shown when a service declared no fallback of its own: the failure is never silent."""
    return [
        Card(
            summary=f"{service.title}: AI result {why}",
            indicator="info",
            detail="This decision support could not run for this patient now. Proceed with usual clinical judgement.",
            source=Source(label=f"{service.title} (AI result unavailable: {why})"),
        )
    ]


def fallback_cards(service: CdsService, call: ServiceCall, reason: str) -> list[Card]:
    """The service's own fallback cards, told why in words (timed out, unavailable, overloaded)."""
    why = reason_text(reason)
    if service.fallback is None:
        return generic_fallback(service, why)
    try:
        return service.fallback(call, why)
    except Exception as exc:
        log.error("fallback of service %s failed: %s", service.id, describe(exc))
        return generic_fallback(service, why)


@dataclass(frozen=True)
class ServiceRun:
    """The cards of one hook call, how they came about (``cards`` or ``fallback:<reason>``), and for the audit
    record: resources left out per prefetch key (another patient's or encounter's) and keys that may be
    incomplete."""

    cards: list[Card]
    outcome: str
    dropped: dict[str, int]
    incomplete: frozenset[str]


def run_service(
    service: CdsService,
    request: HookRequest,
    resolver: PrefetchResolver,
    access: FhirAccess,
    started: float,
    default_budget_ms: int,
    on_fetch: Callable[[dict[str, Any]], None],
    reserve_ms: int = 20,
    client: TrustedClient | None = None,
) -> ServiceRun:
    """The cards for this call, from prefetch screened against the patient (and encounter) in context.

    One deadline for the whole call: prefetch fill-in may use FETCH_SHARE of the budget, model calls must
    answer ``reserve_ms`` before its end, which leaves time to build and send the answer.
    """
    budget = (service.budget_ms or default_budget_ms) / 1000
    deadline = started + budget
    prefetch = resolver.resolve(service.prefetch, request, access, started + budget * FETCH_SHARE, on_fetch)
    call = ServiceCall(
        request=request,
        prefetch=prefetch.values,
        unavailable=prefetch.unavailable,
        deadline=deadline,
        client=client,
        incomplete=prefetch.incomplete,
        encounter_keys=service.encounter_keys,
        explainer=partial(explanation_link, service) if service.explanation is not None else None,
    )
    try:
        with model_deadline(deadline - reserve_ms / 1000):
            return ServiceRun(service.cards(call), "cards", call.dropped, call.incomplete)
    except ModelUnavailable as exc:
        reason = exc.reason
    except InferenceError:
        reason = "invalid-input"
        log.warning("service %s gave its model input it rejects", service.id)
    except Exception as exc:
        reason = "error"
        log.error("service %s failed: %s", service.id, describe(exc))
    FALLBACKS.labels(service.id, reason).inc()
    return ServiceRun(fallback_cards(service, call, reason), f"fallback:{reason}", call.dropped, call.incomplete)
