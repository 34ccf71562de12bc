"""The Bulk Data Access 2.0 client against real local HTTP servers: kick-off, polling, manifest, downloads (with
and without the token, cut connections resumed), error files, delete. Nothing sleeps: the client never waits."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import socketserver
import threading
from collections.abc import Callable
from email.utils import formatdate
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from app.batch.export import (
    MAX_RETRY_AFTER_S,
    BulkDataClient,
    Busy,
    Complete,
    Downloaded,
    ExportFailed,
    ExportRequest,
    FileExpired,
    KickOff,
    Manifest,
    OutputFile,
    Pending,
    kickoff_url,
)
from app.smart.backend import BackendAuthError
from tests.support.clock import FakeClock

TOKEN = "bulk-token-3f9a"
WALL = 1_700_000_000.0
FILTERS = (
    "Observation?code=http://loinc.org|2093-3,http://loinc.org|2085-9",
    "MedicationRequest?status=active",
)
REQUEST = ExportRequest(
    "cohort-1", ("Patient", "Observation", "MedicationRequest"), FILTERS, "2024-05-01T00:00:00+02:00"
)
PATIENTS = (
    b'{"resourceType":"Patient","id":"a"}\n\n{"resourceType":"Patient","id":"b"}\r\n{"resourceType":"Patient","id":"c"}'
)
MANIFEST = {
    "transactionTime": "2024-06-01T12:00:00.123Z",
    "request": "https://ehr.example.org/fhir/Group/cohort-1/$export?_type=Patient",
    "requiresAccessToken": True,
    "output": [
        {"type": "Patient", "url": "https://ehr.example.org/files/1.ndjson", "count": 3},
        {"type": "Observation", "url": "https://ehr.example.org/files/2.ndjson"},
    ],
    "error": [{"type": "OperationOutcome", "url": "https://ehr.example.org/files/err.ndjson"}],
}


class TokenSender:
    """Stands in for BackendServicesClient.request: adds the bearer token, records every call's arguments."""

    def __init__(self) -> None:
        self.session = requests.Session()
        self.calls: list[tuple[str, str, dict]] = []

    def __call__(self, method: str, url: str, **kwargs) -> requests.Response:
        self.calls.append((method, url, dict(kwargs)))
        headers = {**(kwargs.pop("headers", None) or {}), "Authorization": f"Bearer {TOKEN}"}
        return self.session.request(method, url, headers=headers, **kwargs)


@pytest.fixture
def sender():
    s = TokenSender()
    yield s
    s.session.close()


@pytest.fixture
def base(httpserver: HTTPServer) -> str:
    return httpserver.url_for("/fhir")


@pytest.fixture
def client(base, sender):
    with BulkDataClient(base, sender, timeout=5.0, download_timeout=5.0, clock=FakeClock(wall=WALL)) as c:
        yield c


def outcome(diagnostics: str, code: str = "processing") -> dict:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def authorizations(httpserver: HTTPServer) -> list[str | None]:
    return [request.headers.get("Authorization") for request, _ in httpserver.log]


# --- the kick-off URL ---------------------------------------------------------------------------------------------


def test_kickoff_url_encodes_each_parameter_whole():
    url = kickoff_url("https://ehr.example.org/fhir/", REQUEST)
    assert url == (
        "https://ehr.example.org/fhir/Group/cohort-1/$export?_outputFormat=application%2Ffhir%2Bndjson"
        "&_type=Patient,Observation,MedicationRequest&_since=2024-05-01T00%3A00%3A00%2B02%3A00"
        "&_typeFilter=Observation%3Fcode%3Dhttp%3A%2F%2Floinc.org%7C2093-3%2Chttp%3A%2F%2Floinc.org%7C2085-9"
        "&_typeFilter=MedicationRequest%3Fstatus%3Dactive"
    )


def test_kickoff_url_decodes_to_exactly_what_was_asked():
    query = parse_qs(urlsplit(kickoff_url("https://ehr.example.org/fhir", REQUEST)).query)
    assert query["_since"] == ["2024-05-01T00:00:00+02:00"]  # the "+" is not a space
    assert query["_typeFilter"] == list(FILTERS)  # one search each, its own comma kept
    assert query["_type"] == ["Patient,Observation,MedicationRequest"]
    assert query["_outputFormat"] == ["application/fhir+ndjson"]


def test_kickoff_url_without_a_group_exports_all_patients_and_may_leave_filters_out():
    request = ExportRequest(None, ("Patient",), FILTERS)
    url = kickoff_url("https://ehr.example.org/fhir", request, with_filters=False)
    assert url == "https://ehr.example.org/fhir/Patient/$export?_outputFormat=application%2Ffhir%2Bndjson&_type=Patient"


@pytest.mark.parametrize(
    "request_",
    [
        ExportRequest("../admin", ()),
        ExportRequest(None, ("Patient&_since=x",)),
        ExportRequest(None, ("Observation",), ("code=1",)),
        ExportRequest(None, (), (), "2024-05-01"),
    ],
)
def test_kickoff_url_refuses_what_fhir_does_not_allow(request_):
    with pytest.raises(ValueError):
        kickoff_url("https://ehr.example.org/fhir", request_)


# --- kick-off -----------------------------------------------------------------------------------------------------


def test_kick_off_returns_the_status_url_of_a_202(httpserver, client, base, sender):
    status_url = httpserver.url_for("/fhir/bulkstatus/77")
    httpserver.expect_request("/fhir/Group/cohort-1/$export", method="GET").respond_with_data(
        "", status=202, headers={"Content-Location": status_url}
    )
    assert client.kick_off(REQUEST) == KickOff(status_url, filtered=True)
    ((request, _),) = httpserver.log
    assert request.headers["Prefer"] == "respond-async"
    assert request.headers["Accept"] == "application/fhir+json"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.args.getlist("_typeFilter") == list(FILTERS)
    assert request.args["_since"] == "2024-05-01T00:00:00+02:00"
    assert sender.calls[0][2]["timeout"] == 5.0


def test_kick_off_resolves_a_relative_content_location(httpserver, client):
    httpserver.expect_request("/fhir/Patient/$export").respond_with_data(
        "", status=202, headers={"Content-Location": "/fhir/bulkstatus/9"}
    )
    got = client.kick_off(ExportRequest(None, ("Patient",)))
    assert got == KickOff(httpserver.url_for("/fhir/bulkstatus/9"), filtered=False)


def test_kick_off_refuses_a_status_url_on_another_origin(httpserver, client):
    elsewhere = httpserver.url_for("/s/1").replace("127.0.0.1", "localhost")
    httpserver.expect_request("/fhir/Patient/$export").respond_with_data(
        "", status=202, headers={"Content-Location": elsewhere}
    )
    with pytest.raises(ExportFailed, match="not the FHIR server's origin") as info:
        client.kick_off(ExportRequest(None, ("Patient",)))
    assert info.value.permanent


@pytest.mark.parametrize(("status", "retry_after", "expected"), [(429, "120", 120.0), (503, None, None)])
def test_a_busy_server_raises_busy_with_its_retry_after(httpserver, client, status, retry_after, expected):
    headers = {"Retry-After": retry_after} if retry_after else {}
    httpserver.expect_request("/fhir/Patient/$export").respond_with_json(
        outcome("an export is already running"), status=status, headers=headers
    )
    with pytest.raises(Busy) as info:
        client.kick_off(ExportRequest(None, ("Patient",)))
    assert info.value.retry_after == expected


def test_retry_after_as_an_http_date_is_seconds_from_now(httpserver, client):
    httpserver.expect_request("/fhir/Patient/$export").respond_with_data(
        "", status=429, headers={"Retry-After": formatdate(WALL + 90, usegmt=True)}
    )
    with pytest.raises(Busy) as info:
        client.kick_off(ExportRequest(None, ("Patient",)))
    assert info.value.retry_after == 90.0


def test_a_refused_type_filter_is_retried_once_without_it(httpserver, client):
    def kick_off(request: Request) -> Response:
        if "_typeFilter" in request.args:
            body = outcome("The _typeFilter parameter is not supported")
            return Response(json.dumps(body), 400, content_type="application/fhir+json")
        return Response("", 202, headers={"Content-Location": httpserver.url_for("/fhir/bulkstatus/5")})

    httpserver.expect_request("/fhir/Group/cohort-1/$export").respond_with_handler(kick_off)
    got = client.kick_off(REQUEST)
    assert got == KickOff(httpserver.url_for("/fhir/bulkstatus/5"), filtered=False)
    first, second = (request for request, _ in httpserver.log)
    assert first.args.getlist("_typeFilter") == list(FILTERS)
    assert "_typeFilter" not in second.args
    assert second.args["_type"] == "Patient,Observation,MedicationRequest"


def test_a_type_filter_refused_twice_is_not_retried_again(httpserver, client):
    httpserver.expect_request("/fhir/Group/cohort-1/$export").respond_with_json(outcome("not implemented"), status=501)
    with pytest.raises(ExportFailed, match="HTTP 501") as info:
        client.kick_off(REQUEST)
    assert len(httpserver.log) == 2
    assert info.value.permanent is False  # a 5xx: maybe later


def test_another_client_error_is_permanent_and_says_why(httpserver, client):
    httpserver.expect_request("/fhir/Group/cohort-1/$export").respond_with_json(
        outcome("Group cohort-1 is not known\nto this server"), status=404
    )
    with pytest.raises(ExportFailed) as info:
        client.kick_off(REQUEST)
    assert info.value.permanent
    assert str(info.value) == "bulk export kick-off refused: HTTP 404: Group cohort-1 is not known to this server"
    assert len(httpserver.log) == 1  # a 404 is not about _typeFilter: no second try


def test_a_server_error_at_kick_off_is_transient(httpserver, client):
    httpserver.expect_request("/fhir/Patient/$export").respond_with_data("<html>bad gateway</html>", status=502)
    with pytest.raises(ExportFailed, match="HTTP 502") as info:
        client.kick_off(ExportRequest(None, ("Patient",)))
    assert info.value.permanent is False


def test_an_unreachable_server_is_transient(sender):
    client = BulkDataClient(f"http://127.0.0.1:{closed_port()}/fhir", sender, timeout=2.0)
    with pytest.raises(ExportFailed, match="unreachable") as info:
        client.kick_off(ExportRequest(None, ("Patient",)))
    assert info.value.permanent is False


def test_a_token_endpoint_refusal_is_permanent():
    def refused(method, url, **kwargs):
        raise BackendAuthError("invalid_client", 401)

    client = BulkDataClient("https://ehr.example.org/fhir", refused)
    with pytest.raises(ExportFailed, match="invalid_client") as info:
        client.kick_off(ExportRequest(None, ("Patient",)))
    assert info.value.permanent


# --- polling ------------------------------------------------------------------------------------------------------


def test_poll_in_progress_gives_retry_after_and_progress(httpserver, client):
    httpserver.expect_request("/fhir/bulkstatus/1").respond_with_data(
        "", status=202, headers={"Retry-After": "120", "X-Progress": "50% complete"}
    )
    assert client.poll(httpserver.url_for("/fhir/bulkstatus/1")) == Pending(120.0, "50% complete")
    ((request, _),) = httpserver.log
    assert request.headers["Accept"] == "application/json"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"


def test_poll_shortens_a_long_progress_text(httpserver, client):
    httpserver.expect_request("/fhir/bulkstatus/1").respond_with_data("", status=202, headers={"X-Progress": "x" * 300})
    got = client.poll(httpserver.url_for("/fhir/bulkstatus/1"))
    assert got.retry_after is None
    assert len(got.progress) == 100


@pytest.mark.parametrize(
    ("status", "body", "transient"),
    [
        (503, "", "HTTP 503"),
        (429, json.dumps(outcome("slow down", "throttled")), "HTTP 429"),
        (500, "<html>oops</html>", "HTTP 500"),
        (500, json.dumps(outcome("database busy", "transient")), "HTTP 500 with a transient OperationOutcome"),
    ],
)
def test_poll_failures_that_are_not_the_exports_are_pending(httpserver, client, status, body, transient):
    httpserver.expect_request("/fhir/bulkstatus/1").respond_with_data(
        body, status=status, headers={"Retry-After": "30"}
    )
    assert client.poll(httpserver.url_for("/fhir/bulkstatus/1")) == Pending(30.0, None, transient)


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (500, outcome("export job failed", "exception"), "bulk export failed: HTTP 500: export job failed"),
        (404, outcome("no such export"), "bulk export is gone (HTTP 404): no such export"),
        (410, {}, "bulk export is gone (HTTP 410)"),
        (403, outcome("forbidden", "forbidden"), "bulk export failed: HTTP 403: forbidden"),
    ],
)
def test_poll_error_statuses_mean_the_export_failed(httpserver, client, status, body, message):
    httpserver.expect_request("/fhir/bulkstatus/1").respond_with_json(body, status=status)
    with pytest.raises(ExportFailed) as info:
        client.poll(httpserver.url_for("/fhir/bulkstatus/1"))
    assert info.value.permanent
    assert str(info.value) == message


def test_poll_complete_parses_the_manifest_and_its_expiry(httpserver, client):
    expires = formatdate(WALL + 3600, usegmt=True)
    httpserver.expect_request("/fhir/bulkstatus/1").respond_with_json(MANIFEST, headers={"Expires": expires})
    got = client.poll(httpserver.url_for("/fhir/bulkstatus/1"))
    assert got == Complete(
        Manifest(
            transaction_time="2024-06-01T12:00:00.123Z",
            request=MANIFEST["request"],
            requires_access_token=True,
            output=(
                OutputFile("Patient", "https://ehr.example.org/files/1.ndjson", 3),
                OutputFile("Observation", "https://ehr.example.org/files/2.ndjson"),
            ),
            error=(OutputFile("OperationOutcome", "https://ehr.example.org/files/err.ndjson"),),
        ),
        expires=WALL + 3600,
    )
    assert Manifest.from_json(got.manifest.to_json()) == got.manifest
    assert got.manifest.to_json() == MANIFEST


def test_poll_refuses_a_status_url_on_another_origin(httpserver, client):
    with pytest.raises(ExportFailed, match="not the FHIR server's origin"):
        client.poll(httpserver.url_for("/fhir/bulkstatus/1").replace("127.0.0.1", "localhost"))
    assert httpserver.log == []


def test_poll_of_an_unreachable_server_is_transient(sender):
    base = f"http://127.0.0.1:{closed_port()}/fhir"
    with pytest.raises(ExportFailed, match="unreachable") as info:
        BulkDataClient(base, sender, timeout=2.0).poll(f"{base}/bulkstatus/1")
    assert info.value.permanent is False


def test_a_manifest_without_optional_members_reads_as_empty():
    manifest = Manifest.from_json(
        {"transactionTime": "2024-06-01T12:00:00+00:00", "requiresAccessToken": False, "output": []}
    )
    assert (manifest.request, manifest.output, manifest.error, manifest.deleted) == ("", (), (), ())


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"transactionTime": None}, "transactionTime"),
        ({"transactionTime": "2024-06-01"}, "transactionTime"),
        ({"requiresAccessToken": "true"}, "requiresAccessToken"),
        ({"output": None}, "output"),
        ({"output": [{"type": "Patient"}]}, "output[0].url"),
        ({"output": [{"url": "https://x/1.ndjson"}]}, "output[0].type"),
        ({"output": [{"type": "Patient", "url": "https://x/1", "count": -1}]}, "output[0].count"),
        ({"error": [{"url": 3}]}, "error[0].url"),
        ({"request": 7}, "request"),
    ],
)
def test_a_malformed_manifest_is_a_permanent_failure_naming_the_field(httpserver, client, change, field):
    httpserver.expect_request("/fhir/bulkstatus/1").respond_with_json({**MANIFEST, **change})
    with pytest.raises(ExportFailed) as info:
        client.poll(httpserver.url_for("/fhir/bulkstatus/1"))
    assert info.value.permanent
    assert str(info.value).startswith(f"malformed bulk export manifest: {field} ")


def test_a_complete_status_that_is_not_json_is_a_malformed_manifest(httpserver, client):
    httpserver.expect_request("/fhir/bulkstatus/1").respond_with_data("<html>done</html>", status=200)
    with pytest.raises(ExportFailed, match="malformed bulk export manifest: the body is not JSON"):
        client.poll(httpserver.url_for("/fhir/bulkstatus/1"))


def test_next_poll_delay_honours_retry_after_within_bounds(client):
    assert client.next_poll_delay(Pending(120.0), attempt=5) == 120.0
    assert client.next_poll_delay(Pending(0.0), attempt=0) == 1.0
    assert client.next_poll_delay(Pending(86_400.0), attempt=0) == MAX_RETRY_AFTER_S


def test_next_poll_delay_backs_off_with_jitter_up_to_a_minute(sender):
    client = BulkDataClient("https://ehr.example.org/fhir", sender, rng=random.Random(7))
    for attempt, (low, high) in enumerate([(1, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (30, 60), (30, 60)]):
        delays = {client.next_poll_delay(Pending(), attempt) for _ in range(20)}
        assert all(low <= d <= high for d in delays), (attempt, delays)
    assert len({client.next_poll_delay(Pending(), 10) for _ in range(20)}) > 1  # jittered
    assert max(client.next_poll_delay(Pending(), 1000) for _ in range(50)) <= 60


# --- downloads ----------------------------------------------------------------------------------------------------


def test_download_with_the_token_streams_to_disk_and_counts_lines(httpserver, client, tmp_path, sender):
    httpserver.expect_request("/fhir/files/1.ndjson").respond_with_data(
        PATIENTS, content_type="application/fhir+ndjson"
    )
    dest = tmp_path / "export" / "001-Patient.ndjson"
    got = client.download(
        httpserver.url_for("/fhir/files/1.ndjson"), dest, requires_access_token=True, expected_type="Patient"
    )
    assert (got.path, got.lines, got.bytes) == (dest, 3, len(PATIENTS))
    assert dest.read_bytes() == PATIENTS
    assert list(dest.parent.iterdir()) == [dest]  # no .part left behind
    ((request, _),) = httpserver.log
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Accept"] == "application/fhir+ndjson"
    assert sender.calls[0][2]["stream"] is True and sender.calls[0][2]["timeout"] == (5.0, 5.0)


def test_download_without_the_token_sends_no_credentials_even_to_the_server(httpserver, client, tmp_path, sender):
    httpserver.expect_request("/fhir/files/1.ndjson").respond_with_data(PATIENTS)
    got = client.download(
        httpserver.url_for("/fhir/files/1.ndjson"), tmp_path / "p.ndjson", requires_access_token=False
    )
    assert got.lines == 3
    assert authorizations(httpserver) == [None]
    assert sender.calls == []


def test_a_file_that_needs_the_token_is_not_fetched_from_another_origin(httpserver, client, tmp_path):
    elsewhere = httpserver.url_for("/fhir/files/1.ndjson").replace("127.0.0.1", "localhost")
    with pytest.raises(ExportFailed, match="not the FHIR server's origin") as info:
        client.download(elsewhere, tmp_path / "p.ndjson", requires_access_token=True)
    assert info.value.permanent
    assert httpserver.log == []
    assert not any(tmp_path.iterdir())


def test_a_file_without_the_token_may_come_from_another_origin(httpserver, client, tmp_path):
    httpserver.expect_request("/bucket/1.ndjson").respond_with_data(PATIENTS)
    elsewhere = httpserver.url_for("/bucket/1.ndjson").replace("127.0.0.1", "localhost")
    assert client.download(elsewhere, tmp_path / "p.ndjson", requires_access_token=False).lines == 3
    assert authorizations(httpserver) == [None]


def test_a_relative_file_url_is_resolved_against_the_base(httpserver, client, tmp_path):
    httpserver.expect_request("/fhir/job7/Patient_1.ndjson").respond_with_data(PATIENTS)
    assert client.download("job7/Patient_1.ndjson", tmp_path / "p.ndjson", requires_access_token=True).lines == 3


def test_a_redirect_to_another_host_loses_the_token(httpserver, client, tmp_path):
    elsewhere = httpserver.url_for("/bucket/1.ndjson").replace("127.0.0.1", "localhost")
    httpserver.expect_request("/fhir/files/1.ndjson").respond_with_data("", status=302, headers={"Location": elsewhere})
    httpserver.expect_request("/bucket/1.ndjson").respond_with_data(PATIENTS)
    got = client.download(httpserver.url_for("/fhir/files/1.ndjson"), tmp_path / "p.ndjson", requires_access_token=True)
    assert got.lines == 3
    assert authorizations(httpserver) == [f"Bearer {TOKEN}", None]


@pytest.mark.parametrize("status", [404, 410])
def test_a_missing_file_has_expired(httpserver, client, tmp_path, status):
    url = httpserver.url_for("/fhir/files/1.ndjson")
    httpserver.expect_request("/fhir/files/1.ndjson").respond_with_json(outcome("gone"), status=status)
    with pytest.raises(FileExpired) as info:
        client.download(url, tmp_path / "p.ndjson", requires_access_token=True)
    assert info.value.url == url and info.value.permanent
    assert not any(tmp_path.iterdir())


def test_a_file_of_another_kind_is_refused(httpserver, client, tmp_path):
    httpserver.expect_request("/fhir/files/1.ndjson").respond_with_data("<html><body>Sign in</body></html>\n")
    with pytest.raises(ExportFailed, match="is not NDJSON of Patient"):
        client.download(
            httpserver.url_for("/fhir/files/1.ndjson"),
            tmp_path / "p.ndjson",
            requires_access_token=True,
            expected_type="Patient",
        )
    assert not any(tmp_path.iterdir())


def test_a_refused_download_is_permanent_and_a_failing_server_transient(httpserver, client, tmp_path):
    httpserver.expect_request("/fhir/files/1.ndjson").respond_with_data("no", status=403)
    httpserver.expect_request("/fhir/files/2.ndjson").respond_with_data("down", status=503)
    with pytest.raises(ExportFailed, match="HTTP 403") as refused:
        client.download(httpserver.url_for("/fhir/files/1.ndjson"), tmp_path / "1", requires_access_token=True)
    with pytest.raises(ExportFailed, match="HTTP 503") as failing:
        client.download(httpserver.url_for("/fhir/files/2.ndjson"), tmp_path / "2", requires_access_token=True)
    assert refused.value.permanent and not failing.value.permanent


def test_plain_http_files_are_refused_when_the_server_is_https(sender, tmp_path):
    client = BulkDataClient("https://ehr.example.org/fhir", sender)
    with pytest.raises(ExportFailed, match="not HTTPS"):
        client.download("http://files.example.org/1.ndjson", tmp_path / "p", requires_access_token=False)
    assert sender.calls == []


class ScriptedServer:
    """A raw HTTP/1.1 server that answers each connection with the next scripted bytes (or what a function of the
    request's headers makes), then closes it: a Content-Length larger than the bytes sent is a connection cut
    mid-file. Records each request's headers."""

    def __init__(self, replies: list[bytes | Callable[[dict[str, str]], bytes]]):
        self.replies = list(replies)
        self.requests: list[dict[str, str]] = []
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = self.request.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
                with owner.lock:
                    owner.requests.append(headers)
                    reply = owner.replies.pop(0) if owner.replies else b"HTTP/1.1 500 Nothing left\r\n\r\n"
                self.request.sendall(reply(headers) if callable(reply) else reply)
                with contextlib.suppress(OSError):
                    self.request.shutdown(socket.SHUT_RDWR)

        self.lock = threading.Lock()
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def reply(status: str, body: bytes, length: int | None = None, **headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body) if length is None else length}", "Connection: close"]
    head += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# Bigger than the client's 1 MiB read: a cut loses the chunk being read, so what came before it is kept.
BIG = b"".join(b'{"resourceType":"Patient","id":"p%06d","gender":"unknown"}\n' % n for n in range(50_000))
CUT_AT = 2_500_000


def rest_of_big(headers: dict[str, str]) -> bytes:
    """A 206 with the rest of BIG from the requested Range start."""
    start = int(headers["range"].removeprefix("bytes=").rstrip("-"))
    return reply("206 Partial Content", BIG[start:], Content_Range=f"bytes {start}-{len(BIG) - 1}/{len(BIG)}")


def test_a_cut_download_resumes_with_a_range(sender, tmp_path):
    first = reply("200 OK", BIG[:CUT_AT], length=len(BIG), ETag='"v1"')
    with ScriptedServer([first, rest_of_big]) as server:
        client = BulkDataClient(server.url, sender, timeout=5.0, download_timeout=5.0)
        got = client.download(f"{server.url}/files/1.ndjson", tmp_path / "p.ndjson", requires_access_token=True)
    assert (got.lines, got.bytes) == (50_000, len(BIG))
    assert (tmp_path / "p.ndjson").read_bytes() == BIG
    first_request, second_request = server.requests
    assert "range" not in first_request
    resumed_at = int(second_request["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= CUT_AT
    assert second_request["if-range"] == '"v1"'
    assert second_request["authorization"] == f"Bearer {TOKEN}"


def test_a_cut_download_restarts_when_the_server_ignores_the_range(sender, tmp_path):
    with ScriptedServer([reply("200 OK", BIG[:CUT_AT], length=len(BIG)), reply("200 OK", BIG)]) as server:
        client = BulkDataClient(server.url, sender, timeout=5.0, download_timeout=5.0)
        got = client.download(f"{server.url}/files/1.ndjson", tmp_path / "p.ndjson", requires_access_token=False)
    assert (got.lines, got.bytes) == (50_000, len(BIG))  # the first attempt's lines are not counted twice
    assert (tmp_path / "p.ndjson").read_bytes() == BIG
    assert server.requests[1]["range"].startswith("bytes=")
    assert "authorization" not in server.requests[0] and "authorization" not in server.requests[1]


def test_a_cut_gzip_download_restarts_from_the_start(sender, tmp_path):
    import gzip

    packed = gzip.compress(BIG)
    cut = reply("200 OK", packed[: len(packed) // 2], length=len(packed), Content_Encoding="gzip")
    with ScriptedServer([cut, reply("200 OK", packed, Content_Encoding="gzip")]) as server:
        client = BulkDataClient(server.url, sender, timeout=5.0, download_timeout=5.0)
        got = client.download(f"{server.url}/files/1.ndjson", tmp_path / "p.ndjson", requires_access_token=False)
    assert (got.lines, (tmp_path / "p.ndjson").read_bytes()) == (50_000, BIG)
    assert "range" not in server.requests[1]  # a Range counts encoded bytes: never resume a decoded stream


def test_a_download_cut_every_time_fails_transiently_after_its_retries(sender, tmp_path):
    cut = reply("200 OK", PATIENTS[:10], length=len(PATIENTS))
    with ScriptedServer([cut] * 5) as server:
        client = BulkDataClient(server.url, sender, timeout=5.0, download_timeout=5.0, download_retries=2)
        with pytest.raises(ExportFailed, match="failed 3 times") as info:
            client.download(f"{server.url}/files/1.ndjson", tmp_path / "p.ndjson", requires_access_token=False)
    assert info.value.permanent is False
    assert len(server.requests) == 3
    assert not any(tmp_path.iterdir())


def test_a_download_from_an_unreachable_host_fails_transiently(sender, tmp_path):
    base = f"http://127.0.0.1:{closed_port()}"
    client = BulkDataClient(base, sender, timeout=2.0, download_retries=1)
    with pytest.raises(ExportFailed, match="failed 2 times") as info:
        client.download(f"{base}/files/1.ndjson", tmp_path / "p.ndjson", requires_access_token=True)
    assert info.value.permanent is False


# --- error files and delete ---------------------------------------------------------------------------------------


def test_errors_reads_the_issues_of_every_error_file(httpserver, client, tmp_path):
    long_text = "resource could not be exported " * 20
    first = (
        json.dumps(outcome("Observation/9 failed validation"))
        + "\n"
        + json.dumps(
            {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "warning", "code": "processing", "details": {"text": long_text}}],
            }
        )
    )
    httpserver.expect_request("/fhir/files/err1.ndjson").respond_with_data(first + "\n")
    httpserver.expect_request("/fhir/files/err2.ndjson").respond_with_data("not json\n")
    manifest = Manifest(
        "2024-06-01T12:00:00Z",
        "",
        True,
        (),
        error=(
            OutputFile("OperationOutcome", httpserver.url_for("/fhir/files/err1.ndjson")),
            OutputFile("OperationOutcome", httpserver.url_for("/fhir/files/err2.ndjson")),
        ),
    )
    issues = client.errors(manifest, tmp_path)
    assert issues[0] == {"severity": "error", "code": "processing", "diagnostics": "Observation/9 failed validation"}
    assert issues[1]["severity"] == "warning" and len(issues[1]["diagnostics"]) == 200
    assert issues[2] == {
        "severity": "error",
        "code": "invalid",
        "diagnostics": "line 1 of error file 1 is not an OperationOutcome",
    }
    assert len(issues) == 3
    assert authorizations(httpserver) == [f"Bearer {TOKEN}"] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["error-000.ndjson", "error-001.ndjson"]


def test_errors_stops_at_its_limit(httpserver, client, tmp_path):
    lines = "\n".join(json.dumps(outcome(f"problem {n}")) for n in range(5))
    httpserver.expect_request("/fhir/files/err.ndjson").respond_with_data(lines)
    manifest = Manifest(
        "2024-06-01T12:00:00Z",
        "",
        False,
        (),
        (OutputFile("OperationOutcome", httpserver.url_for("/fhir/files/err.ndjson")),),
    )
    issues = client.errors(manifest, tmp_path, limit=2)
    assert [issue["code"] for issue in issues] == ["processing", "processing", "too-costly"]


@pytest.mark.parametrize(("status", "deleted"), [(202, True), (200, True), (204, True), (404, False), (500, False)])
def test_delete_says_whether_the_server_took_it_and_never_raises(httpserver, client, status, deleted):
    httpserver.expect_request("/fhir/bulkstatus/1", method="DELETE").respond_with_data("", status=status)
    assert client.delete(httpserver.url_for("/fhir/bulkstatus/1")) is deleted
    ((request, _),) = httpserver.log
    assert request.method == "DELETE" and request.headers["Authorization"] == f"Bearer {TOKEN}"


def test_delete_of_an_unreachable_server_is_false(sender):
    base = f"http://127.0.0.1:{closed_port()}/fhir"
    assert BulkDataClient(base, sender, timeout=2.0).delete(f"{base}/bulkstatus/1") is False


def test_delete_never_sends_the_token_to_another_origin(httpserver, client):
    assert client.delete(httpserver.url_for("/fhir/bulkstatus/1").replace("127.0.0.1", "localhost")) is False
    assert httpserver.log == []


def test_an_empty_file_is_zero_lines_and_has_no_first_line_to_check(httpserver, client, tmp_path):
    httpserver.expect_request("/fhir/files/1.ndjson").respond_with_data(b"\n")
    dest = tmp_path / "e.ndjson"
    got = client.download(
        httpserver.url_for("/fhir/files/1.ndjson"), dest, requires_access_token=True, expected_type="Patient"
    )
    assert got == Downloaded(dest, 0, 1)


def test_a_token_endpoint_refusal_during_a_download_is_not_retried(tmp_path):
    calls = []

    def refused(method, url, **kwargs):
        calls.append(url)
        raise BackendAuthError("invalid_client", 400)

    client = BulkDataClient("https://ehr.example.org/fhir", refused, download_retries=3)
    with pytest.raises(ExportFailed, match="invalid_client") as info:
        client.download("https://ehr.example.org/fhir/files/1.ndjson", tmp_path / "p", requires_access_token=True)
    assert info.value.permanent and len(calls) == 1


def test_a_202_without_a_content_location_is_a_permanent_failure(httpserver, client):
    httpserver.expect_request("/fhir/Patient/$export").respond_with_data("", status=202)
    with pytest.raises(ExportFailed, match="without a Content-Location") as info:
        client.kick_off(ExportRequest(None, ("Patient",)))
    assert info.value.permanent
