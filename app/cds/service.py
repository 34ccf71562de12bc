"""Declaring CDS services: one decorator next to the function that builds the cards; discovery comes from it."""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from app.batch.scoring import Population, export_scope
from app.cds.cards import Card, Link
from app.cds.clients import TrustedClient
from app.cds.prefetch import ALL_PAGES, FIRST_PAGE, check_template, screen, tokens
from app.cds.request import HookRequest

if TYPE_CHECKING:
    from flask import Flask

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
    # Stores a result for this call's service and returns its explanation link (set by the framework: app.results).
    explainer: Callable[[ServiceCall, Any], Link | None] | None = field(default=None, repr=False)

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

    def explain(self, data: Any) -> Link | None:
        """Store ``data`` as this call's result and return the SMART link to its explanation page; None when the
        result cannot be stored now (a database outage must not cost the clinician the card) or outside a hook."""
        return self.explainer(self, data) if self.explainer is not None else None


CardsFunction = Callable[[ServiceCall], list[Card]]
FallbackFunction = Callable[[ServiceCall, str], list[Card]]
# Builds the template's variables from a stored result and the SMART launch (app.smart.pages.LaunchContext).
ExplanationView = Callable[[Any, Any], dict[str, Any]]
# Builds the guard in front of a model the service brings (app.ai.make_guard), once per application.
ModelFactory = Callable[["Flask"], Any]


@dataclass(frozen=True)
class Explanation:
    """The page a service's cards link to: the link's label, the page title, a Jinja2 template rendered inside
    the SMART app's common frame (``{% extends "smart/base.html" %}``), and ``view(result, context)``, which
    turns the stored result and the launch into the template's variables.

    The template is looked up in ``app/templates/`` and then in the ``templates/`` folder next to the declaring
    module (``template_folder``, filled in at declaration), so a service can bring its one template with it."""

    label: str
    title: str
    template: str
    view: ExplanationView
    template_folder: str | None = None


@dataclass(frozen=True)
class Setting:
    """An environment variable a service reads, validated at start by app.config with the others: ``type`` is
    int, float, bool, str or ``"url"`` (an absolute http(s) URL); ``low``/``high`` bound numbers; a ``secret``
    may also come from ``NAME_FILE``. Its value is in ``app.config[NAME]``."""

    type: type | str
    default: Any = None
    low: float | None = None
    high: float | None = None
    secret: bool = False

    def __post_init__(self) -> None:
        if self.type not in (int, float, bool, str, "url"):
            raise ValueError(f"a setting's type is int, float, bool, str or 'url', not {self.type!r}")


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
    explanation: Explanation | None = None
    settings: Mapping[str, Setting] = field(default_factory=dict)
    models: Mapping[str, ModelFactory] = field(default_factory=dict)
    population: Population | None = None

    @property
    def export_scope(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The Bulk Data ``_type`` and ``_typeFilter`` that read what this service's prefetch reads."""
        extra = self.population.extra_types if self.population else ()
        return export_scope((p.template for p in self.prefetch.values()), extra)

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
    explanation: Explanation | None = None,
    settings: Mapping[str, Setting] | None = None,
    models: Mapping[str, ModelFactory] | None = None,
    population: Population | None = None,
) -> Callable[[CardsFunction], CardsFunction]:
    """Register the decorated function as the card builder of a CDS service, with what the service brings: the
    page its cards link to (``explanation``), the environment variables it reads (``settings``), the models it
    serves itself (``models``: name to guard factory, reached through ``app.ai.infer``) and how it scores a
    population from a Bulk Data export (``population``, see ``app.batch.scoring``)."""
    if not _SERVICE_ID.match(id):
        raise ValueError(f"service id {id!r} is not URL-safe")
    for name in settings or {}:
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            raise ValueError(f"setting name {name!r} is not an environment variable name")

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
            explanation=_with_folder(explanation, fn),
            settings=dict(settings or {}),
            models=dict(models or {}),
            population=population,
        )
        if population is not None:
            _REGISTRY[id].export_scope  # noqa: B018 - a template a batch cannot run fails at declaration
        return fn

    return register


def _with_folder(explanation: Explanation | None, fn: Callable) -> Explanation | None:
    """The explanation with its template folder: ``templates/`` next to the module that declares the service."""
    if explanation is None or explanation.template_folder is not None:
        return explanation
    module_file = getattr(sys.modules.get(fn.__module__), "__file__", None)
    folder = Path(module_file).parent / "templates" if module_file else None
    return replace(explanation, template_folder=str(folder) if folder and folder.is_dir() else None)


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


def declared_settings() -> dict[str, Setting]:
    """Every setting the services declare (they are loaded first), by variable name; a name two services declare
    differently is a programming error."""
    load_services()
    found: dict[str, Setting] = {}
    for service in _REGISTRY.values():
        for name, setting in service.settings.items():
            if found.setdefault(name, setting) != setting:
                raise ValueError(f"setting {name} is declared differently by two services")
    return found


def unregister(service_id: str) -> CdsService | None:
    """Remove a declared service (tests that declare their own); the removed declaration, or None."""
    return _REGISTRY.pop(service_id, None)
