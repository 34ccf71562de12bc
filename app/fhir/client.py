"""A small FHIR R4 REST client: pooled connections, a timeout on every call, searchset paging."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import orjson
import requests

from app import http

FHIR_JSON = "application/fhir+json"
DECODE_ROUNDS = 4  # percent-decodings of a path segment before one that still changes is refused


class FhirError(Exception):
    """A FHIR call failed: unreachable, timed out, an error status, or a body that is not FHIR JSON."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class FhirNotFound(FhirError):
    """The server answered 404 or 410: the resource does not exist."""


class DeadlineExceeded(FhirError):
    """The caller's deadline passed before the answer was complete."""


class UnusablePaging(FhirError):
    """The server's paging cannot be followed: a next link off the allowed base, a page that is not a Bundle, or
    more pages than allowed. Its own answer, so asking again gets the same."""


def pooled_session(pool_size: int = 32) -> requests.Session:
    """A Session for FHIR calls: pooled for concurrent prefetch fetches, asking for FHIR JSON."""
    session = http.pooled_session(pool_size)
    session.headers["Accept"] = FHIR_JSON
    return session


# Sends one HTTP request with our credentials: (method, url, **requests kwargs) -> Response. The SMART Backend
# Services client is one (it adds its token and retries once on 401).
Sender = Callable[..., requests.Response]
# Told of every request made (e.g. to audit it): method, resourceType, interaction, server, status or outcome,
# latency_ms. Never the URL's query or any content.
Observer = Callable[[dict[str, Any]], None]


class Client:
    """FHIR REST calls against one base URL, with one bearer token, a credentialed ``send``, or neither."""

    def __init__(
        self,
        base: str,
        token: str | None,
        session: requests.Session,
        timeout: float = 5.0,
        send: Sender | None = None,
        observe: Observer | None = None,
    ):
        self.base = base.rstrip("/") + "/"
        self._token = token
        self._session = session
        self._timeout = timeout
        self._send = send
        self._observe = observe

    def __repr__(self) -> str:  # never show the token
        return f"Client({self.base!r})"

    def holds(self, url: str) -> bool:
        """Whether an absolute URL (a search's next page, say) is under this client's base, compared decoded."""
        return url.startswith(self.base) and _stays_under_base(url[len(self.base) :], url, self.base)

    def _request(self, method: str, url: str, timeout: float, headers: dict[str, str] | None = None, **kwargs):
        if self._observe is None:
            return self._send_request(method, url, timeout, headers, **kwargs)
        started = time.monotonic()
        try:
            response = self._send_request(method, url, timeout, headers, **kwargs)
        except requests.RequestException as exc:
            outcome = "timeout" if isinstance(exc, requests.Timeout) else "unreachable"
            self._observe(self._call(method, url, started, outcome=outcome))
            raise
        self._observe(self._call(method, url, started, status=response.status_code))
        return response

    def _call(self, method: str, url: str, started: float, **result) -> dict[str, Any]:
        """What an observer is told of one request: the resource type and interaction, never ids or queries."""
        resource_type, interaction = _interaction(method, url[len(self.base) :] if url.startswith(self.base) else "")
        parts = urlsplit(self.base)
        return {
            "method": method,
            "resourceType": resource_type,
            "interaction": interaction,
            "server": f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname,
            **result,
            "latency_ms": round((time.monotonic() - started) * 1000, 1),
        }

    def _send_request(self, method: str, url: str, timeout: float, headers: dict[str, str] | None, **kwargs):
        headers = {"Accept": FHIR_JSON, **(headers or {})}
        if self._send is not None:
            return self._send(method, url, headers=headers, timeout=timeout, allow_redirects=False, **kwargs)
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return self._session.request(method, url, headers=headers, timeout=timeout, allow_redirects=False, **kwargs)

    def create(self, resource: dict[str, Any], if_none_exist: str | None = None) -> tuple[dict[str, Any], bool]:
        """POST ``resource``; with ``if_none_exist`` (a search query) a conditional create, so that a re-run
        finds the first write instead of making a second. Returns (the stored resource, whether it was new)."""
        url = urljoin(self.base, resource["resourceType"])
        headers = {"Content-Type": FHIR_JSON, "Prefer": "return=representation"}
        if if_none_exist:
            headers["If-None-Exist"] = if_none_exist
        try:
            response = self._request("POST", url, self._timeout, headers, data=orjson.dumps(resource))
        except requests.Timeout:
            raise DeadlineExceeded("FHIR server did not answer in time") from None
        except requests.RequestException as exc:
            raise FhirError(f"FHIR server unreachable: {type(exc).__name__}") from None
        if response.status_code not in (200, 201):
            raise FhirError(f"FHIR server answered {response.status_code} to a create", response.status_code)
        stored = _json_or_empty(response)
        if not stored.get("id"):  # return=minimal servers: read what was stored (an existing match, maybe)
            parts = (response.headers.get("Location") or "").split("/_history/")[0].rstrip("/").split("/")
            if len(parts) < 2 or parts[-2] != resource["resourceType"]:
                raise FhirError("FHIR server answered a create without the resource or its Location")
            stored = self.get(f"{resource['resourceType']}/{parts[-1]}")
        return stored, response.status_code == 201

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a transaction (or batch) Bundle to the base; the response Bundle. All or nothing on the server's
        side for a transaction; an error status, a timeout or an unreachable server raises FhirError."""
        headers = {"Content-Type": FHIR_JSON}
        try:
            response = self._request("POST", self.base, self._timeout, headers, data=orjson.dumps(bundle))
        except requests.Timeout:
            raise DeadlineExceeded("FHIR server did not answer the transaction in time") from None
        except requests.RequestException as exc:
            raise FhirError(f"FHIR server unreachable: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise FhirError(f"FHIR server answered {response.status_code} to a transaction", response.status_code)
        return _json_or_empty(response)

    def get(self, path_or_url: str, deadline: float | None = None) -> dict[str, Any]:
        """GET a resource or a search, relative to the base or absolute; bounded by ``deadline`` (monotonic)."""
        url = urljoin(self.base, path_or_url)
        if not urlsplit(path_or_url).scheme and not _stays_under_base(path_or_url, url, self.base):
            raise FhirError("a relative FHIR path must stay under the server's base URL")
        timeout = self._timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise DeadlineExceeded("deadline passed before the request was sent")
        try:
            response = self._request("GET", url, timeout)
        except requests.Timeout:
            raise DeadlineExceeded("FHIR server did not answer in time") from None
        except requests.RequestException as exc:
            raise FhirError(f"FHIR server unreachable: {type(exc).__name__}") from None
        if response.status_code in (404, 410):
            raise FhirNotFound("resource not found", response.status_code)
        if response.status_code != 200:
            raise FhirError(f"FHIR server answered {response.status_code}", response.status_code)
        body = _loads(response.content)
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
                raise UnusablePaging(f"search has more than {max_pages} pages")
            if allow_url is not None and not allow_url(next_url):
                raise UnusablePaging("next link points outside the allowed FHIR server")
            page = self.get(next_url, deadline)
            pages += 1
            if page.get("resourceType") != "Bundle":
                raise UnusablePaging("a next page was not a Bundle")
            entries.extend(page.get("entry") or ())
        merged = {k: v for k, v in bundle.items() if k not in ("link", "entry")}
        if entries:
            merged["entry"] = entries
        return merged


def _stays_under_base(relative: str, url: str, base: str) -> bool:
    """Whether a relative reference stays under ``base``: not rooted ("/x"), and no segment that is, or decodes
    to, a dot segment, a "/" or a "\\" ("Encounter/../../admin", "..%2fadmin" or Tomcat's "..;" would take our
    token elsewhere on the server)."""
    path = urlsplit(relative).path
    if not url.startswith(base) or path.startswith("/"):
        return False
    return not any(_leaves_base(segment) for segment in path.split("/"))


def _leaves_base(segment: str) -> bool:
    """Whether one path segment may climb or split on some server: percent-decoded until stable (``%252e`` is
    ``.`` to a server that decodes twice) and without its ``;parameters``, it is "." or "..", or dots alone once
    the spaces, controls and trailing dots some servers trim are gone (IIS reads ``.. `` and ``...`` as ``..``),
    or it holds a "/" or a "\\"; one that still decodes after ``DECODE_ROUNDS`` rounds is refused too."""
    for _ in range(DECODE_ROUNDS):
        decoded = unquote(segment)
        if decoded == segment:
            name = segment.split(";")[0]
            trimmed = "".join(c for c in name if c.isprintable() and not c.isspace())
            dots_only = bool(name) and trimmed.strip(".") == ""
            return dots_only or "/" in segment or "\\" in segment
        segment = decoded
    return True


def _interaction(method: str, relative: str) -> tuple[str | None, str]:
    """(resource type, FHIR interaction) of a request to ``relative`` under the base: ``Encounter/1`` is a read,
    ``Condition?...`` a search, a POST of a type a create; a paging URL of the server's own shape has no type."""
    path = urlsplit(relative).path
    segments = [segment for segment in path.split("/") if segment]
    resource_type = segments[0] if segments and segments[0][:1].isupper() and segments[0].isalnum() else None
    if method == "POST":
        return resource_type, "create" if len(segments) == 1 else "operation"
    if method == "GET":
        if resource_type and len(segments) == 2 and not segments[1].startswith(("_", "$")):
            return resource_type, "read"
        if resource_type and "_history" in segments:
            return resource_type, "vread"
        return resource_type, "search"
    return resource_type, method.lower()


def _loads(content: bytes) -> Any:
    """A FHIR server's JSON answer. orjson refuses text that is not valid Unicode, a lone surrogate escape
    ("\\ud800") included, which would otherwise fail much later, when a page or card holding it is encoded."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        if "surrogate" in str(exc):
            raise FhirError(
                "FHIR server answered with JSON holding a lone surrogate (an unpaired \\ud800-\\udfff)"
            ) from None
        raise FhirError("FHIR server answered with a body that is not JSON") from None


def _json_or_empty(response: requests.Response) -> dict[str, Any]:
    body = _loads(response.content) if response.content else {}
    return body if isinstance(body, dict) else {}


def next_link(bundle: dict[str, Any]) -> str | None:
    """The URL of a Bundle's ``next`` page, if any."""
    for link in bundle.get("link") or ():
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return link["url"]
    return None
