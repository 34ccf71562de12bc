"""Declaring CDS services: one decorator next to the function that builds the cards; discovery comes from it."""

from __future__ import annotations

import importlib
import pkgutil
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from app.cds.cards import Card
from app.cds.clients import TrustedClient
from app.cds.prefetch import ALL_PAGES, FIRST_PAGE, check_template, screen, tokens
from app.cds.request import HookRequest

_SERVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class PrefetchKey:
    """A prefetch template; whether its absence fails the call (412) or is left to the service; and whether the
    service needs every page of a search (``"all"``) or the first is enough (``"first"``: the template sorts what
    matters first, so further pages are never fetched)."""

    template: str
    required: bool = True
    pages: Literal["all", "first"] = ALL_PAGES

    def __post_init__(self) -> None:
        if self.pages not in (ALL_PAGES, FIRST_PAGE):
            raise ValueError(f"prefetch pages must be {ALL_PAGES!r} or {FIRST_PAGE!r}, not {self.pages!r}")

    @property
    def encounter_scoped(self) -> bool:
        """Whether the template reads one encounter's data, so that what it gives must belong to that encounter."""
        return "context.encounterId" in tokens(self.template)


@dataclass
class ServiceCall:
    """What a service's card function receives: the validated request and the resolved prefetch.

    The prefetch is screened when the call is made: resources of another patient (or, under ``encounter_keys``,
    another encounter) are left out of ``prefetch``, ``resources()`` and ``request.prefetch`` alike, and
    ``dropped`` counts them per key. ``incomplete`` names keys that hold fewer pages than the server has.
    """

    request: HookRequest
    prefetch: dict[str, Any]
    unavailable: frozenset[str] = frozenset()
    deadline: float = field(default_factory=lambda: time.monotonic() + 0.5)
    client: TrustedClient | None = None  # the authenticated caller; None when CDS_AUTH is off
    incomplete: frozenset[str] = frozenset()
    encounter_keys: frozenset[str] = frozenset()
    dropped: dict[str, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.prefetch, self.dropped = screen(self.prefetch, self.request, self.encounter_keys)
        self.request = replace(self.request, prefetch=self.prefetch)

    @property
    def context(self) -> dict[str, Any]:
        return self.request.context

    def resources(self, key: str) -> list[dict[str, Any]]:
        """The resources under a prefetch key: a lone resource, or a Bundle's entries; [] when none."""
        value = self.prefetch.get(key)
        if not isinstance(value, dict):
            return []
        if value.get("resourceType") != "Bundle":
            return [value]
        return [
            e["resource"]
            for e in value.get("entry") or ()
            if isinstance(e, dict)
            and isinstance(e.get("resource"), dict)
            and e["resource"].get("resourceType") != "OperationOutcome"
        ]

    def remaining(self) -> float:
        """Seconds left before this call's deadline (never negative)."""
        return max(0.0, self.deadline - time.monotonic())


CardsFunction = Callable[[ServiceCall], list[Card]]
FallbackFunction = Callable[[ServiceCall, str], list[Card]]


@dataclass(frozen=True)
class CdsService:
    """One CDS service as declared with ``@cds_service``."""

    id: str
    hook: str
    title: str
    description: str
    prefetch: dict[str, PrefetchKey]
    cards: CardsFunction
    fallback: FallbackFunction | None = None
    budget_ms: int | None = None
    usage_requirements: str | None = None

    @property
    def encounter_keys(self) -> frozenset[str]:
        """The prefetch keys whose templates read one encounter's data."""
        return frozenset(key for key, spec in self.prefetch.items() if spec.encounter_scoped)

    def discovery_entry(self) -> dict[str, Any]:
        """This service's entry in ``GET /cds-services`` (R-4), without empty members (R-2)."""
        entry: dict[str, Any] = {
            "hook": self.hook,
            "title": self.title,
            "description": self.description,
            "id": self.id,
        }
        if self.prefetch:
            entry["prefetch"] = {key: p.template for key, p in self.prefetch.items()}
        if self.usage_requirements:
            entry["usageRequirements"] = self.usage_requirements
        return entry


_REGISTRY: dict[str, CdsService] = {}


def cds_service(
    *,
    id: str,  # noqa: A002 - the spec's name
    hook: str,
    title: str,
    description: str,
    prefetch: dict[str, PrefetchKey | str] | None = None,
    fallback: FallbackFunction | None = None,
    budget_ms: int | None = None,
    usage_requirements: str | None = None,
) -> Callable[[CardsFunction], CardsFunction]:
    """Register the decorated function as the card builder of a CDS service."""
    if not _SERVICE_ID.match(id):
        raise ValueError(f"service id {id!r} is not URL-safe")

    def register(fn: CardsFunction) -> CardsFunction:
        if id in _REGISTRY and _REGISTRY[id].cards is not fn:
            raise ValueError(f"service id {id!r} is declared twice")
        keys = {k: v if isinstance(v, PrefetchKey) else PrefetchKey(v) for k, v in (prefetch or {}).items()}
        for key in keys.values():
            check_template(key.template)
        _REGISTRY[id] = CdsService(
            id=id,
            hook=hook,
            title=title,
            description=description,
            prefetch=keys,
            cards=fn,
            fallback=fallback,
            budget_ms=budget_ms,
            usage_requirements=usage_requirements,
        )
        return fn

    return register


def load_services(package: str = "cds_services") -> None:
    """Import every module of ``package`` so that their declarations register themselves."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{package}."):
        if not info.name.rsplit(".", 1)[-1].startswith("_"):
            importlib.import_module(info.name)


def services() -> Iterator[CdsService]:
    return iter(_REGISTRY.values())


def get_service(service_id: str) -> CdsService | None:
    return _REGISTRY.get(service_id)


def unregister(service_id: str) -> CdsService | None:
    """Remove a declared service (tests that declare their own); the removed declaration, or None."""
    return _REGISTRY.pop(service_id, None)
