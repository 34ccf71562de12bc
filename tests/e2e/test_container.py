"""The container image, built and run with podman: keys, migrate, serve and worker containers against PostgreSQL.

One deployment for the module, as an operator would bring it up: signing keys generated once into a secret
directory, the database migrated by a one-off ``migrate`` container (the web server does not migrate it), then a
web server and a job worker reading that directory read-only. Calls come over HTTP with a trusted client's JWT;
the discharge job runs in the worker container, reads and writes a real FHIR server, and authenticates with a
client assertion that the token endpoint checks against the keys the web server publishes.

Needs root, podman and the python:3.11-slim base image that ``.ci/container-setup`` makes; skipped otherwise.
Containers use the host's network: PostgreSQL, the FHIR test server and the token endpoint listen on loopback.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import jwt
import psycopg
import pytest
import requests
import sqlalchemy as sa

from app.config import SECRET_SETTINGS
from app.jobs import ledger
from tests.conftest import require
from tests.support.containers import BASE_IMAGE, Podman, podman_session, podman_unavailable
from tests.support.databases import ADMIN_URL, postgres_unavailable
from tests.support.processes import free_port, healthy
from tests.support.tokens import clients_document

# The first test also builds the image (about 20 s on 2 idle cores; more while other tests run).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
PUBLIC_BASE_URL = "https://gateway.test"  # as behind the TLS proxy; calls go to the container's port directly
UID = 10001  # the image's user (Dockerfile)
JOB_KIND = "discharge-summary.draft"
SNOMED = "http://snomed.info/sct"
DEV_TOOLS = ("pytest", "hypothesis", "selenium", "responses", "pytest_httpserver", "ruff", "pip")


@pytest.fixture(scope="module")
def podman():
    require(podman_unavailable())
    with podman_session() as engine:
        yield engine


@pytest.fixture(scope="module")
def image(podman: Podman) -> str:
    started = time.monotonic()
    tag = podman.build(ROOT, f"localhost/clinical-ai-gateway-test:{podman.run_id}")
    size = int(podman("image", "inspect", "--format={{.Size}}", tag).stdout)
    print(f"\nimage {tag} built in {time.monotonic() - started:.1f} s on {BASE_IMAGE}: {size / 1e6:.0f} MB")
    return tag


@pytest.fixture(scope="module")
def empty_database():
    """A new PostgreSQL database with no tables: migrating it is the ``migrate`` container's job."""
    require(postgres_unavailable())
    name = f"gateway_container_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class TokenEndpoint:
    """SMART Backend Services token endpoint that accepts a client assertion only when it verifies against the
    gateway's published JWK Set: the worker signs with the keys that the web server publishes."""

    def __init__(self, httpserver, path: str, client_id: str):
        self.url = httpserver.url_for(path)
        self.client_id = client_id
        self.jwks_url: str | None = None
        self.verified: list[str] = []
        self.refused: list[str] = []
        httpserver.expect_request(path, method="POST").respond_with_handler(self.handle)

    def handle(self, request):
        from werkzeug import Response

        try:
            assertion = request.form["client_assertion"]
            kid = jwt.get_unverified_header(assertion)["kid"]
            jwks = requests.get(self.jwks_url, timeout=5).json()
            (jwk,) = [key for key in jwks["keys"] if key["kid"] == kid]
            jwt.decode(assertion, jwt.PyJWK(jwk).key, algorithms=[jwk["alg"]], audience=self.url, issuer=self.client_id)
        except Exception as exc:  # any failure is the test's finding, reported by the assertions
            self.refused.append(repr(exc))
            return Response(json.dumps({"error": "invalid_client"}), 401, content_type="application/json")
        self.verified.append(kid)
        body = {"access_token": f"token-{uuid.uuid4().hex}", "token_type": "bearer", "expires_in": 300}
        return Response(json.dumps(body), content_type="application/json")


@pytest.fixture(scope="module")
def deployment(podman, image, empty_database, tmp_path_factory, signing_key, make_httpserver, fhir_server):
    """keys, then the web server (on a database nobody has migrated yet), then migrate, then a worker."""
    secrets = tmp_path_factory.mktemp("container-secrets")
    secrets.chmod(0o755)
    token_endpoint = TokenEndpoint(make_httpserver, f"/token-{podman.run_id}", "gateway-container-test")
    document = clients_document(signing_key, ["http://127.0.0.1:*", "http://localhost:*"])
    document["clients"][0]["smart_backend"] = {
        "token_url": token_endpoint.url,
        "client_id": token_endpoint.client_id,
        "scope": "system/DocumentReference.c system/Encounter.r system/Condition.r",
    }
    clients = secrets / "clients.json"
    clients.write_text(json.dumps(document))
    metrics_token = secrets / "metrics-token"
    metrics_token.write_text(uuid.uuid4().hex + "\n")
    keys = secrets / "keys"
    keys.mkdir(mode=0o700)
    os.chown(keys, UID, UID)
    for path in (clients, metrics_token):
        path.chmod(0o644)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    token_endpoint.jwks_url = f"{base}/.well-known/jwks.json"
    env = {
        "DATABASE_URL": empty_database,
        "CDS_CLIENTS_FILE": "/run/secrets/clients.json",
        "KEYS_DIR": "/run/secrets/keys",
        "METRICS_TOKEN_FILE": "/run/secrets/metrics-token",
        "PUBLIC_BASE_URL": PUBLIC_BASE_URL,
        "PORT": str(port),
        "WEB_CONCURRENCY": "2",
        "JOB_POLL_S": "0.2",
    }
    options = tuple(f"--env={name}={value}" for name, value in env.items()) + (
        f"--volume={clients}:/run/secrets/clients.json:ro",
        f"--volume={metrics_token}:/run/secrets/metrics-token:ro",
        "--health-interval=disable",  # no systemd timers here; `podman healthcheck run` checks it on demand
    )
    # As in deploy/compose.yaml: a read-only root filesystem (podman adds tmpfs /tmp), the keys read-only.
    long_running = (*options, "--read-only", f"--volume={keys}:/run/secrets/keys:ro")

    def one_off(*args: str, keys_mount: str = "ro"):
        return podman(
            "run", "--rm", "--network=host", f"--label={podman.label}", *options,
            f"--volume={keys}:/run/secrets/keys:{keys_mount}", image, *args,
        )  # fmt: skip

    generated = one_off("keys", keys_mount="rw")
    again = one_off("keys", keys_mount="rw")
    mounted = one_off("keys")
    serve = podman.start("serve", image, options=long_running)
    deadline = time.monotonic() + 60
    while not healthy(base):
        state = podman("inspect", "--format={{.State.Status}}", serve).stdout.strip()
        assert state == "running" and time.monotonic() < deadline, podman.logs(serve)[-3000:]
        time.sleep(0.2)
    tables_before_migrate = _tables(empty_database)
    migrated = one_off("migrate")
    migrated_again = one_off("migrate")
    worker = podman.start("worker", image, "worker", "--threads", "1", options=long_running)
    yield {
        "base": base,
        "database": empty_database,
        "keys": keys,
        "metrics_token": metrics_token.read_text().strip(),
        "serve": serve,
        "worker": worker,
        "token_endpoint": token_endpoint,
        "fhir": fhir_server,
        "one_off": {
            "keys": generated,
            "keys again": again,
            "keys read-only": mounted,
            "migrate": migrated,
            "migrate again": migrated_again,
        },
        "tables_before_migrate": tables_before_migrate,
    }


def _tables(database_url: str) -> set[str]:
    engine = sa.create_engine(database_url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def call(deployment, signing_key, path: str, body: dict | None = None) -> requests.Response:
    """A trusted client's call, its JWT's audience the public URL as an EHR would address it."""
    headers = {"Authorization": f"Bearer {signing_key.token(PUBLIC_BASE_URL + path)}"}
    if body is None:
        return requests.get(deployment["base"] + path, headers=headers, timeout=10)
    return requests.post(deployment["base"] + path, json=body, headers=headers, timeout=10)


def test_keys_are_made_once_and_the_web_server_does_not_migrate(deployment):
    one_off = deployment["one_off"]
    assert one_off["keys"].stdout.count("new signing key") == 2
    assert "nothing generated" in one_off["keys again"].stdout
    assert "read-only" in one_off["keys read-only"].stdout and "nothing generated" in one_off["keys read-only"].stdout
    index = json.loads((deployment["keys"] / "keys.json").read_text())
    files = list(deployment["keys"].iterdir())
    assert all(path.stat().st_uid == UID for path in files), "written by the image's user"
    assert {path.name for path in files} >= {"keys.json", "smart-sessions.fernet"}

    assert deployment["tables_before_migrate"] == set(), "the web server must not migrate on start"
    assert "database at revision head" in one_off["migrate"].stdout
    assert "Running upgrade" not in one_off["migrate again"].stderr
    assert {"jobs", "feedback"} <= _tables(deployment["database"])

    jwks = requests.get(deployment["base"] + "/.well-known/jwks.json", timeout=5).json()
    assert {key["kid"] for key in jwks["keys"]} == {entry["kid"] for entry in index["keys"]}
    assert {key["alg"] for key in jwks["keys"]} == {"RS384", "ES384"}


def test_an_authenticated_patient_view_call_gets_a_card(deployment, signing_key, hook_body):
    answer = call(deployment, signing_key, "/cds-services/cardiovascular-risk", hook_body)
    assert answer.status_code == 200, answer.text
    (card,) = answer.json()["cards"]
    assert card["summary"] and card["indicator"] in ("info", "warning", "critical")
    unsigned = requests.post(deployment["base"] + "/cds-services/cardiovascular-risk", json=hook_body, timeout=10)
    assert unsigned.status_code == 401


def seed_encounter(fhir_server, patient_id: str, encounter_id: str) -> None:
    subject = {"reference": f"Patient/{patient_id}"}
    fhir_server.put(
        [
            {"resourceType": "Patient", "id": patient_id, "gender": "male", "birthDate": "1948-09-12"},
            {
                "resourceType": "Encounter",
                "id": encounter_id,
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
                "subject": subject,
                "period": {"start": "2026-11-21T08:00:00Z", "end": "2026-11-26T12:00:00Z"},
            },
            {
                "resourceType": "Condition",
                "id": f"{encounter_id}-c",
                "subject": subject,
                "encounter": {"reference": f"Encounter/{encounter_id}"},
                "code": {"coding": [{"system": SNOMED, "code": "84114007", "display": "Heart failure"}]},
            },
        ]
    )


def wait_for_job(database_url: str, timeout: float = 90) -> ledger.Job:
    engine = sa.create_engine(database_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            jobs = [job for state in ledger.STATES for job in ledger.find(engine, state, kind=JOB_KIND)]
            if jobs and jobs[0].state in (ledger.SUCCEEDED, ledger.DEAD, ledger.EXPIRED):
                return jobs[0]
            assert time.monotonic() < deadline, f"the job did not finish: {[(j.state, j.last_error) for j in jobs]}"
            time.sleep(0.2)
    finally:
        engine.dispose()


def test_a_discharge_job_runs_in_the_worker_container_and_writes_back(deployment, signing_key):
    patient, encounter = f"p-{uuid.uuid4().hex[:8]}", f"e-{uuid.uuid4().hex[:8]}"
    seed_encounter(deployment["fhir"], patient, encounter)
    hook = {
        "hookInstance": str(uuid.uuid4()),
        "hook": "encounter-discharge",
        "fhirServer": deployment["fhir"].base_url,
        "context": {"userId": "Practitioner/dr-1", "patientId": patient, "encounterId": encounter},
    }
    first = call(deployment, signing_key, "/cds-services/discharge-summary", hook)
    assert first.status_code == 200, first.text
    assert first.json()["cards"][0]["summary"] == "A draft discharge summary is being prepared"

    job = wait_for_job(deployment["database"])
    endpoint = deployment["token_endpoint"]
    assert job.state == ledger.SUCCEEDED, f"{job.state}: {job.last_error}; token endpoint refused {endpoint.refused}"
    assert endpoint.verified and not endpoint.refused, "the worker signs with the keys the web server publishes"
    status = call(deployment, signing_key, f"/jobs/{job.id}").json()
    assert status["status"] == "succeeded" and status["result"]["docStatus"] == "preliminary"
    found = deployment["fhir"].get_json("DocumentReference", params={"identifier": f"{PUBLIC_BASE_URL}/jobs|{job.id}"})
    (entry,) = found["entry"]
    assert status["result"]["documentReference"] == f"DocumentReference/{entry['resource']['id']}"
    assert "Heart failure" in status["result"]["summary"]
    hook["hookInstance"] = str(uuid.uuid4())
    again = call(deployment, signing_key, "/cds-services/discharge-summary", hook)
    assert again.json()["cards"][0]["summary"] == "A draft discharge summary is ready for your review"


def test_secrets_as_files_health_check_and_an_unprivileged_user(podman, deployment):
    metrics = deployment["base"] + "/metrics"
    assert requests.get(metrics, timeout=5).status_code == 401
    token = deployment["metrics_token"]
    assert requests.get(metrics, headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code == 200

    assert podman("healthcheck", "run", deployment["serve"], check=False).returncode == 0
    for name in (deployment["serve"], deployment["worker"]):
        assert podman("exec", name, "id", "-u").stdout.strip() == str(UID)
        users = podman("top", name, "user").stdout.split()[1:]
        assert users and set(users) == {"gateway"}, users


def test_the_image_holds_no_test_tools_no_pip_and_no_instance_data(podman, image):
    probe = (
        "import importlib.util, json, pathlib, sys; "
        f"found = [m for m in {DEV_TOOLS!r} if importlib.util.find_spec(m)]; "
        "site = pathlib.Path(sys.prefix, 'lib'); "
        "stray = [str(p) for p in site.rglob('*') if p.name in ('instance', 'keys.json', 'smart-sessions.fernet')]; "
        "home = [str(p) for p in pathlib.Path('/var/lib/gateway').rglob('*') if not p.is_dir()]; "
        "print(json.dumps({'modules': found, 'stray': stray, 'home': home, 'prefix': sys.prefix}))"
    )
    out = podman("run", "--rm", "--network=none", f"--label={podman.label}", "--entrypoint=python", image, "-c", probe)
    report = json.loads(out.stdout)
    assert report == {"modules": [], "stray": [], "home": [], "prefix": "/opt/gateway"}
    config = json.loads(podman("image", "inspect", image).stdout)[0]
    assert config["Config"]["User"] == "gateway:gateway"
    assert config["Config"]["Entrypoint"] == ["gateway-entrypoint"] and config["Config"]["Cmd"] == ["serve"]
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])


@pytest.mark.parametrize(
    ("env", "args", "says"),
    [
        ({}, (), "CDS_CLIENTS_FILE unset"),  # the development clients file, listening on 0.0.0.0
        ({"METRICS_TOKEN": "a", "METRICS_TOKEN_FILE": "/etc/hostname"}, ("worker",), "not both"),
        ({"ADMIN_TOKEN_FILE": "/run/secrets/absent"}, ("migrate",), "cannot be read"),
    ],
)
def test_a_bad_setting_stops_a_container_with_one_line_and_status_2(podman, image, env, args, says):
    options = [f"--env={name}={value}" for name, value in env.items()]
    out = podman("run", "--rm", "--network=none", f"--label={podman.label}", *options, image, *args, check=False)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and says in lines[0], out


def test_compose_names_commands_the_image_has(podman, deployment):
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert services["gateway"]["deploy"]["replicas"] == 2 and services["worker"]["deploy"]["replicas"] == 2
    assert {"migrate", "keys", "postgres", "redis", "proxy"} <= set(services)
    assert services["gateway"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "command" not in services["gateway"] or services["gateway"]["command"][0] == "serve"

    ours = [name for name, service in services.items() if "build" in service or "gateway" in str(service.get("image"))]
    assert set(ours) == {"gateway", "worker", "migrate", "keys"}
    for name in ours:
        environment = services[name].get("environment", {})
        for variable in (v for v in environment if v.endswith("_FILE") and v != "CDS_CLIENTS_FILE"):
            assert variable.removesuffix("_FILE") in SECRET_SETTINGS, f"{name}: the service ignores {variable}"
        command = services[name].get("command", ["serve"])
        if command == ["keys"]:  # without arguments it would generate; its subcommands must exist
            command = ["keys", "generate"]
        shown = podman("exec", deployment["serve"], "gateway-entrypoint", *command, "--help", check=False)
        assert shown.returncode == 0, f"{name}: {command} --help: {shown.stderr[-500:]}"


def test_sigterm_stops_web_server_and_worker_promptly(podman, deployment):
    # Last in the module: the deployment is not usable afterwards.
    for name in (deployment["worker"], deployment["serve"]):
        took, status = podman.stop(name, timeout=30)
        assert status == 0, f"{name} exited {status}:\n{podman.logs(name)[-2000:]}"
        assert took < 10, f"{name} took {took:.1f} s to stop on SIGTERM"
