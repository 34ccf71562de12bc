"""Population runs end to end with real processes: ``gateway batch start`` and ``gateway jobs worker`` processes on
one ledger, the Node FHIR test server's Bulk Data export, SMART Backend Services against a token endpoint double.
Workers are SIGKILLed at random moments of a run, and four of them share a run on PostgreSQL; whatever happens,
each patient is in the outputs exactly once and written back at most once."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from app.batch import runs
from app.batch.parts import SUBJECT_EXTENSION
from app.db import make_engine
from app.jobs import presence
from app.smart.keys import KeyStore
from tests.conftest import require
from tests.support.databases import postgres_database, postgres_unavailable, sqlite_database
from tests.support.population import patient_id, write_population
from tests.support.processes import GATEWAY, ROOT, start_worker
from tests.support.tokens import TEST_ISSUER, clients_document

SERVICE = "cardiovascular-risk"
RUN_ID = re.compile(r"run-[0-9a-f]{16}")
OUTPUTS = ["OperationOutcome.ndjson", "RiskAssessment.ndjson", "manifest.json", "report.html", "worklist.csv"]
SCOPE = (
    "system/Patient.rs system/Observation.rs system/Condition.rs system/MedicationRequest.rs system/RiskAssessment.c"
)


@pytest.fixture
def token_url(make_httpserver):
    """A SMART Backend Services token endpoint double: a token for any request (the integration tests check the
    assertion; here it only has to let the worker processes in)."""
    body = {"access_token": "batch-e2e-token", "token_type": "Bearer", "expires_in": 300, "scope": SCOPE}
    make_httpserver.expect_request("/batch-e2e-token", method="POST").respond_with_json(body)
    yield make_httpserver.url_for("/batch-e2e-token")
    make_httpserver.clear()


def batch_settings(tmp_path: Path, signing_key, token_url: str, database_url: str, **extra: str) -> dict[str, str]:
    """The environment every gateway process of a test shares: clients file, our keys, database, BATCH_DIR."""
    document = clients_document(signing_key, ["http://127.0.0.1:*"])
    document["clients"][0]["smart_backend"] = {"token_url": token_url, "client_id": "gateway-batch", "scope": SCOPE}
    clients = tmp_path / "batch-clients.json"
    clients.write_text(json.dumps(document))
    instance = tmp_path / "instance"
    KeyStore(instance / "keys").generate()
    return {
        "DATABASE_URL": database_url,
        "CDS_CLIENTS_FILE": str(clients),
        "INSTANCE_PATH": str(instance),
        "AUDIT_LOG": str(tmp_path / "audit.jsonl"),
        "BATCH_DIR": str(tmp_path / "batch"),
        "PUBLIC_BASE_URL": "http://gateway.test",
        "JOB_POLL_S": "0.05",
        **extra,
    }


def gateway(settings: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """One ``gateway`` command as its own process, with the test's settings."""
    return subprocess.run(
        [str(GATEWAY), *args],
        cwd=ROOT,
        env={**os.environ, **settings},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def batch_start(settings: dict[str, str], fhir_base: str, group: str, *options: str, timeout: float = 60):
    """``gateway batch start cardiovascular-risk --client ISS --fhir-server URL --group ID [options]``."""
    command = ["batch", "start", SERVICE, "--client", TEST_ISSUER, "--fhir-server", fhir_base, "--group", group]
    return gateway(settings, *command, *options, timeout=timeout)


def start_run(settings: dict[str, str], fhir_base: str, group: str, *options: str) -> str:
    """``gateway batch start`` without --wait: the run id it prints first."""
    started = batch_start(settings, fhir_base, group, *options)
    assert started.returncode == 0, started.stderr[-2000:]
    run_id = started.stdout.splitlines()[0]
    assert RUN_ID.fullmatch(run_id), started.stdout
    return run_id


class Workers:
    """``gateway jobs worker`` processes, each logging to a file of its own (restarts append to it)."""

    def __init__(self, settings: dict[str, str], logs: Path, count: int, *args: str):
        self.settings, self.args = settings, args
        self.logs = [logs / f"worker-{n}.log" for n in range(count)]
        self.procs = [start_worker(settings, *args, log_path=log) for log in self.logs]

    def kill(self, n: int) -> None:
        """SIGKILL worker ``n`` (no cleanup of any kind), then start it again."""
        os.killpg(self.procs[n].pid, signal.SIGKILL)
        self.procs[n].wait(timeout=10)
        self.procs[n] = start_worker(self.settings, *self.args, log_path=self.logs[n])

    def check_alive(self) -> None:
        for n, proc in enumerate(self.procs):
            assert proc.poll() is None, f"worker {n} died: {self.logs[n].read_text()[-3000:]}"

    def wait_live(self, engine, timeout: float = 60) -> None:
        """Until every worker has registered its heartbeat, so that all compete from the run's first job on."""
        deadline = time.monotonic() + timeout
        while (live := presence.live_count(engine)) < len(self.procs):
            self.check_alive()
            assert time.monotonic() < deadline, f"only {live} of {len(self.procs)} workers live after {timeout} s"
            time.sleep(0.1)

    def stop(self) -> list[int]:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        return [proc.wait(timeout=30) for proc in self.procs]

    def job_events(self) -> list[dict]:
        """The JSON job event lines the workers wrote (a line cut short by a SIGKILL is skipped)."""
        events = []
        for log in self.logs:
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith('{"ts"') and '"event":"job.' in line:
                    try:
                        events.append(json.loads(line))
                    except ValueError:
                        continue
        return events


def wait_for_end(engine, run_id: str, workers: Workers, timeout: float) -> runs.Run:
    """Poll the run until it ends (bounded), failing at once if a worker dies."""
    deadline = time.monotonic() + timeout
    while True:
        run = runs.get(engine, run_id)
        if run.ended:
            return run
        workers.check_alive()
        assert time.monotonic() < deadline, f"run not ended after {timeout} s: {run.state} ({run.note})"
        time.sleep(0.2)


def wait_for_state(engine, run_id: str, state: str, workers: Workers, timeout: float) -> None:
    """Poll the run until it is in ``state`` or a later one (bounded)."""
    order = [runs.EXPORTING, runs.SPLITTING, runs.SCORING, runs.FINISHING, runs.SUCCEEDED]
    deadline = time.monotonic() + timeout
    while (run := runs.get(engine, run_id)).state not in order[order.index(state) :]:
        assert not run.ended, f"the run ended {run.state}: {run.error}"
        workers.check_alive()
        assert time.monotonic() < deadline, f"the run was not {state} after {timeout} s: {run.state} ({run.note})"
        time.sleep(0.1)


def outcome_subjects(directory: Path) -> Counter[str]:
    """Each patient's count over RiskAssessment.ndjson and OperationOutcome.ndjson ("Patient/id")."""
    seen: Counter[str] = Counter()
    with (directory / "RiskAssessment.ndjson").open("rb") as handle:
        for line in handle:
            seen[orjson.loads(line)["subject"]["reference"]] += 1
    with (directory / "OperationOutcome.ndjson").open("rb") as handle:
        for line in handle:
            issue = orjson.loads(line)["issue"][0]
            about = [
                e["valueReference"]["reference"] for e in issue.get("extension", ()) if e["url"] == SUBJECT_EXTENSION
            ]
            assert about, f"an OperationOutcome about no patient: {issue.get('diagnostics')}"
            seen[about[0]] += 1
    return seen


def assert_each_patient_once(directory: Path, n: int) -> Counter[str]:
    seen = outcome_subjects(directory)
    expected = {f"Patient/{patient_id(i)}" for i in range(1, n + 1)}
    duplicated = sorted(p for p, count in seen.items() if count > 1)
    assert not duplicated, f"{len(duplicated)} patients more than once, e.g. {duplicated[:5]}"
    assert not expected - set(seen), f"{len(expected - set(seen))} patients missing"
    assert set(seen) == expected
    return seen


def assert_manifest_matches(directory: Path) -> dict:
    manifest = json.loads((directory / "manifest.json").read_text())
    assert {f["name"] for f in manifest["files"]} == set(OUTPUTS) - {"manifest.json"}
    for entry in manifest["files"]:
        data = (directory / entry["name"]).read_bytes()
        assert (entry["lines"], entry["bytes"]) == (data.count(b"\n"), len(data)), entry["name"]
        assert entry["sha256"] == hashlib.sha256(data).hexdigest(), entry["name"]
    assert sorted(p.name for p in directory.iterdir()) == OUTPUTS  # the export, splits and parts (PHI) are gone
    return manifest


def stored_risk_assessments(server, run_id: str) -> list[dict]:
    """The RiskAssessments of this run in the FHIR server, every page of the search."""
    found, url, pages = [], f"{server.base_url}/RiskAssessment?_count=1000", 0
    while url:
        pages += 1
        assert pages < 200, "more pages than any run of these tests can have written"
        bundle = server.get_json(url)
        found += [e["resource"] for e in bundle.get("entry", ())]
        url = next((link["url"] for link in bundle.get("link", ()) if link["relation"] == "next"), None)
    return [r for r in found if r["identifier"][0]["value"].startswith(f"{run_id}/")]


def successful_kickoffs(server) -> list[dict]:
    return [e for e in server.bulk_log() if e["path"].endswith("/$export") and e["status"] == 202]


# ---- 1. done when: the Synthea sample, one worker, `gateway batch start --wait` ---------------------------------


@pytest.fixture(scope="module")
def synthea_group(fhir_server, synthea_dir) -> tuple[str, list[str]]:
    """The Synthea sample in the FHIR server's repository, and a Group of all its patients."""
    fhir_server.post_bundle_files(sorted((synthea_dir / "bundles").glob("*.json")))
    patients = [json.loads(line)["id"] for line in (synthea_dir / "ndjson" / "Patient.ndjson").read_text().splitlines()]
    members = [{"entity": {"reference": f"Patient/{p}"}} for p in patients]
    fhir_server.put(
        [{"resourceType": "Group", "id": "synthea-e2e", "type": "person", "actual": True, "member": members}]
    )
    return "synthea-e2e", patients


@pytest.mark.slow
def test_gateway_batch_start_waits_for_one_worker_to_score_the_synthea_sample(
    tmp_path, bulk, synthea_group, signing_key, token_url
):
    group, patients = synthea_group
    settings = batch_settings(tmp_path, signing_key, token_url, sqlite_database(tmp_path))
    workers = Workers(settings, tmp_path, 1)
    try:
        started = batch_start(settings, bulk.base_url, group, "--wait", timeout=150)
        workers.check_alive()
    finally:
        exit_codes = workers.stop()
    assert exit_codes == [0]
    assert started.returncode == 0, started.stdout + started.stderr[-3000:]
    run_id = started.stdout.splitlines()[0]
    assert RUN_ID.fullmatch(run_id)
    assert f"{run_id}: succeeded" in started.stdout
    directory = Path(settings["BATCH_DIR"]) / run_id
    manifest = assert_manifest_matches(directory)
    lines = {f["name"]: f["lines"] for f in manifest["files"]}
    assert lines["RiskAssessment.ndjson"] + lines["OperationOutcome.ndjson"] == len(patients)
    assert lines["RiskAssessment.ndjson"] >= 40 and lines["worklist.csv"] == manifest["counts"]["worklist"] + 1
    assert set(outcome_subjects(directory)) == {f"Patient/{p}" for p in patients}

    status = gateway(settings, "batch", "status", run_id, "--json")
    assert status.returncode == 0, status.stderr
    view = json.loads(status.stdout)
    assert (view["id"], view["state"], view["error"]) == (run_id, "succeeded", None)
    assert view["counts"]["patients"] == len(patients) and view["counts"]["scored"] == lines["RiskAssessment.ndjson"]
    listed = gateway(settings, "batch", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split("\t")[:3] == [run_id, "succeeded", SERVICE]
    assert len(successful_kickoffs(bulk)) == 1


# ---- 2. kills: two workers, five SIGKILLs at random moments, write-back ------------------------------------------


KILL_PATIENTS = 5000


@pytest.mark.slow
def test_five_random_worker_kills_leave_every_patient_once_in_the_outputs_and_the_ehr(
    tmp_path, bulk, signing_key, token_url
):
    seed = int(os.environ.get("KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    write_population(tmp_path / "population", KILL_PATIENTS, seed=13, group_id="synthetic")
    bulk.bulk_source(tmp_path / "population")
    settings = batch_settings(
        tmp_path, signing_key, token_url, sqlite_database(tmp_path), BATCH_PART_BYTES=str(1 << 20), JOB_LEASE_S="2"
    )
    engine = make_engine(settings["DATABASE_URL"])
    run_id = start_run(settings, bulk.base_url, "synthetic", "--write-back")
    workers = Workers(settings, tmp_path, 2)
    kills: list[str] = []
    started = time.monotonic()
    try:
        for number in range(5):
            if number == 2:  # the last three land in scoring and write-back, the longest stage
                wait_for_state(engine, run_id, runs.SCORING, workers, timeout=90)
            # A random moment: before, during or after a worker's start-up, anywhere in a stage.
            time.sleep(rng.uniform(0.3, 3.0) if number < 2 else rng.uniform(0.5, 5.0))
            run = runs.get(engine, run_id)
            assert not run.ended, f"seed {seed}: the run ended after {len(kills)} kills: {run.state} {run.error}"
            workers.kill(rng.randrange(2))
            kills.append(f"{run.state}{' (' + run.note + ')' if run.note else ''}")
        run = wait_for_end(engine, run_id, workers, timeout=240)
    finally:
        exit_codes = workers.stop()
    elapsed = time.monotonic() - started
    events = workers.job_events()
    retries = Counter((e["kind"], e.get("error")) for e in events if e["event"] == "job.retry")
    lapsed = Counter(e["kind"] for e in events if e["event"] == "job.lease-lapsed")
    print(f"seed {seed}: killed during {kills}; {elapsed:.1f} s, {run.summary['durations']}")
    print(f"seed {seed}: jobs taken over from killed workers {dict(lapsed)}; retries {dict(retries)}")
    assert lapsed, f"seed {seed}: no kill interrupted a job"  # the kills hit work in hand, not idle workers only
    assert exit_codes == [0, 0]  # the restarted workers stop cleanly
    assert run.state == runs.SUCCEEDED, f"seed {seed}: {run.error}"
    directory = Path(settings["BATCH_DIR"]) / run_id
    assert_manifest_matches(directory)
    seen = assert_each_patient_once(directory, KILL_PATIENTS)
    lines = (directory / "RiskAssessment.ndjson").read_bytes().splitlines()
    scored = {orjson.loads(line)["subject"]["reference"] for line in lines}
    counts = run.summary["counts"]
    assert (counts["patients"], counts["scored"], counts["writtenBack"]) == (len(seen), len(scored), len(scored))
    stored = stored_risk_assessments(bulk, run_id)
    subjects = Counter(r["subject"]["reference"] for r in stored)
    assert not [s for s, n in subjects.items() if n > 1], f"seed {seed}: written back twice"
    assert set(subjects) == scored, f"seed {seed}: {len(scored - set(subjects))} scored patients not written back"
    assert all(r["identifier"][0]["value"] == f"{run_id}/{r['subject']['reference'][8:]}" for r in stored)
    assert len(successful_kickoffs(bulk)) == 1, f"seed {seed}: exported more than once"
    assert run.exports == 1

    # The same outputs as a run nobody killed (the run's id and the export's time aside).
    (tmp_path / "calm").mkdir()
    calm = Workers(settings, tmp_path / "calm", 2)
    try:
        reference_id = start_run(settings, bulk.base_url, "synthetic")
        reference = wait_for_end(engine, reference_id, calm, timeout=120)
    finally:
        calm.stop()
    assert reference.state == runs.SUCCEEDED, reference.error
    reference_dir = Path(settings["BATCH_DIR"]) / reference_id
    for name in ("RiskAssessment.ndjson", "OperationOutcome.ndjson", "worklist.csv"):
        texts = [
            re.sub(r'"occurrenceDateTime":"[^"]*"', "", (folder / name).read_text().replace(rid, "RUN"))
            for folder, rid in ((directory, run_id), (reference_dir, reference_id))
        ]
        assert texts[0] == texts[1], f"seed {seed}: {name} differs from a run without kills"


# ---- 3. PostgreSQL: four worker processes share one run -----------------------------------------------------------


SHARED_PATIENTS = 2000


@pytest.fixture
def postgres_url():
    require(postgres_unavailable())
    with postgres_database() as url:
        yield url


@pytest.mark.slow
def test_four_worker_processes_on_postgresql_share_one_run(postgres_url, tmp_path, bulk, signing_key, token_url):
    write_population(tmp_path / "population", SHARED_PATIENTS, seed=17, group_id="shared")
    bulk.bulk_source(tmp_path / "population")
    settings = batch_settings(tmp_path, signing_key, token_url, postgres_url, BATCH_PART_BYTES=str(256 * 1024))
    engine = make_engine(postgres_url)
    workers = Workers(settings, tmp_path, 4)
    try:
        workers.wait_live(engine)
        run_id = start_run(settings, bulk.base_url, "shared")
        run = wait_for_end(engine, run_id, workers, timeout=150)
    finally:
        exit_codes = workers.stop()
    assert exit_codes == [0, 0, 0, 0]
    assert run.state == runs.SUCCEEDED, run.error
    directory = Path(settings["BATCH_DIR"]) / run_id
    assert_manifest_matches(directory)
    assert_each_patient_once(directory, SHARED_PATIENTS)
    assert run.summary["counts"]["patients"] == SHARED_PATIENTS
    done = [
        e for e in workers.job_events() if e["event"] == "job.succeeded" and e["job"].startswith(f"batch:{run_id}:")
    ]
    parts = [e for e in done if e["kind"] in ("batch.split", "batch.score")]
    buckets, ranges = run.plan["buckets"], len(run.plan["ranges"])
    assert Counter(e["kind"] for e in done) == {
        "batch.export": 1,
        "batch.split": ranges,
        "batch.score": buckets,
        "batch.finish": 1,
    }  # each stage's job ran to completion once
    by_process = Counter(e["worker"].rsplit("/", 1)[0] for e in parts)
    print(f"parts run per worker process: {sorted(by_process.values())}")
    assert len(by_process) >= 3, f"the parts were not shared: {by_process}"


# ---- a run without faults spends no attempts ----------------------------------------------------------------------


def test_a_run_without_faults_fails_no_part(tmp_path, bulk, signing_key, token_url):
    write_population(tmp_path / "population", 600, seed=19, group_id="calm")
    bulk.bulk_source(tmp_path / "population")
    settings = batch_settings(
        tmp_path, signing_key, token_url, sqlite_database(tmp_path), BATCH_PART_BYTES=str(64 * 1024)
    )
    engine = make_engine(settings["DATABASE_URL"])
    workers = Workers(settings, tmp_path, 2)
    try:
        workers.wait_live(engine)
        run_id = start_run(settings, bulk.base_url, "calm")
        run = wait_for_end(engine, run_id, workers, timeout=90)
    finally:
        workers.stop()
    assert run.state == runs.SUCCEEDED, run.error
    failed = Counter(
        (e["kind"], e.get("error"))
        for e in workers.job_events()
        if e["event"] in ("job.retry", "job.dead") and e["job"].startswith(f"batch:{run_id}:")
    )
    assert failed == Counter(), f"parts failed in a run without faults: {failed}"
