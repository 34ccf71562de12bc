"""A FHIR Bulk Data Access 2.0 client: kick-off, status polling, manifest, file download, error files, delete.

Plain functions and one class, no Flask and no database: the run orchestration decides when to call what and
stores what must survive a restart (the status URL the moment ``kick_off`` returns it, the manifest). The client
never sleeps: ``poll`` answers at once and ``next_poll_delay`` says when to ask again.

Credentials: every call to the FHIR server goes through ``send`` (``requests.Session.request``'s signature; in
production ``BackendServicesClient.request``, which adds the Backend Services token and renews it once on a 401).
The token goes only to the server's own origin (scheme, host, port of ``base``, plus ``token_origins``): a status
URL elsewhere is refused, and so is a file URL elsewhere when the manifest says files need the token. Files that
do not need it are fetched without any credentials, from any host, over HTTPS when the server is on HTTPS.
Exception messages and log lines name statuses, hosts and file URLs, never resource content.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urljoin, urlsplit

import orjson
import requests

from app import http
from app.batch.parts import open_private
from app.clock import SYSTEM_CLOCK, Clock
from app.fhir.client import FHIR_JSON, Sender
from app.private_files import private_folders

log = logging.getLogger(__name__)

NDJSON = "application/fhir+ndjson"
MIN_POLL_S = 1.0  # a Retry-After of 0 (or a backoff) never makes us poll in a tight loop
MAX_RETRY_AFTER_S = 3600.0  # a server asking for more is asked again after an hour anyway
BACKOFF_MAX_S = 60.0
PROGRESS_CHARS = 100  # the spec keeps X-Progress under 100 characters; we keep no more
DIAGNOSTICS_CHARS = 200
CHUNK_BYTES = 1 << 20
# IssueType codes under "transient" that mean "ask again later". "exception" is one too, but servers answer a
# failed export with it, so it counts as a failure.
TRANSIENT_CODES = frozenset({"transient", "lock-error", "no-store", "timeout", "incomplete", "throttled"})

_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_DELTA_SECONDS = re.compile(r"\d{1,10}(\.\d+)?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


# ---- errors ------------------------------------------------------------------------------------------------------


class BulkDataError(Exception):
    """Something about a Bulk Data export went wrong; the subclasses say what the caller should do."""


class ExportFailed(BulkDataError):
    """The export (or one call of it) failed. ``permanent``: asking again will not help (a refusal, a failed
    export, a malformed answer); otherwise retry later (the server or the network is down for now)."""

    def __init__(self, message: str, permanent: bool):
        super().__init__(message)
        self.permanent = permanent


class Busy(BulkDataError):
    """The server will not start an export now (429 or 503 to the kick-off). ``retry_after``: seconds the server
    asked us to wait, or None when it did not say (back off)."""

    def __init__(self, retry_after: float | None):
        super().__init__("the server is busy" + (f"; retry after {retry_after:.0f} s" if retry_after else ""))
        self.retry_after = retry_after


class FileExpired(ExportFailed):
    """A file of the manifest is gone (404 or 410): the export must be started again."""

    def __init__(self, url: str):
        super().__init__(f"export file expired or gone: {url}", permanent=True)
        self.url = url


# ---- what to export, and what the server says --------------------------------------------------------------------


@dataclass(frozen=True)
class ExportRequest:
    """What to export: the patients of ``group`` (all patients when None), resources of ``types`` (all when
    empty) narrowed by ``type_filters`` (FHIR searches such as ``Observation?code=...``; a resource matching any
    filter of its type is exported), changed after ``since`` (a FHIR instant)."""

    group: str | None
    types: tuple[str, ...]
    type_filters: tuple[str, ...] = ()
    since: str | None = None


@dataclass(frozen=True)
class KickOff:
    """An accepted kick-off: the status URL to poll, and whether the accepted request carried ``_typeFilter``
    (False: the server refused it, so the caller filters). A server may still ignore filters it accepted."""

    status_url: str
    filtered: bool


@dataclass(frozen=True)
class OutputFile:
    """One file of a manifest: its resource type, URL and, when the server says, how many resources it holds."""

    type: str
    url: str
    count: int | None = None

    def to_json(self) -> dict[str, Any]:
        item: dict[str, Any] = {"type": self.type, "url": self.url}
        if self.count is not None:
            item["count"] = self.count
        return item


@dataclass(frozen=True)
class Manifest:
    """The complete-status body: the export's ``transactionTime`` (the next incremental run's ``_since``), the
    kick-off ``request``, whether files need the token, the ``output`` files, the ``error`` files (NDJSON of
    OperationOutcomes) and, after a ``_since`` export, the ``deleted`` files (Bundles of deletions)."""

    transaction_time: str
    request: str
    requires_access_token: bool
    output: tuple[OutputFile, ...]
    error: tuple[OutputFile, ...] = ()
    deleted: tuple[OutputFile, ...] = ()

    @classmethod
    def from_json(cls, body: Any) -> Manifest:
        """A manifest from the server's JSON; ExportFailed (permanent) naming the first field that is wrong.

        Required fields must be there with their types. Absent ``error`` and ``deleted`` are empty, an absent
        ``request`` is "" (Bulk Data 3 drops it), and their file items may leave out ``type``."""
        if not isinstance(body, dict):
            raise _malformed("the body is not a JSON object")
        transaction_time = body.get("transactionTime")
        if not isinstance(transaction_time, str) or not _is_instant(transaction_time):
            raise _malformed("transactionTime is not a FHIR instant")
        request = body.get("request", "")
        if not isinstance(request, str):
            raise _malformed("request is not a string")
        requires_access_token = body.get("requiresAccessToken")
        if not isinstance(requires_access_token, bool):
            raise _malformed("requiresAccessToken is not a boolean")
        if not isinstance(body.get("output"), list):
            raise _malformed("output is not an array")
        return cls(
            transaction_time=transaction_time,
            request=request,
            requires_access_token=requires_access_token,
            output=_files(body, "output", None),
            error=_files(body, "error", "OperationOutcome"),
            deleted=_files(body, "deleted", "Bundle"),
        )

    def to_json(self) -> dict[str, Any]:
        """The manifest in the spec's shape (what ``from_json`` reads back)."""
        body: dict[str, Any] = {
            "transactionTime": self.transaction_time,
            "request": self.request,
            "requiresAccessToken": self.requires_access_token,
            "output": [item.to_json() for item in self.output],
            "error": [item.to_json() for item in self.error],
        }
        if self.deleted:
            body["deleted"] = [item.to_json() for item in self.deleted]
        return body


@dataclass(frozen=True)
class Pending:
    """The export is not complete: poll again after ``retry_after`` seconds (None: back off, see
    ``next_poll_delay``). ``progress`` is the server's X-Progress text; ``transient`` says why this poll did not
    get a status (429, 503, another 5xx, a transient OperationOutcome), None for an ordinary 202."""

    retry_after: float | None = None
    progress: str | None = None
    transient: str | None = None


@dataclass(frozen=True)
class Complete:
    """The export is complete: its manifest, and when its files expire (the Expires header, epoch seconds)."""

    manifest: Manifest
    expires: float | None = None


@dataclass(frozen=True)
class Downloaded:
    """A file on disk: where, how many non-blank lines (resources) and how many bytes it holds."""

    path: Path
    lines: int
    bytes: int


# ---- the kick-off URL --------------------------------------------------------------------------------------------


def kickoff_url(base: str, request: ExportRequest, *, with_filters: bool = True) -> str:
    """``[base]/Group/{id}/$export`` or ``[base]/Patient/$export`` with ``_outputFormat``, ``_type``, ``_since``
    and one ``_typeFilter`` per filter (repeated, as Bulk Data 2 allows and 3 prescribes: a filter's own commas,
    FHIR's "or", stay inside it). Values are percent-encoded whole (a ``+`` in ``_since``'s offset is not a
    space). ValueError for a group id, type or filter that FHIR does not allow."""
    if request.group is not None and not _FHIR_ID.fullmatch(request.group):
        raise ValueError("group must be a FHIR id (letters, digits, '-', '.'; at most 64)")
    for resource_type in request.types:
        if not _RESOURCE_TYPE.fullmatch(resource_type):
            raise ValueError(f"not a FHIR resource type: {resource_type!r}")
    for search in request.type_filters:
        resource_type, question, query = search.partition("?")
        if not question or not query or not _RESOURCE_TYPE.fullmatch(resource_type):
            raise ValueError("a _typeFilter must be a FHIR search of one resource type: Type?param=value")
    if request.since is not None and not _is_instant(request.since):
        raise ValueError("since must be a FHIR instant (date, time and time zone)")
    path = f"Group/{quote(request.group, safe='')}/$export" if request.group is not None else "Patient/$export"
    params = [("_outputFormat", NDJSON)]
    if request.types:
        params.append(("_type", ",".join(request.types)))
    if request.since is not None:
        params.append(("_since", request.since))
    if with_filters:
        params.extend(("_typeFilter", search) for search in request.type_filters)
    query = "&".join(f"{name}={quote(value, safe=',' if name == '_type' else '')}" for name, value in params)
    return f"{base.rstrip('/')}/{path}?{query}"


# ---- the client --------------------------------------------------------------------------------------------------


class BulkDataClient:
    """Bulk Data export calls against one FHIR server (``base``), its credentials in ``send``.

    ``timeout``: socket timeout of the kick-off, status and delete calls; ``download_timeout``: the longest a file
    download may stay silent (file servers may write as they send); ``download_retries``: how many times a cut
    download is resumed or restarted within one ``download`` call. ``token_origins``: other origins
    (``https://host[:port]``) that may receive the token. ``session``: the pooled Session for files that need no
    token (one of ours by default, closed by ``close``)."""

    def __init__(
        self,
        base: str,
        send: Sender,
        *,
        timeout: float = 30.0,
        download_timeout: float = 300.0,
        download_retries: int = 3,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        token_origins: Iterable[str] = (),
        session: requests.Session | None = None,
    ):
        self.base = base.rstrip("/")
        self.timeout = timeout
        self.download_timeout = download_timeout
        self.download_retries = download_retries
        self._send = send
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self._origin = _origin(self.base)
        self._token_origins = {self._origin, *(_origin(origin) for origin in token_origins)}
        self._own_session = session is None
        self._session = session or http.pooled_session(pool_size=8, hosts=4)

    def __repr__(self) -> str:
        return f"BulkDataClient({self.base!r})"

    def close(self) -> None:
        """Close the credential-free Session if it is ours."""
        if self._own_session:
            self._session.close()

    def __enter__(self) -> BulkDataClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- kick-off ------------------------------------------------------------------------------------------------

    def kick_off(self, request: ExportRequest) -> KickOff:
        """Start an export. Busy on 429/503; a refused ``_typeFilter`` (400, 422 or 501 naming it, or a 501) is
        retried once without it; another 4xx is a permanent ExportFailed, a 5xx or the network a transient one."""
        filtered = bool(request.type_filters)
        response = self._kick_off(kickoff_url(self.base, request, with_filters=filtered))
        if filtered and _refuses_type_filter(response):
            log.info(
                "bulk export: %s refused _typeFilter (HTTP %d); kicking off without it",
                self._origin_text,
                response.status_code,
            )
            filtered = False
            response = self._kick_off(kickoff_url(self.base, request, with_filters=False))
        status = response.status_code
        if status == 202:
            location = response.headers.get("Content-Location")
            if not location:
                raise ExportFailed("bulk export kick-off answered 202 without a Content-Location", permanent=True)
            status_url = urljoin(response.url or self.base + "/", location.strip())
            self._check_token_origin(status_url, "status URL")
            log.info("bulk export kicked off at %s (typeFilter sent: %s)", self._origin_text, filtered)
            return KickOff(status_url, filtered)
        if status in (429, 503):
            raise Busy(self._retry_after(response))
        raise ExportFailed(
            f"bulk export kick-off refused: HTTP {status}{_diagnostics(response)}", permanent=status < 500
        )

    def _kick_off(self, url: str) -> requests.Response:
        headers = {"Accept": FHIR_JSON, "Prefer": "respond-async"}
        response = self._call("GET", url, "bulk export kick-off", headers=headers)
        response.close()  # the body (if any) is read already; give the connection back
        return response

    # -- status --------------------------------------------------------------------------------------------------

    def poll(self, status_url: str) -> Pending | Complete:
        """Ask the status URL once. 202: Pending; 200: Complete. 429, 503, a 5xx without an OperationOutcome or
        an OperationOutcome with a transient code: Pending with ``transient`` set. 404/410 (deleted, expired) and
        any other error status: a permanent ExportFailed (the export failed). Network: a transient ExportFailed."""
        self._check_token_origin(status_url, "status URL")
        response = self._call("GET", status_url, "bulk export status", headers={"Accept": "application/json"})
        status = response.status_code
        retry_after = self._retry_after(response)
        if status == 202:
            return Pending(retry_after, _short(response.headers.get("X-Progress"), PROGRESS_CHARS))
        if status == 200:
            try:
                body = orjson.loads(response.content)
            except orjson.JSONDecodeError:
                raise _malformed("the body is not JSON") from None
            return Complete(Manifest.from_json(body), self._http_date(response.headers.get("Expires")))
        issues = _outcome_issues(response)
        if status in (429, 503) or (status >= 500 and not issues):
            return Pending(retry_after, transient=f"HTTP {status}")
        if any(issue.get("code") in TRANSIENT_CODES for issue in issues):
            return Pending(retry_after, transient=f"HTTP {status} with a transient OperationOutcome")
        if status in (404, 410):
            raise ExportFailed(f"bulk export is gone (HTTP {status}){_diagnostics(response)}", permanent=True)
        if status >= 400:
            raise ExportFailed(f"bulk export failed: HTTP {status}{_diagnostics(response)}", permanent=True)
        raise ExportFailed(f"bulk export status answered an unexpected HTTP {status}", permanent=True)

    def next_poll_delay(self, pending: Pending, attempt: int) -> float:
        """Seconds to wait before the next poll: the server's Retry-After within [1 s, 1 h], or, when it gave
        none, exponential backoff with jitter (between half and all of 2**attempt s, capped at 60 s; at least
        1 s). ``attempt``: polls so far without a Retry-After (0 for the first)."""
        return backoff_delay(pending.retry_after, attempt, self._rng)

    def delete(self, status_url: str) -> bool:
        """DELETE the export (cancel it, or tell the server we are done with its files). True when the server
        accepted (200, 202, 204); False when it was gone already (404, 410) or the server refused or could not
        be reached, which is logged, never raised: the files expire anyway."""
        try:
            self._check_token_origin(status_url, "status URL")
            response = self._call("DELETE", status_url, "bulk export delete", headers={"Accept": FHIR_JSON})
        except ExportFailed as exc:
            log.warning("bulk export delete not done: %s", exc)
            return False
        response.close()
        if response.status_code in (200, 202, 204):
            return True
        if response.status_code not in (404, 410):
            log.warning("bulk export delete refused by %s: HTTP %d", self._origin_text, response.status_code)
        return False

    # -- files ---------------------------------------------------------------------------------------------------

    def download(
        self, url: str, dest: Path, *, requires_access_token: bool, expected_type: str | None = None
    ) -> Downloaded:
        """Stream the file at ``url`` to ``dest`` (through ``dest.part``, then renamed: all or nothing), with the
        token only when ``requires_access_token``. A connection cut mid-file is resumed (``Range``, when the
        server answers 206) or restarted, up to ``download_retries`` times. FileExpired on 404/410; ExportFailed
        otherwise (permanent for a refusal, a URL we will not fetch, or a first line that is not a FHIR resource
        of ``expected_type``). Counts non-blank lines."""
        target = self._file_url(url, requires_access_token)
        dest = Path(dest)
        private_folders(dest.parent)
        part = dest.with_name(dest.name + ".part")
        stream = _Stream()
        try:
            with open_private(part) as out:
                cuts = 0
                while True:
                    try:
                        self._fetch_into(target, url, out, stream, requires_access_token)
                        break
                    except _Cut as cut:
                        cuts += 1
                        if cuts > self.download_retries:
                            raise ExportFailed(
                                f"download of {url} failed {cuts} times (last: {cut})", permanent=False
                            ) from None
                        log.info("download of %s cut after %d bytes (%s); retry %d", url, stream.written, cut, cuts)
                out.flush()
                os.fsync(out.fileno())
            if expected_type is not None:
                _check_first_line(part, expected_type, url)
            os.replace(part, dest)
            _fsync_dir(dest.parent)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return Downloaded(dest, stream.lines.total(), stream.written)

    def _fetch_into(self, target: str, url: str, out: BinaryIO, stream: _Stream, with_token: bool) -> None:
        """One GET of the file, appended to ``out`` from ``stream.written`` on (Range) or from the start."""
        headers = {"Accept": NDJSON}
        resuming = stream.written > 0
        if resuming:
            headers["Range"] = f"bytes={stream.written}-"
            if stream.validator:
                headers["If-Range"] = stream.validator
        try:
            response = self._get_file(target, headers, with_token)
        except requests.RequestException as exc:
            if isinstance(getattr(exc, "error", None), str):  # the token endpoint, not the file server
                raise _unreachable(f"download of {url}", exc) from None
            raise _Cut(type(exc).__name__) from None
        with response:
            status = response.status_code
            if status in (404, 410):
                raise FileExpired(url)
            if status == 206 and resuming and _range_start(response) == stream.written:
                pass  # the rest of the file follows
            elif status == 200:
                if resuming:
                    stream.restart(out)  # the server ignored the Range (or the file changed): all of it again
                stream.begin(response)
            elif status in (206, 416):
                stream.restart(out)  # not the range we asked for: start over without one
                raise _Cut(f"HTTP {status} to a range request")
            else:
                what = f"download of {url} refused: HTTP {status}"
                raise ExportFailed(what, permanent=status != 429 and status < 500)
            try:
                for chunk in response.iter_content(CHUNK_BYTES):
                    out.write(chunk)
                    stream.feed(chunk)
            except requests.RequestException as exc:
                if not stream.resumable:
                    stream.restart(out)
                raise _Cut(type(exc).__name__) from None

    def _get_file(self, url: str, headers: dict[str, str], with_token: bool) -> requests.Response:
        """GET with the token (through ``send``) or without any credentials. Redirects are followed: requests
        drops the Authorization header when a redirect leaves the host."""
        timeout = (self.timeout, self.download_timeout)
        if with_token:
            return self._send("GET", url, headers=headers, timeout=timeout, stream=True, allow_redirects=True)
        return self._session.get(url, headers=headers, timeout=timeout, stream=True, allow_redirects=True)

    def errors(self, manifest: Manifest, dest_dir: Path, *, limit: int = 10_000) -> list[dict[str, Any]]:
        """Download the manifest's error files into ``dest_dir`` and return their issues as ``{"severity",
        "code", "diagnostics"}`` (diagnostics shortened), at most ``limit`` of them (then one "too-costly" issue
        says there are more). A line that is not an OperationOutcome becomes an issue saying so."""
        issues: list[dict[str, Any]] = []
        for index, item in enumerate(manifest.error):
            got = self.download(
                item.url,
                Path(dest_dir) / f"error-{index:03d}.ndjson",
                requires_access_token=manifest.requires_access_token,
            )
            with open(got.path, "rb") as lines:
                for number, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    if len(issues) >= limit:
                        more = f"more than {limit} issues in the export's error files; the rest are in {dest_dir}"
                        issues.append({"severity": "warning", "code": "too-costly", "diagnostics": more})
                        return issues
                    issues.extend(_line_issues(line, f"line {number} of error file {index}"))
        return issues

    # -- plumbing ------------------------------------------------------------------------------------------------

    @property
    def _origin_text(self) -> str:
        scheme, host, port = self._origin
        return f"{scheme}://{host}:{port}"

    def _call(self, method: str, url: str, what: str, headers: dict[str, str]) -> requests.Response:
        """One credentialed call, no redirects (the token stays where we sent it); transport errors become a
        transient ExportFailed, a token endpoint's refusal a permanent one."""
        try:
            return self._send(method, url, headers=headers, timeout=self.timeout, allow_redirects=False)
        except requests.RequestException as exc:
            raise _unreachable(what, exc) from None

    def _check_token_origin(self, url: str, what: str) -> None:
        if _origin(url) not in self._token_origins:
            raise ExportFailed(
                f"{what} is on {_origin_label(url)}, not the FHIR server's origin; the token is not sent there",
                permanent=True,
            )

    def _file_url(self, url: str, with_token: bool) -> str:
        """The absolute URL of a manifest file (a relative one is resolved against the base), if we may fetch
        it: http(s) only, HTTPS when the server is on HTTPS, the token's origins only when it carries the token."""
        target = urljoin(self.base + "/", url)
        scheme = urlsplit(target).scheme.lower()
        if scheme not in ("http", "https") or not urlsplit(target).hostname:
            raise ExportFailed(f"export file URL is not an http(s) URL: {url}", permanent=True)
        if self._origin[0] == "https" and scheme != "https":
            raise ExportFailed(f"export file URL is not HTTPS while the server is: {url}", permanent=True)
        if with_token:
            self._check_token_origin(target, "an export file that needs the token")
        return target

    def _retry_after(self, response: requests.Response) -> float | None:
        """Retry-After in seconds (delta-seconds or an HTTP-date), None when absent or unreadable."""
        value = (response.headers.get("Retry-After") or "").strip()
        if _DELTA_SECONDS.fullmatch(value):
            return float(value)
        moment = self._http_date(value)
        return None if moment is None else max(0.0, moment - self._clock.now())

    @staticmethod
    def _http_date(value: str | None) -> float | None:
        if not value:
            return None
        try:
            return parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError, IndexError):
            return None


def backoff_delay(retry_after: float | None, attempt: int, rng: random.Random) -> float:
    """``retry_after`` bounded to [MIN_POLL_S, MAX_RETRY_AFTER_S]; without it, 2**attempt seconds (capped at
    BACKOFF_MAX_S) with jitter between half and all of it, so that many runs do not poll in step."""
    if retry_after is not None:
        return min(max(retry_after, MIN_POLL_S), MAX_RETRY_AFTER_S)
    ceiling = min(BACKOFF_MAX_S, 2.0 ** min(max(attempt, 0), 16))
    return max(MIN_POLL_S, rng.uniform(ceiling / 2, ceiling))


# ---- download state ----------------------------------------------------------------------------------------------


class _Cut(Exception):
    """A download stopped before its end (network); the loop resumes or restarts it."""


class _LineCounter:
    """Counts non-blank lines of a byte stream fed in chunks, keeping one flag between chunks, not the bytes."""

    def __init__(self) -> None:
        self.lines = 0
        self._open = False  # the line being read has content

    def feed(self, chunk: bytes) -> None:
        pieces = chunk.split(b"\n")
        for piece in pieces[:-1]:
            if self._open or (piece and not piece.isspace()):
                self.lines += 1
            self._open = False
        last = pieces[-1]
        self._open = self._open or bool(last and not last.isspace())

    def total(self) -> int:
        return self.lines + (1 if self._open else 0)


class _Stream:
    """What one download has written so far, and whether a cut can be resumed where it stopped."""

    def __init__(self) -> None:
        self.written = 0
        self.lines = _LineCounter()
        self.validator: str | None = None  # If-Range: a strong ETag or Last-Modified of the first answer
        self.resumable = False

    def begin(self, response: requests.Response) -> None:
        """A 200 starts the file: resume later only from an unencoded body (a Range counts encoded bytes)."""
        encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
        ranges = (response.headers.get("Accept-Ranges") or "").strip().lower()
        self.resumable = encoding == "identity" and ranges != "none"
        etag = response.headers.get("ETag")
        self.validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")

    def feed(self, chunk: bytes) -> None:
        self.written += len(chunk)
        self.lines.feed(chunk)

    def restart(self, out: BinaryIO) -> None:
        out.seek(0)
        out.truncate()
        self.written = 0
        self.lines = _LineCounter()


def _range_start(response: requests.Response) -> int | None:
    match = _CONTENT_RANGE.fullmatch((response.headers.get("Content-Range") or "").strip())
    return int(match.group(1)) if match else None


def _check_first_line(path: Path, expected_type: str, url: str) -> None:
    """The first non-blank line must be a JSON object of ``expected_type`` (an HTML error page is not)."""
    with open(path, "rb") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                resource = orjson.loads(line)
            except orjson.JSONDecodeError:
                resource = None
            if not isinstance(resource, dict) or resource.get("resourceType") != expected_type:
                raise ExportFailed(f"export file {url} is not NDJSON of {expected_type}", permanent=True)
            return


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a checkpoint may rely on the file being there after a crash)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- answers -----------------------------------------------------------------------------------------------------


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1
    return scheme, (parts.hostname or "").lower(), port or {"https": 443, "http": 80}.get(scheme, 0)


def _origin_label(url: str) -> str:
    scheme, host, port = _origin(url)
    return f"{scheme}://{host}:{port}"


def _is_instant(value: str) -> bool:
    """A FHIR instant: date and time to the second at least, with a time zone."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})", value):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _files(body: dict[str, Any], key: str, default_type: str | None) -> tuple[OutputFile, ...]:
    items = body.get(key)
    if items is None and default_type is not None:
        return ()
    if not isinstance(items, list):
        raise _malformed(f"{key} is not an array")
    files = []
    for index, item in enumerate(items):
        where = f"{key}[{index}]"
        if not isinstance(item, dict):
            raise _malformed(f"{where} is not an object")
        resource_type = item.get("type", default_type)
        if not isinstance(resource_type, str) or not _RESOURCE_TYPE.fullmatch(resource_type):
            raise _malformed(f"{where}.type is not a FHIR resource type")
        url = item.get("url")
        if not isinstance(url, str) or not url.strip():
            raise _malformed(f"{where}.url is not a URL")
        count = item.get("count")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise _malformed(f"{where}.count is not a number of resources")
        files.append(OutputFile(resource_type, url.strip(), count))
    return tuple(files)


def _malformed(what: str) -> ExportFailed:
    return ExportFailed(f"malformed bulk export manifest: {what}", permanent=True)


def _unreachable(what: str, exc: requests.RequestException) -> ExportFailed:
    """A transport failure, or the Backend Services token endpoint's refusal (app.smart.backend.BackendAuthError:
    a RequestException with an OAuth ``error`` code and ``status``; its message holds no secret)."""
    error = getattr(exc, "error", None)
    if isinstance(error, str):
        return ExportFailed(f"{what}: {exc}", permanent=getattr(exc, "status", None) in (400, 401, 403))
    return ExportFailed(f"{what}: FHIR server unreachable ({type(exc).__name__})", permanent=False)


def _outcome_issues(response: requests.Response) -> list[dict[str, Any]]:
    """The issues of an OperationOutcome body, or [] when the body is something else."""
    try:
        body = orjson.loads(response.content or b"null")
    except (orjson.JSONDecodeError, requests.RequestException):
        return []
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return []
    return [issue for issue in body.get("issue") or () if isinstance(issue, dict)]


def _issue_text(issue: dict[str, Any]) -> str | None:
    text = issue.get("diagnostics")
    if not isinstance(text, str):
        details = issue.get("details")
        text = details.get("text") if isinstance(details, dict) else None
    return text if isinstance(text, str) else None


def _diagnostics(response: requests.Response) -> str:
    """``": <first issue's text>"`` of an OperationOutcome body, shortened; "" without one."""
    for issue in _outcome_issues(response):
        text = _short(_issue_text(issue), DIAGNOSTICS_CHARS)
        if text:
            return f": {text}"
    return ""


def _refuses_type_filter(response: requests.Response) -> bool:
    """A kick-off refused because of ``_typeFilter``: a 501, or a 400/422 whose OperationOutcome names it."""
    if response.status_code == 501:
        return True
    if response.status_code not in (400, 422):
        return False
    for issue in _outcome_issues(response):
        texts = [_issue_text(issue) or ""]
        texts += [str(item) for key in ("expression", "location") for item in issue.get(key) or ()]
        if any("typefilter" in text.lower() for text in texts):
            return True
    return False


def _line_issues(line: bytes, where: str) -> list[dict[str, Any]]:
    """The issues of one error-file line (an OperationOutcome), or one issue saying the line is not one."""
    try:
        outcome = orjson.loads(line)
    except orjson.JSONDecodeError:
        outcome = None
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return [{"severity": "error", "code": "invalid", "diagnostics": f"{where} is not an OperationOutcome"}]
    issues = []
    for issue in outcome.get("issue") or ():
        if isinstance(issue, dict):
            severity, code = issue.get("severity"), issue.get("code")
            issues.append(
                {
                    "severity": severity if isinstance(severity, str) else "error",
                    "code": code if isinstance(code, str) else "unknown",
                    "diagnostics": _short(_issue_text(issue), DIAGNOSTICS_CHARS),
                }
            )
    return issues


def _short(text: str | None, limit: int) -> str | None:
    """``text`` on one line without control characters, cut to ``limit`` characters (None stays None)."""
    if text is None:
        return None
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"
