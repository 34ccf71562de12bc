"""A small FHIR R4 REST client: pooled connections, a timeout on every call, searchset paging."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urljoin

import orjson
import requests

from app import http

FHIR_JSON = "application/fhir+json"


class FhirError(Exception):
    """A FHIR call failed: unreachable, timed out, an error status, or a body that is not FHIR JSON."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class FhirNotFound(FhirError):
    """The server answered 404 or 410: the resource does not exist."""


class DeadlineExceeded(FhirError):
    """The caller's deadline passed before the answer was complete."""


def pooled_session(pool_size: int = 32) -> requests.Session:
    """A Session for FHIR calls: pooled for concurrent prefetch fetches, asking for FHIR JSON."""
    session = http.pooled_session(pool_size)
    session.headers["Accept"] = FHIR_JSON
    return session


class Client:
    """FHIR REST calls against one base URL, with one bearer token (or none)."""

    def __init__(self, base: str, token: str | None, session: requests.Session, timeout: float = 5.0):
        self.base = base.rstrip("/") + "/"
        self._token = token
        self._session = session
        self._timeout = timeout

    def __repr__(self) -> str:  # never show the token
        return f"Client({self.base!r})"

    def get(self, path_or_url: str, deadline: float | None = None) -> dict[str, Any]:
        """GET a resource or a search, relative to the base or absolute; bounded by ``deadline`` (monotonic)."""
        url = urljoin(self.base, path_or_url)
        timeout = self._timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise DeadlineExceeded("deadline passed before the request was sent")
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        try:
            response = self._session.get(url, headers=headers, timeout=timeout, allow_redirects=False)
        except requests.Timeout:
            raise DeadlineExceeded("FHIR server did not answer in time") from None
        except requests.RequestException as exc:
            raise FhirError(f"FHIR server unreachable: {type(exc).__name__}") from None
        if response.status_code in (404, 410):
            raise FhirNotFound("resource not found", response.status_code)
        if response.status_code != 200:
            raise FhirError(f"FHIR server answered {response.status_code}", response.status_code)
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise FhirError("FHIR server answered with a body that is not JSON") from None
        if not isinstance(body, dict) or "resourceType" not in body:
            raise FhirError("FHIR server answered with JSON that is not a FHIR resource")
        return body

    def search_all(
        self, path_or_url: str, deadline: float | None = None, max_pages: int = 50, allow_url=None
    ) -> dict[str, Any]:
        """GET a search and follow its ``next`` links; one searchset Bundle with every page's entries."""
        first = self.get(path_or_url, deadline)
        return self.complete_bundle(first, deadline, max_pages, allow_url)

    def complete_bundle(
        self, bundle: dict[str, Any], deadline: float | None = None, max_pages: int = 50, allow_url=None
    ) -> dict[str, Any]:
        """Follow ``bundle``'s ``next`` links (only to URLs ``allow_url`` accepts) and merge every page."""
        if bundle.get("resourceType") != "Bundle":
            return bundle
        entries = list(bundle.get("entry") or ())
        page, pages = bundle, 1
        while (next_url := next_link(page)) is not None:
            if pages >= max_pages:
                raise FhirError(f"search has more than {max_pages} pages")
            if allow_url is not None and not allow_url(next_url):
                raise FhirError("next link points outside the allowed FHIR server")
            page = self.get(next_url, deadline)
            pages += 1
            if page.get("resourceType") != "Bundle":
                raise FhirError("a next page was not a Bundle")
            entries.extend(page.get("entry") or ())
        merged = {k: v for k, v in bundle.items() if k not in ("link", "entry")}
        if entries:
            merged["entry"] = entries
        return merged


def next_link(bundle: dict[str, Any]) -> str | None:
    """The URL of a Bundle's ``next`` page, if any."""
    for link in bundle.get("link") or ():
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return link["url"]
    return None
