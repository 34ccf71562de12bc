"""Prefetch (R-11..R-15): render templates, keep what the client sent, fetch what it did not, in parallel; then
keep only what belongs to the patient (and encounter) in context."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from app.cds.errors import PrefetchUnavailable
from app.cds.request import HookRequest
from app.fhir.client import Client, FhirError, FhirNotFound, next_link
from app.fhir.compartment import BundleAliases, Compartment, as_read_from, shared_base
from app.logs import describe

log = logging.getLogger(__name__)

# How much of a search a prefetch key needs: every page, or the first (its template sorts what matters first).
ALL_PAGES, FIRST_PAGE = "all", "first"
MAX_PAGES = 50
_TOKEN = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
USER_TOKENS = {
    "userPractitionerId": "Practitioner",
    "userPractitionerRoleId": "PractitionerRole",
    "userPatientId": "Patient",
    "userRelatedPersonId": "RelatedPerson",
}


class TemplateUnresolvable(Exception):
    """A template token has no value in this call's context (e.g. userPractitionerId for a PractitionerRole)."""


def check_template(template: str) -> None:
    """Refuse, at declaration time, a template that uses tokens CDS Hooks 2.0 does not define."""
    for token in _TOKEN.findall(template):
        if not (token in USER_TOKENS or re.fullmatch(r"context\.[A-Za-z0-9_]+", token)):
            raise ValueError(f"prefetch template {template!r} uses unknown token {{{{{token}}}}}")
    rest = _TOKEN.sub("", template)
    if "{{" in rest or "}}" in rest:
        raise ValueError(f"prefetch template {template!r} has an unterminated token")


def tokens(template: str) -> set[str]:
    """The tokens a template uses, e.g. ``{"context.patientId"}``."""
    return set(_TOKEN.findall(template))


def _token_value(token: str, context: dict[str, Any]) -> str:
    if token.startswith("context."):
        value = context.get(token[len("context.") :])
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or value == "":
            raise TemplateUnresolvable(token)
        return str(value)
    user = context.get("userId")
    resource_type, _, user_id = user.partition("/") if isinstance(user, str) else ("", "", "")
    if resource_type != USER_TOKENS.get(token) or not user_id:
        raise TemplateUnresolvable(token)
    return user_id


def render(template: str, context: dict[str, Any]) -> str:
    """Substitute every token; values are percent-encoded so that context cannot inject query parameters."""
    return _TOKEN.sub(lambda m: quote(_token_value(m.group(1), context), safe=""), template)


def is_failure(value: Any) -> bool:
    """True for an OperationOutcome, or a Bundle holding only OperationOutcomes: the client's prefetch failed.
    A search Bundle whose outcomes are notes (``search.mode`` ``outcome``, no error or fatal issue) is an
    answer, usually an empty one: FHIR R4 3.1.1.4 (Bundle.entry.search.mode) and 3.1.1.6 (search errors)."""
    if not isinstance(value, dict):
        return False
    if value.get("resourceType") == "OperationOutcome":
        return True
    if value.get("resourceType") == "Bundle":
        entries = (
            [e for e in value.get("entry") or () if isinstance(e, dict)] if isinstance(value.get("entry"), list) else []
        )
        outcomes = [e for e in entries if _resource_type(e) == "OperationOutcome"]
        if not entries or len(outcomes) < len(entries):
            return False
        return any(not _search_note(e) for e in outcomes)
    return False


def _resource_type(entry: dict[str, Any]) -> Any:
    resource = entry.get("resource")
    return resource.get("resourceType") if isinstance(resource, dict) else None


def _search_note(entry: dict[str, Any]) -> bool:
    """An OperationOutcome entry a server adds to a search answer as a note: mode ``outcome``, no error in it."""
    search = entry.get("search")
    issues = entry["resource"].get("issue")
    return (
        isinstance(search, dict)
        and search.get("mode") == "outcome"
        and isinstance(issues, list)
        and all(isinstance(i, dict) and i.get("severity") in ("information", "warning") for i in issues)
    )


@dataclass(frozen=True)
class PrefetchResult:
    """What each key resolved to; keys that could not be had at all, and keys that hold fewer pages than exist."""

    values: dict[str, Any]
    unavailable: frozenset[str]
    incomplete: frozenset[str] = frozenset()


def screen(
    values: dict[str, Any], request: HookRequest, encounter_keys: frozenset[str] = frozenset()
) -> tuple[dict[str, Any], dict[str, int]]:
    """The prefetch without resources of another patient (or, for ``encounter_keys``, another encounter), and how
    many were left out per key. A lone resource that does not belong becomes None. Without ``fhirServer``, the
    server is the one base every absolute ``fullUrl`` names, if they agree (ADR 0003)."""
    server = request.fhir_server or shared_base(values.values())
    patient = Compartment(request.patient_id, server, BundleAliases(values.values()))
    encounter = patient.of_encounter(request.encounter_id) if encounter_keys else patient
    screened: dict[str, Any] = {}
    dropped: dict[str, int] = {}
    for key, value in values.items():
        screened[key], count = (encounter if key in encounter_keys else patient).screen(value)
        if count:
            dropped[key] = count
    return screened, dropped


class _Pages:
    """The pages of one search read so far, kept so that a paging failure or the deadline loses none of them."""

    def __init__(self, first: dict[str, Any] | None = None):
        self._pages: list[dict[str, Any]] = [first] if first is not None else []

    def add(self, page: dict[str, Any]) -> None:
        self._pages.append(page)  # one append: atomic, so the resolver may read while the pager adds

    def last(self) -> dict[str, Any]:
        return self._pages[-1]

    def merged(self) -> dict[str, Any] | None:
        """One Bundle with every page's entries and no paging links; None before the first page."""
        pages = list(self._pages)
        if not pages:
            return None
        entries = [e for page in pages for e in (page.get("entry") if isinstance(page.get("entry"), list) else ())]
        merged = {k: v for k, v in pages[0].items() if k not in ("link", "entry")}
        if entries:
            merged["entry"] = entries
        return merged


@dataclass
class _Plan:
    """One call's prefetch while it is resolved: values known, fetches to run (with the pages each has read so
    far), keys that cannot be had and why, keys that hold fewer pages than the server has."""

    values: dict[str, Any] = field(default_factory=dict)
    jobs: dict[str, Callable[[], Any]] = field(default_factory=dict)
    pages: dict[str, _Pages] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    incomplete: set[str] = field(default_factory=set)

    def settle(self, key: str, future: Future) -> None:
        """Take a fetch's outcome; after a failure or the deadline, the pages read so far are used as incomplete."""
        if not future.done():
            future.cancel()
            why = "the FHIR server did not answer within the deadline"
        elif future.exception() is not None:
            why = str(future.exception())
        else:
            self.values[key] = future.result()
            return
        partial = self.pages[key].merged()
        if partial is None:
            self.unavailable[key] = why
        else:  # what was sent, or the pages read before the failure
            self.values[key] = partial
            self.incomplete.add(key)


@dataclass(frozen=True)
class FhirAccess:
    """Whether and how this call may reach the client's FHIR server."""

    client: Client | None
    why_not: str = ""
    allows: Callable[[str], bool] = lambda _url: False


def fhir_access(
    request: HookRequest, allows: Callable[[str], bool], allow_anonymous: bool, session, timeout: float
) -> FhirAccess:
    """A FHIR client for this call, if ``fhirServer`` is allowlisted and there is a token (or anonymous is on)."""
    server = request.fhir_server
    if not server:
        return FhirAccess(None, "no fhirServer in the request")
    if not allows(server):
        # Server-side request forgery guard: never fetch from a server the client is not trusted for.
        return FhirAccess(None, "fhirServer is not allowlisted for this client")
    token = request.fhir_authorization.access_token if request.fhir_authorization else None
    if token is None and not allow_anonymous:
        return FhirAccess(None, "no fhirAuthorization in the request")
    return FhirAccess(Client(server, token, session, timeout), allows=allows)


class PrefetchResolver:
    """Resolves a service's prefetch for one call, inside the call's deadline."""

    def __init__(self, executor: ThreadPoolExecutor):
        self._executor = executor

    def resolve(
        self,
        templates: dict,
        request: HookRequest,
        access: FhirAccess,
        deadline: float,
        on_fetch: Callable[[dict[str, Any]], None] = lambda _record: None,
    ) -> PrefetchResult:
        """Keep sent values (``null`` included), fetch absent or failed keys, raise 412 for required gaps.

        A sent first page is enough for a key declared ``pages="first"``; for the others the rest is fetched, and
        when that fails or runs out of time, the pages read so far are used and the key is marked incomplete.
        ``on_fetch`` receives one record per FHIR fetch (key, outcome, latency) for the audit log.
        """
        plan = _Plan()
        for key, spec in templates.items():
            self._plan_key(plan, key, spec, request, access, deadline)
        self._fail_if_required(templates, plan.unavailable)
        futures = {key: self._executor.submit(self._timed, key, job, on_fetch) for key, job in plan.jobs.items()}
        wait(futures.values(), timeout=max(0.0, deadline - time.monotonic()))
        for key, future in futures.items():
            plan.settle(key, future)
        self._fail_if_required(templates, plan.unavailable)
        return PrefetchResult(plan.values, frozenset(plan.unavailable), frozenset(plan.incomplete))

    def _plan_key(self, plan: _Plan, key: str, spec, request: HookRequest, access: FhirAccess, deadline: float) -> None:
        """Decide for one key: the value as sent, the rest of its pages, a fetch, or why it is unavailable."""
        sent = request.prefetch.get(key, ...)
        if sent is None:
            plan.values[key] = None  # the client knows there is nothing: never refetch
        elif sent is not ... and not is_failure(sent):
            if next_link(sent) is None or spec.pages == FIRST_PAGE:
                plan.values[key] = sent
                return
            plan.pages[key] = _Pages(sent)
            if access.client is None:
                plan.values[key] = plan.pages[key].merged()
                plan.incomplete.add(key)
            else:
                plan.jobs[key] = self._pager(access, plan.pages[key], deadline)
        elif access.client is None:
            plan.unavailable[key] = access.why_not
        else:
            try:
                query = render(spec.template, request.context)
            except TemplateUnresolvable as exc:
                plan.unavailable[key] = f"template token {exc} has no value in this context"
                return
            plan.pages[key] = _Pages()
            plan.jobs[key] = self._fetcher(access, query, spec.pages, plan.pages[key], deadline)

    @staticmethod
    def _fail_if_required(templates: dict, unavailable: dict[str, str]) -> None:
        missing = [key for key in templates if key in unavailable and templates[key].required]
        if missing:
            key = missing[0]
            raise PrefetchUnavailable(
                f"Required prefetch {key!r} is not in the request and could not be fetched: {unavailable[key]}",
                f"prefetch.{key}",
            )

    @staticmethod
    def _fetcher(
        access: FhirAccess, query: str, pages_needed: str, pages: _Pages, deadline: float
    ) -> Callable[[], Any]:
        def fetch():
            if "?" in query or "/" not in query.strip("/"):
                first = as_read_from(access.client.get(query, deadline))
                if pages_needed == FIRST_PAGE or first.get("resourceType") != "Bundle" or is_failure(first):
                    return first
                pages.add(first)
                return _follow(access, pages, deadline, ours=True)
            try:
                return access.client.get(query, deadline)
            except FhirNotFound:
                return None  # the server says there is no such resource: the same as a null prefetch

        return fetch

    @staticmethod
    def _pager(access: FhirAccess, pages: _Pages, deadline: float) -> Callable[[], Any]:
        return lambda: _follow(access, pages, deadline, ours=False)

    @staticmethod
    def _timed(key: str, job: Callable[[], Any], on_fetch: Callable[[dict[str, Any]], None]) -> Any:
        started = time.perf_counter()
        outcome = "ok"
        try:
            value = job()
            if is_failure(value):
                raise FhirError("the FHIR server answered with an OperationOutcome")
            return value
        except FhirError as exc:
            outcome = type(exc).__name__
            raise
        except Exception as exc:  # a bug must not leak as a 500; the key is unavailable and we say why
            outcome = type(exc).__name__
            log.error("prefetch fetch for key %s failed: %s", key, describe(exc))
            raise FhirError(f"fetch failed: {type(exc).__name__}") from None
        finally:
            latency_ms = round((time.perf_counter() - started) * 1000, 1)
            on_fetch({"key": key, "outcome": outcome, "latency_ms": latency_ms})


def _follow(access: FhirAccess, pages: _Pages, deadline: float, *, ours: bool) -> dict[str, Any]:
    """Read the ``next`` pages into ``pages``; all of them merged. A page is read only from under the hook's
    ``fhirServer`` (the access token was issued for that server, not for every server the client may name), and
    must be a search answer. Pages of a search the service made are the server's answer (``as_read_from``); those
    a client's next link leads to keep their entries' ``fullUrl``s, checked like anything the client sent: the
    link may name a stored Bundle of another server's resources."""
    count = 1
    while (url := next_link(pages.last())) is not None:
        if count >= MAX_PAGES:
            raise FhirError(f"search has more than {MAX_PAGES} pages")
        if not (access.allows(url) and access.client.holds(url)):
            raise FhirError("next link points outside the request's FHIR server")
        page = access.client.get(url, deadline)
        if page.get("resourceType") != "Bundle" or page.get("type") != "searchset":
            raise FhirError("a next page was not a search answer (a searchset Bundle)")
        pages.add(as_read_from(page) if ours else page)
        count += 1
    return pages.merged()
