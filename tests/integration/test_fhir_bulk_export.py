"""The FHIR test server's Bulk Data Access 2.0 export (tests/fhir_server), as the batch client's tests rely on it.

Plain ``requests`` against a server of our own (module scope) holding a synthetic population; every test starts
from the default export settings, no faults and an empty request log.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from datetime import UTC, datetime

import pytest
import requests

from tests.conftest import require
from tests.support.fhir_server import FhirTestServer, FhirTestServerError, fhir_server_available
from tests.support.population import iter_population, patient_id, seed_population, write_population

TIMEOUT = 10
N = 40
SEED = 7
KICKOFF = {"Accept": "application/fhir+json", "Prefer": "respond-async"}
TOKEN = {"Authorization": "Bearer any-token"}
FIVE = [patient_id(i) for i in range(3, 8)]
TOTAL_CHOLESTEROL = "http://loinc.org|2093-3"
HDL = "http://loinc.org|2085-9"


def expected_by_type(resources) -> dict[str, dict[str, dict]]:
    found: dict[str, dict[str, dict]] = defaultdict(dict)
    for resource_type, resource in resources:
        found[resource_type][resource["id"]] = resource
    return found


EXPECTED = expected_by_type(iter_population(N, SEED))


@pytest.fixture(scope="module")
def server():
    require(fhir_server_available())
    with FhirTestServer() as fhir:
        seed_population(fhir, N, seed=SEED)
        members = [{"entity": {"reference": f"Patient/{pid}"}} for pid in FIVE]
        fhir.put([{"resourceType": "Group", "id": "five", "type": "person", "actual": True, "member": members}])
        yield fhir


@pytest.fixture(autouse=True)
def fresh(server):
    server.bulk_reset()
    yield
    server.bulk_reset()


# ---- helpers --------------------------------------------------------------------------------------------------


def kickoff(server, path: str = "Patient/$export", headers: dict | None = None, **params) -> requests.Response:
    return requests.get(f"{server.base_url}/{path}", params=params, headers=headers or KICKOFF, timeout=TIMEOUT)


def accepted(response: requests.Response) -> str:
    """The status URL of an accepted kick-off."""
    assert response.status_code == 202, response.text
    return response.headers["Content-Location"]


def poll(url: str, headers: dict | None = None, seconds: float = 30) -> tuple[list, requests.Response]:
    """Poll until the status is not 202 (a directory export may still be running); the 202s and the final answer."""
    waiting = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        response = requests.get(url, headers=headers, timeout=TIMEOUT)
        if response.status_code != 202:
            return waiting, response
        waiting.append(response)
        time.sleep(0.01)  # pacing only: the server counts polls, not time
    pytest.fail(f"export still in progress after {seconds} s")


def export(server, path: str = "Patient/$export", **params) -> dict:
    """Kick off, poll and return the manifest."""
    _, response = poll(accepted(kickoff(server, path, **params)))
    assert response.status_code == 200, response.text
    return response.json()


def lines(url: str, headers: dict | None = TOKEN) -> list[dict]:
    response = requests.get(url, headers=headers, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/fhir+ndjson"
    return [json.loads(line) for line in response.text.splitlines()]


def exported(manifest: dict) -> dict[str, dict[str, dict]]:
    """Every exported resource by type and id, checking each file's count and type on the way."""
    found: dict[str, dict[str, dict]] = defaultdict(dict)
    for item in manifest["output"]:
        resources = lines(item["url"])
        assert item["count"] == len(resources)
        for resource in resources:
            assert resource["resourceType"] == item["type"]
            found[item["type"]][resource["id"]] = resource
    return found


def ids(resources: dict[str, dict]) -> set[str]:
    return set(resources)


def subject_of(resource: dict) -> str:
    return resource["id"] if resource["resourceType"] == "Patient" else resource["subject"]["reference"][8:]


def is_outcome(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return body


# ---- kick-off ---------------------------------------------------------------------------------------------------


def test_kickoff_without_prefer_respond_async_is_refused(server):
    body = is_outcome(kickoff(server, headers={"Accept": "application/fhir+json"}), 400)
    assert "respond-async" in body["issue"][0]["details"]["text"]


def test_kickoff_without_accept_fhir_json_is_refused(server):
    body = is_outcome(kickoff(server, headers={"Prefer": "respond-async", "Accept": "text/html"}), 400)
    assert "application/fhir+json" in body["issue"][0]["details"]["text"]


def test_kickoff_of_an_unknown_group_is_404(server):
    is_outcome(kickoff(server, "Group/no-such-group/$export"), 404)


@pytest.mark.parametrize(
    "params",
    [
        {"_outputFormat": "text/csv"},
        {"_type": "Patient,NoSuchType"},
        {"_since": "yesterday"},
        {"_elements": "id"},
        {"_typeFilter": "not a query"},
    ],
)
def test_kickoff_parameters_the_server_cannot_honour_are_refused(server, params):
    is_outcome(kickoff(server, **params), 400)


def test_lenient_handling_ignores_unsupported_parameters(server):
    lenient = {**KICKOFF, "Prefer": "respond-async, handling=lenient"}
    accepted(kickoff(server, headers=lenient, _elements="id"))


@pytest.mark.parametrize("output_format", ["application/fhir+ndjson", "application/ndjson", "ndjson"])
def test_every_ndjson_output_format_spelling_is_accepted(server, output_format):
    manifest = export(server, _outputFormat=output_format, _type="Patient")
    assert [o["type"] for o in manifest["output"]] == ["Patient"]


# ---- status and manifest ------------------------------------------------------------------------------------------


def test_status_is_in_progress_with_retry_after_and_progress_then_the_manifest(server):
    server.bulk_configure(in_progress_polls=2, retry_after=3)
    before = datetime.now(UTC)
    response = kickoff(server, _type="Patient,Observation")
    after = datetime.now(UTC)
    waiting, done = poll(accepted(response))

    assert len(waiting) == 2
    assert all(r.headers["Retry-After"] == "3" for r in waiting)
    progress = [r.headers["X-Progress"] for r in waiting]
    assert progress[0] != progress[1] and all(p.endswith("% complete") for p in progress)
    assert done.status_code == 200 and done.headers["Content-Type"].startswith("application/json")
    manifest = done.json()
    assert before.replace(microsecond=0) <= datetime.fromisoformat(manifest["transactionTime"]) <= after
    assert manifest["request"] == response.request.url
    assert manifest["requiresAccessToken"] is True
    assert [o["type"] for o in manifest["output"]] == ["Patient", "Observation"]
    assert manifest["error"] == []


def test_in_progress_answers_leave_out_retry_after_when_configured(server):
    server.bulk_configure(retry_after=None)
    waiting, done = poll(accepted(kickoff(server)))
    assert len(waiting) == 1 and "Retry-After" not in waiting[0].headers
    assert done.status_code == 200


def test_status_of_an_unknown_export_is_404(server):
    is_outcome(requests.get(f"{server.base_url}/bulkstatus/{'0' * 8}-0000-4000-8000-{'0' * 12}", timeout=TIMEOUT), 404)


# ---- what is exported ---------------------------------------------------------------------------------------------


def test_patient_export_holds_every_patient_and_their_resources(server):
    found = exported(export(server))
    assert set(found) == {"Patient", "Observation", "Condition", "MedicationRequest"}
    for resource_type, resources in found.items():
        assert ids(resources) == ids(EXPECTED[resource_type]), resource_type


def test_group_export_holds_only_the_members_resources(server):
    found = exported(export(server, "Group/five/$export"))
    assert ids(found["Patient"]) == set(FIVE)
    for resource_type, resources in EXPECTED.items():
        members_own = {rid for rid, r in resources.items() if subject_of(r) in FIVE}
        assert ids(found.get(resource_type, {})) == members_own, resource_type


def test_group_export_of_the_whole_population_matches_patient_export(server):
    group = exported(export(server, "Group/synthetic/$export"))
    assert {t: ids(r) for t, r in group.items()} == {t: ids(r) for t, r in EXPECTED.items()}


def test_type_limits_the_export_to_the_listed_types_in_their_order(server):
    manifest = export(server, _type="MedicationRequest,Patient")
    assert [o["type"] for o in manifest["output"]] == ["MedicationRequest", "Patient"]


def test_a_type_spans_several_files_when_it_exceeds_the_lines_per_file(server):
    server.bulk_configure(max_lines_per_file=10)
    manifest = export(server, _type="Observation")
    files = manifest["output"]
    total = len(EXPECTED["Observation"])
    assert len(files) == -(-total // 10) and len({f["url"] for f in files}) == len(files)
    assert [f["count"] for f in files] == [10] * (total // 10) + ([total % 10] if total % 10 else [])
    assert ids(exported(manifest)["Observation"]) == ids(EXPECTED["Observation"])


def test_type_filter_is_applied_with_the_search_semantics_of_its_type(server):
    found = exported(
        export(server, _typeFilter=f"Observation?code={TOTAL_CHOLESTEROL},MedicationRequest?status=active")
    )
    cholesterol = {k for k, r in EXPECTED["Observation"].items() if r["code"]["coding"][0]["code"] == "2093-3"}
    active = {k for k, r in EXPECTED["MedicationRequest"].items() if r["status"] == "active"}
    assert cholesterol and active and len(active) < len(EXPECTED["MedicationRequest"])
    assert ids(found["Observation"]) == cholesterol
    assert ids(found["MedicationRequest"]) == active
    assert ids(found["Condition"]) == ids(EXPECTED["Condition"])  # types without a filter: everything


def test_several_type_filters_for_one_type_select_their_union(server):
    both = f"Observation?code={TOTAL_CHOLESTEROL},{HDL}"  # one query with an OR value, holding a comma
    separate = [f"Observation?code={TOTAL_CHOLESTEROL}", f"Observation?code={HDL}"]
    wanted = {k for k, r in EXPECTED["Observation"].items() if r["code"]["coding"][0]["code"] in ("2093-3", "2085-9")}
    assert ids(exported(export(server, _type="Observation", _typeFilter=both))["Observation"]) == wanted
    assert ids(exported(export(server, _type="Observation", _typeFilter=separate))["Observation"]) == wanted


def test_a_refused_type_filter_can_be_retried_without_it(server):
    server.bulk_configure(type_filter=False)
    body = is_outcome(kickoff(server, _typeFilter=f"Observation?code={TOTAL_CHOLESTEROL}"), 400)
    assert "_typeFilter" in body["issue"][0]["details"]["text"]
    found = exported(export(server, _type="Observation"))
    assert ids(found["Observation"]) == ids(EXPECTED["Observation"])


def test_a_type_filter_that_cannot_be_applied_becomes_an_error_file(server):
    manifest = export(server, _type="Patient,Observation", _typeFilter="Observation?no-such-parameter=1")
    assert [o["type"] for o in manifest["output"]] == ["Patient"]
    [error] = manifest["error"]
    assert error["type"] == "OperationOutcome" and error["count"] == 1
    assert requests.get(error["url"], timeout=TIMEOUT).status_code == 401
    [outcome] = lines(error["url"])
    assert outcome["resourceType"] == "OperationOutcome"
    assert "no-such-parameter" in outcome["issue"][0]["details"]["text"]


def test_since_selects_resources_updated_after_it(server):
    everything = export(server, _type="Patient", _since="2000-01-01T00:00:00Z")
    assert ids(exported(everything)["Patient"]) == ids(EXPECTED["Patient"])
    # Nothing was written after the first export's transaction time.
    assert export(server, _type="Patient", _since=everything["transactionTime"])["output"] == []


def test_post_kickoff_takes_parameters_and_a_patient_list(server):
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "_type", "valueString": "Patient,Condition"},
            {"name": "patient", "valueReference": {"reference": f"Patient/{FIVE[0]}"}},
            {"name": "patient", "valueReference": {"reference": f"Patient/{FIVE[1]}"}},
        ],
    }
    url = f"{server.base_url}/Group/five/$export"
    headers = {**KICKOFF, "Content-Type": "application/fhir+json"}
    _, done = poll(accepted(requests.post(url, json=body, headers=headers, timeout=TIMEOUT)))
    manifest = done.json()
    assert manifest["request"] == url
    found = exported(manifest)
    assert ids(found["Patient"]) == set(FIVE[:2])
    assert all(subject_of(r) in FIVE[:2] for r in found.get("Condition", {}).values())


# ---- files, tokens, ranges, DELETE ----------------------------------------------------------------------------


def test_files_need_a_bearer_token_while_the_manifest_requires_one(server):
    url = export(server, _type="Patient")["output"][0]["url"]
    missing = requests.get(url, timeout=TIMEOUT)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert requests.get(url, headers={"Authorization": "Bearer "}, timeout=TIMEOUT).status_code == 401
    assert requests.get(url, headers=TOKEN, timeout=TIMEOUT).status_code == 200

    server.bulk_configure(access_token="the-token")
    assert requests.get(url, headers=TOKEN, timeout=TIMEOUT).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer the-token"}, timeout=TIMEOUT).status_code == 200


def test_files_are_open_when_the_manifest_requires_no_token(server):
    server.bulk_configure(requires_access_token=False)
    manifest = export(server, _type="Patient")
    assert manifest["requiresAccessToken"] is False
    assert len(lines(manifest["output"][0]["url"], headers=None)) == N


def test_require_auth_protects_kickoff_status_and_delete(server):
    server.bulk_configure(require_auth=True)
    assert kickoff(server).status_code == 401
    status = accepted(kickoff(server, headers={**KICKOFF, **TOKEN}))
    assert requests.get(status, timeout=TIMEOUT).status_code == 401
    assert requests.delete(status, timeout=TIMEOUT).status_code == 401
    assert requests.delete(status, headers=TOKEN, timeout=TIMEOUT).status_code == 202
    assert [e["auth"] for e in server.bulk_log()] == [False, True, False, False, True]


def test_a_range_request_answers_the_rest_of_the_file(server):
    url = export(server, _type="Observation")["output"][0]["url"]
    whole = requests.get(url, headers=TOKEN, timeout=TIMEOUT)
    assert whole.headers["Accept-Ranges"] == "bytes"
    size = len(whole.content)
    rest = requests.get(url, headers={**TOKEN, "Range": "bytes=1000-"}, timeout=TIMEOUT)
    assert rest.status_code == 206
    assert rest.headers["Content-Range"] == f"bytes 1000-{size - 1}/{size}"
    assert rest.content == whole.content[1000:]
    beyond = requests.get(url, headers={**TOKEN, "Range": f"bytes={size}-"}, timeout=TIMEOUT)
    assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{size}"


def test_delete_ends_the_export_and_its_files(server):
    status = accepted(kickoff(server, _type="Patient"))
    _, done = poll(status)
    url = done.json()["output"][0]["url"]
    assert requests.delete(status, timeout=TIMEOUT).status_code == 202
    is_outcome(requests.get(status, timeout=TIMEOUT), 404)
    is_outcome(requests.get(url, headers=TOKEN, timeout=TIMEOUT), 404)
    is_outcome(requests.delete(status, timeout=TIMEOUT), 404)


def test_delete_during_the_export_cancels_it(server):
    server.bulk_configure(in_progress_polls=3)
    status = accepted(kickoff(server))
    assert requests.get(status, timeout=TIMEOUT).status_code == 202
    assert requests.delete(status, timeout=TIMEOUT).status_code == 202
    is_outcome(requests.get(status, timeout=TIMEOUT), 404)


# ---- faults -------------------------------------------------------------------------------------------------------


def test_kickoff_throttled_twice_then_accepted(server):
    server.bulk_faults(kickoff_429=2, kickoff_429_retry_after=7)
    for _ in range(2):
        throttled = kickoff(server)
        assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "7"
    accepted(kickoff(server))
    assert server.bulk_faults()["kickoff429"] == 0
    assert [e["status"] for e in server.bulk_log() if e["path"].endswith("/$export")] == [429, 429, 202]


def test_status_unavailable_with_and_without_retry_after(server):
    status = accepted(kickoff(server))
    server.bulk_faults(status_503=1, status_503_retry_after=2)
    body = is_outcome(requests.get(status, timeout=TIMEOUT), 503)
    assert body["issue"][0]["code"] == "transient"
    server.bulk_faults(status_503=1, status_503_retry_after=None)
    unavailable = requests.get(status, timeout=TIMEOUT)
    assert unavailable.status_code == 503 and "Retry-After" not in unavailable.headers
    retried = [r for r in server.bulk_log() if r["path"].startswith("/fhir/R4/bulkstatus")]
    assert [r["status"] for r in retried] == [503, 503]
    waiting, done = poll(status)  # the 503s did not count as in-progress polls
    assert len(waiting) == 1 and done.status_code == 200


def test_a_cut_download_is_short_once_then_whole_and_resumable(server):
    url = export(server, _type="Observation")["output"][0]["url"]
    server.bulk_faults(file_cut=1, file_cut_bytes=100)
    with requests.get(url, headers=TOKEN, timeout=TIMEOUT, stream=True) as cut:
        declared = int(cut.headers["Content-Length"])
        received = b""
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for chunk in cut.iter_content(1):  # byte by byte: a larger read would fail before giving what came
                received += chunk
    assert len(received) == 100 < declared
    rest = requests.get(url, headers={**TOKEN, "Range": f"bytes={len(received)}-"}, timeout=TIMEOUT)
    whole = requests.get(url, headers=TOKEN, timeout=TIMEOUT)
    assert rest.status_code == 206 and received + rest.content == whole.content
    assert len(whole.content) == declared


@pytest.mark.parametrize("expired_status", [410, 404])
def test_expired_files_are_gone_until_a_new_export(server, expired_status):
    server.bulk_configure(expired_status=expired_status)
    server.bulk_faults(files_expire=1)
    url = export(server, _type="Patient")["output"][0]["url"]
    is_outcome(requests.get(url, headers=TOKEN, timeout=TIMEOUT), expired_status)
    again = export(server, _type="Patient")["output"][0]["url"]
    assert len(lines(again)) == N


def test_an_error_file_fault_lists_an_operation_outcome_file(server):
    server.bulk_faults(error_file=1)
    manifest = export(server, _type="Patient")
    [error] = manifest["error"]
    assert error["type"] == "OperationOutcome"
    assert lines(error["url"])[0]["resourceType"] == "OperationOutcome"
    assert len(lines(manifest["output"][0]["url"])) == N  # the output is still there
    assert export(server, _type="Patient")["error"] == []


def test_a_failed_export_answers_500_with_a_fatal_outcome_after_its_progress(server):
    server.bulk_faults(export_fail=1)
    waiting, done = poll(accepted(kickoff(server)))
    assert len(waiting) == 1
    assert is_outcome(done, 500)["issue"][0]["severity"] == "fatal"


def test_unknown_settings_and_faults_are_refused(server):
    with pytest.raises(FhirTestServerError, match="unknown setting"):
        server.bulk_faults(kickoff_492=1)
    with pytest.raises(FhirTestServerError, match="invalid value"):
        server.bulk_configure(retry_after=-1)


def test_the_request_log_records_method_path_time_and_token(server):
    before = int(time.time() * 1000)
    status = accepted(kickoff(server, headers={**KICKOFF, **TOKEN}, _type="Patient"))
    requests.get(status, timeout=TIMEOUT)
    after = int(time.time() * 1000)
    log = server.bulk_log()
    assert [(e["method"], e["path"], e["auth"], e["status"]) for e in log] == [
        ("GET", "/fhir/R4/Patient/$export", True, 202),
        ("GET", status.removeprefix(server.root_url), False, 202),
    ]
    assert log[0]["query"] == "?_type=Patient"
    assert before <= log[0]["time"] <= log[1]["time"] <= after
    server.bulk_clear_log()
    assert server.bulk_log() == []


# ---- a population from a directory --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def population_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("population")
    counts = write_population(directory, 120, seed=3, group_id="cohort")
    return directory, counts


def test_a_directory_population_is_exported_whole(server, population_dir):
    directory, counts = population_dir
    assert server.bulk_source(directory)["files"].keys() == {*counts}
    server.bulk_configure(in_progress_polls=0)
    for path in ("Patient/$export", "Group/cohort/$export"):
        manifest = export(server, path)
        totals = defaultdict(int)
        for item in manifest["output"]:
            totals[item["type"]] += item["count"]
        assert totals == {t: c for t, c in counts.items() if t != "Group"}
    is_outcome(kickoff(server, "Group/five/$export"), 404)  # a repository Group is not in the directory


def test_a_directory_population_honours_group_type_since_and_type_filter(server, tmp_path):
    members = [patient_id(i) for i in (2, 5, 11)]
    expected = expected_by_type(iter_population(20, seed=4))
    write_population(tmp_path, 20, seed=4)
    group = {"resourceType": "Group", "id": "three", "type": "person", "actual": True}
    group["member"] = [{"entity": {"reference": f"Patient/{pid}"}} for pid in members]
    with (tmp_path / "Group.ndjson").open("a") as f:
        f.write(json.dumps(group) + "\n")
    server.bulk_source(tmp_path)

    since = "2024-06-01T00:00:00Z"
    params = {"_type": "Observation,MedicationRequest", "_since": since, "_typeFilter": f"Observation?code={HDL}"}
    found = exported(export(server, "Group/three/$export", **params))
    assert set(found) == {"Observation", "MedicationRequest"}

    def wanted(resource_type: str, code: str | None = None) -> set[str]:
        return {
            k
            for k, r in expected[resource_type].items()
            if subject_of(r) in members
            and r["meta"]["lastUpdated"] > since
            and (code is None or r["code"]["coding"][0]["code"] == code)
        }

    # Patients 10 and 14 (not members) and 11 (only older ones) have medication requests left out.
    assert ids(found["Observation"]) == wanted("Observation", "2085-9") != set()
    assert ids(found["MedicationRequest"]) == wanted("MedicationRequest") != set()
    assert len(wanted("MedicationRequest")) < len(expected["MedicationRequest"])


def test_a_directory_population_keeps_faults_and_delete(server, population_dir):
    server.bulk_source(population_dir[0])
    server.bulk_faults(status_503=1, files_expire=1)
    status = accepted(kickoff(server, "Group/cohort/$export", _type="Patient"))
    assert requests.get(status, timeout=TIMEOUT).status_code == 503
    _, done = poll(status)
    url = done.json()["output"][0]["url"]
    assert requests.get(url, headers=TOKEN, timeout=TIMEOUT).status_code == 410
    assert requests.delete(status, timeout=TIMEOUT).status_code == 202
    assert requests.get(status, timeout=TIMEOUT).status_code == 404


def test_a_directory_without_patients_is_refused(server, tmp_path):
    with pytest.raises(FhirTestServerError, match="Patient.ndjson"):
        server.bulk_source(tmp_path)
    assert server.bulk_source(None)["directory"] is None


def test_five_thousand_patients_export_from_a_directory(server, tmp_path):
    counts = write_population(tmp_path, 5000, seed=1)
    server.bulk_source(tmp_path)
    server.bulk_configure(in_progress_polls=0, max_lines_per_file=5000)
    manifest = export(server, "Group/synthetic/$export")
    totals = defaultdict(int)
    for item in manifest["output"]:
        assert item["count"] <= 5000
        totals[item["type"]] += item["count"]
    assert totals == {t: c for t, c in counts.items() if t != "Group"}
    last = manifest["output"][-1]
    assert len(lines(last["url"])) == last["count"]
