"""Prefetch (R-11..R-15): render templates, keep what the client sent, fetch what it did not, in parallel."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from app.cds.errors import PrefetchUnavailable
from app.cds.request import HookRequest
from app.fhir.client import Client, FhirError, FhirNotFound, next_link
from app.logs import describe

log = logging.getLogger(__name__)

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
    """True for an OperationOutcome, or a Bundle holding only OperationOutcomes: the client's prefetch failed."""
    if not isinstance(value, dict):
        return False
    if value.get("resourceType") == "OperationOutcome":
        return True
    if value.get("resourceType") == "Bundle":
        kinds = [(e.get("resource") or {}).get("resourceType") for e in value.get("entry") or () if isinstance(e, dict)]
        return bool(kinds) and all(k == "OperationOutcome" for k in kinds)
    return False


@dataclass(frozen=True)
class PrefetchResult:
    values: dict[str, Any]
    unavailable: frozenset[str]


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

        ``on_fetch`` receives one record per FHIR fetch (key, outcome, latency) for the audit log.
        """
        values: dict[str, Any] = {}
        jobs: dict[str, Callable[[], Any]] = {}
        unavailable: dict[str, str] = {}
        for key, spec in templates.items():
            sent = request.prefetch.get(key, ...)
            if sent is None:
                values[key] = None  # the client knows there is nothing: never refetch
            elif sent is not ... and not is_failure(sent):
                if next_link(sent) is None:
                    values[key] = sent
                elif access.client is not None:
                    jobs[key] = self._pager(access, sent, deadline)
                else:
                    unavailable[key] = "sent incomplete (paged) and " + access.why_not
            elif access.client is None:
                unavailable[key] = access.why_not
            else:
                try:
                    query = render(spec.template, request.context)
                except TemplateUnresolvable as exc:
                    unavailable[key] = f"template token {exc} has no value in this context"
                    continue
                jobs[key] = self._fetcher(access, query, deadline)
        self._fail_if_required(templates, unavailable)
        futures = {key: self._executor.submit(self._timed, key, job, on_fetch) for key, job in jobs.items()}
        wait(futures.values(), timeout=max(0.0, deadline - time.monotonic()))
        for key, future in futures.items():
            if not future.done():
                future.cancel()
                unavailable[key] = "the FHIR server did not answer within the deadline"
            elif future.exception() is not None:
                unavailable[key] = str(future.exception())
            else:
                values[key] = future.result()
        self._fail_if_required(templates, unavailable)
        return PrefetchResult(values, frozenset(unavailable))

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
    def _fetcher(access: FhirAccess, query: str, deadline: float) -> Callable[[], Any]:
        def fetch():
            if "?" in query or "/" not in query.strip("/"):
                return access.client.search_all(query, deadline, allow_url=access.allows)
            try:
                return access.client.get(query, deadline)
            except FhirNotFound:
                return None  # the server says there is no such resource: the same as a null prefetch

        return fetch

    @staticmethod
    def _pager(access: FhirAccess, bundle: dict[str, Any], deadline: float) -> Callable[[], Any]:
        return lambda: access.client.complete_bundle(bundle, deadline, allow_url=access.allows)

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
