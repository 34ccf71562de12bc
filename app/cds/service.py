"""Declaring CDS services: one decorator next to the function that builds the cards; discovery comes from it."""

from __future__ import annotations

import importlib
import pkgutil
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from app.cds.cards import Card
from app.cds.clients import TrustedClient
from app.cds.prefetch import check_template
from app.cds.request import HookRequest

_SERVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class PrefetchKey:
    """A prefetch template and whether its absence fails the call (412) or is left to the service."""

    template: str
    required: bool = True


@dataclass
class ServiceCall:
    """What a service's card function receives: the validated request and the resolved prefetch."""

    request: HookRequest
    prefetch: dict[str, Any]
    unavailable: frozenset[str] = frozenset()
    deadline: float = field(default_factory=lambda: time.monotonic() + 0.5)
    client: TrustedClient | None = None  # the authenticated caller; None when CDS_AUTH is off

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
