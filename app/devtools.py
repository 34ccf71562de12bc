"""Development conveniences (``gateway dev ...``): a local CDS client whose signed calls the gateway trusts, and a
demo of the cardiovascular-risk service on Synthea patients.

The clients file written here carries the development mark (``app.development.DEVELOPMENT_MARK``): a service
started with it answers callers on this host alone and refuses to start where other hosts could reach it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import selectors
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import click
import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask, current_app
from flask.cli import AppGroup

from app.cds.clients import ClientRegistry
from app.cds.service import get_service, load_services, services
from app.config import PROJECT_ROOT
from app.development import DEV_CLIENT_DIR, DEV_CLIENT_KEY_FILE, DEV_CLIENT_KEYS_FILE, DEVELOPMENT_MARK
from app.private_files import private_folders
from app.smart.keys import public_jwk_members, thumbprint

DEV_ISSUER = "http://localhost/dev-client"
ALGORITHM = "ES384"  # what the CDS Hooks Sandbox signs with
KEY_FILE = DEV_CLIENT_KEY_FILE
CLIENTS_FILE = "clients.json"
LOCAL_FHIR_SERVERS = ["http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*"]
TOKEN_LIFETIME_S = 300
SAMPLE_SERVICE = "cardiovascular-risk"
SAMPLE_REQUEST = PROJECT_ROOT / "fixtures" / "hooks" / "patient-view-cardiovascular-risk.json"
SYNTHEA_DIR = PROJECT_ROOT.parent / "shared" / "data" / "synthea-r4"
FHIR_TEST_SERVER = PROJECT_ROOT / "tests" / "fhir_server" / "server.mjs"
_FHIR_READY = "FHIR_TEST_SERVER_READY "
_FHIR_JSON = "application/fhir+json"
_GATEWAY_TIMEOUT = (3.0, 30.0)  # connect, read
_FHIR_LOAD_TIMEOUT = (3.0, 120.0)  # a Synthea bundle is up to a few MB

dev_cli = AppGroup("dev", help="Development conveniences: a local client, signed calls, a demo (this machine only).")


class DevError(click.ClickException):
    """A problem the user can fix, said in one line (exit status 1, no traceback)."""


@dataclass(frozen=True)
class DevClient:
    """The development client: a private key in ``directory`` and a clients file trusting its public half."""

    directory: Path
    private_key: ec.EllipticCurvePrivateKey

    @property
    def key_path(self) -> Path:
        return self.directory / KEY_FILE

    @property
    def clients_path(self) -> Path:
        return self.directory / CLIENTS_FILE

    @property
    def kid(self) -> str:
        """The RFC 7638 thumbprint of the public key: the same key always has the same kid."""
        return thumbprint(public_jwk_members(self.private_key))

    @classmethod
    def ensure(cls, directory: Path, rotate: bool = False) -> tuple[DevClient, bool]:
        """The client in ``directory``, made (or remade with ``rotate``) when needed; True when the key is new."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask, and an old directory may be wider
        key_path = directory / KEY_FILE
        new = rotate or not key_path.exists()
        if new:
            key = ec.generate_private_key(ec.SECP384R1())
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            _write_private(key_path, pem)
        client = cls.load(directory)
        document = json.dumps(client.clients_document(), indent=2) + "\n"
        if new or not _same_text(client.clients_path, document):
            _write_private(client.clients_path, document.encode("utf-8"))
        return client, new

    @classmethod
    def load(cls, directory: Path) -> DevClient:
        key_path = directory / KEY_FILE
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except FileNotFoundError:
            raise DevError(f"no development client in {directory}: run `gateway dev client` first") from None
        except (OSError, ValueError) as exc:
            raise DevError(f"cannot read {key_path} ({exc}): run `gateway dev client --new`") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
            raise DevError(f"{key_path} is not a P-384 key: run `gateway dev client --new`")
        return cls(directory, key)

    def clients_document(self) -> dict[str, Any]:
        """A CDS_CLIENTS_FILE trusting this key for DEV_ISSUER and FHIR servers on this machine, marked development."""
        jwk = {**public_jwk_members(self.private_key), "kid": self.kid, "use": "sig", "alg": ALGORITHM}
        mark = (
            f"Made by `gateway dev client`; its private key is {self.key_path}. Development only: the gateway "
            "starts with this file only where no other host can reach it."
        )
        # The entry carries the mark too, so that copied into another file it still says what it is.
        client = {
            DEVELOPMENT_MARK: mark,
            "iss": DEV_ISSUER,
            "jwks": {"keys": [jwk]},
            "fhir_servers": LOCAL_FHIR_SERVERS,
        }
        document = {DEVELOPMENT_MARK: mark, "clients": [client]}
        ClientRegistry.from_mapping(document, source="development clients file")  # the service's own validation
        return document

    def token(self, audience: str, lifetime: int = TOKEN_LIFETIME_S) -> str:
        """A client JWT as CDS Hooks 2.0 asks: iss and sub the client, aud the service URL, a few minutes, a jti.

        No ``jku`` header: the gateway takes this client's keys from the clients file and never follows one.
        """
        now = int(time.time())
        claims = {
            "iss": DEV_ISSUER,
            "sub": DEV_ISSUER,
            "aud": audience,
            "iat": now,
            "exp": now + lifetime,
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(claims, self.private_key, ALGORITHM, headers={"kid": self.kid, "typ": "JWT"})


def _remember_key(instance: Path, members: dict[str, str]) -> None:
    """Record a development key's public JWK for this instance, so that a clients file trusting it is refused off
    this host wherever the key lives (``--dir``) and however its entry is renamed or unmarked."""
    path = instance / DEV_CLIENT_KEYS_FILE
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = []
    recorded = recorded if isinstance(recorded, list) else []
    if members not in recorded:
        private_folders(instance)
        _write_private(path, (json.dumps([*recorded, members], indent=2) + "\n").encode("utf-8"))


def _write_private(path: Path, data: bytes) -> None:
    """Write a 0600 file beside ``path``, then rename it over: a reader sees the old file or the new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")  # mkstemp creates files 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _same_text(path: Path, text: str) -> bool:
    try:
        return path.read_text(encoding="utf-8") == text
    except (OSError, ValueError):
        return False


def service_url(base_url: str, service_id: str) -> str:
    """The URL of a service, which is also the audience of the client JWTs for it."""
    return f"{base_url.rstrip('/')}/cds-services/{service_id}"


def curl_command(url: str, authorization: str, request_file: Path) -> str:
    """A ready-to-paste shell command POSTing ``request_file`` to ``url``; ``authorization`` is the header as one
    shell word (quoted already)."""
    lines = [
        f"curl -sS -w '\\n' {shlex.quote(url)}",
        "-H 'Content-Type: application/json'",
        f"-H {authorization}",
        f"--data @{shlex.quote(str(request_file))}",
    ]
    return " \\\n  ".join(lines)


def signed_header(token: str) -> str:
    """The Authorization header with this token, as one shell word."""
    return shlex.quote(f"Authorization: Bearer {token}")


def fresh_token_header(options: list[str]) -> str:
    """The Authorization header as one shell word that runs ``gateway dev token`` for every call."""
    gateway = "gateway"
    beside = Path(sys.executable).parent / "gateway"  # this venv's, for a shell that has not activated it
    if not shutil.which("gateway") and beside.is_file():
        gateway = shlex.quote(str(beside))
    command = " ".join([gateway, "dev", "token", *(shlex.quote(o) for o in options)])
    return f'"Authorization: Bearer $({command})"'


def _directory(given: Path | None) -> Path:
    return (given or Path(current_app.instance_path) / DEV_CLIENT_DIR).resolve()


def _base_url(given: str | None) -> str:
    return (given or current_app.config["PUBLIC_BASE_URL"]).rstrip("/")


_dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the development client lives (default: INSTANCE_PATH/dev-client).",
)
_base_url_option = click.option(
    "--base-url", help="The gateway's PUBLIC_BASE_URL, which client JWTs name as audience (default: this one's)."
)


@dev_cli.command("client")
@click.option("--new", "rotate", is_flag=True, help="Make a new key (a running gateway must restart to trust it).")
@_dir_option
@_base_url_option
def client_command(rotate: bool, directory: Path | None, base_url: str | None) -> None:
    """Make (or reuse) a development client key and clients file; print how to start the gateway trusting it and a
    signed curl of the sample patient-view request."""
    client, new = DevClient.ensure(_directory(directory), rotate)
    _remember_key(Path(current_app.instance_path), public_jwk_members(client.private_key))
    base = _base_url(base_url)
    url = service_url(base, SAMPLE_SERVICE)
    click.echo("Development client (this machine only; never list its key in a deployment's CDS_CLIENTS_FILE):")
    click.echo(f"  issuer        {DEV_ISSUER}")
    click.echo(f"  private key   {client.key_path} ({ALGORITHM}, kid {client.kid}, {'new' if new else 'reused'})")
    click.echo(f"  clients file  {client.clients_path}")
    click.echo("")
    restart = " (restart it if it is running: it reads the file at start)" if new else ""
    click.echo(f"1. Start the gateway trusting it{restart}:")
    click.echo("")
    click.echo(f"    CDS_CLIENTS_FILE={shlex.quote(str(client.clients_path))} make run")
    click.echo("")
    if not SAMPLE_REQUEST.is_file():
        click.echo(f"2. Call {url} with a token from `gateway dev token` ({SAMPLE_REQUEST} is not here to send).")
        return
    options = [*(["--dir", str(client.directory)] if directory else []), *(["--base-url", base] if base_url else [])]
    _print_sample_calls(url, client.token(url), options)


def _print_sample_calls(url: str, token: str, token_options: list[str]) -> None:
    click.echo(f"2. In another terminal, send the sample patient-view request to {SAMPLE_SERVICE}:")
    click.echo("")
    click.echo(textwrap.indent(curl_command(url, signed_header(token), SAMPLE_REQUEST), "    "))
    click.echo("")
    minutes = TOKEN_LIFETIME_S // 60
    click.echo(f"That token is good for one call within {minutes} minutes. This one signs a new token for every call:")
    click.echo("")
    click.echo(textwrap.indent(curl_command(url, fresh_token_header(token_options), SAMPLE_REQUEST), "    "))


@dev_cli.command("token")
@click.argument("service", default=SAMPLE_SERVICE)
@_dir_option
@_base_url_option
def token_command(service: str, directory: Path | None, base_url: str | None) -> None:
    """Print a fresh client JWT for SERVICE (default cardiovascular-risk): one call, within five minutes."""
    load_services()
    if get_service(service) is None:
        known = ", ".join(sorted(s.id for s in services()))
        raise DevError(f"no service {service!r} here (known: {known})")
    client = DevClient.load(_directory(directory))
    click.echo(client.token(service_url(_base_url(base_url), service)))


@dataclass(frozen=True)
class DemoPatient:
    """A Synthea patient for the demo: its bundle, and its id, sex and age once loaded."""

    bundle: Path
    id: str = ""
    sex: str = "?"
    age: int | None = None


def pick_patients(data: Path, count: int) -> list[Path]:
    """``count`` bundle files spread over the patients who have every risk input (``pce_patients.csv``, ordered by
    age), or over all bundles when that list is absent."""
    bundles = data / "bundles"
    if not bundles.is_dir():
        raise DevError(
            f"no Synthea sample patients at {data}: the demo reads the team's shared data "
            "(../shared/data/synthea-r4 beside the project); pass --data DIR to use another copy"
        )
    table = data / "pce_patients.csv"
    if table.is_file():
        with table.open(newline="", encoding="utf-8") as handle:
            files = [bundles / row["file"] for row in csv.DictReader(handle) if row.get("file")]
    else:
        files = sorted(bundles.glob("*.json"))
    files = [f for f in files if f.is_file()]
    if not files:
        raise DevError(f"no patient bundles in {bundles}")
    count = min(count, len(files))
    return [files[i * len(files) // count] for i in range(count)]


@contextlib.contextmanager
def local_fhir_server(startup_timeout: float = 30.0) -> Iterator[str]:
    """The project's in-memory FHIR test server (tests/fhir_server) on a free loopback port; yields its base URL and
    stops it on the way out."""
    node = shutil.which("node")
    if node is None:
        raise DevError("node is not installed: the demo's FHIR server needs Node.js 20 (or pass --fhir-server URL)")
    if not (FHIR_TEST_SERVER.parent / "node_modules" / "@medplum" / "fhir-router").is_dir():
        raise DevError("the demo's FHIR server is not installed: run `make node` (or pass --fhir-server URL)")
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(  # noqa: S603 - our own script, no shell
            [node, str(FHIR_TEST_SERVER), "--port", "0"],
            cwd=FHIR_TEST_SERVER.parent,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
        )
        try:
            base = _await_ready_line(proc, startup_timeout)
            if base is None:
                errors.seek(0)
                tail = errors.read().decode("utf-8", "replace").strip().splitlines()[-3:]
                raise DevError(f"the demo's FHIR server did not start: {' / '.join(tail) or 'no output'}")
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            if proc.stdout:
                proc.stdout.close()


def _await_ready_line(proc: subprocess.Popen, timeout: float) -> str | None:
    """The base URL the server prints once listening, or None if it exits or stays silent for ``timeout``."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if not selector.select(remaining):
                continue
            line = proc.stdout.readline().decode("utf-8", "replace")
            if not line:
                return None  # stdout closed: the server exited
            if line.startswith(_FHIR_READY):
                return json.loads(line[len(_FHIR_READY) :])["base_url"].rstrip("/")
    return None


def load_patient(session: requests.Session, fhir_base: str, bundle_file: Path, keep_ids: bool) -> DemoPatient:
    """Load one Synthea transaction Bundle: through the test server's ``$seed`` (ids kept) or as a standard FHIR
    transaction (the server assigns ids); return the patient as stored."""
    bundle = json.loads(bundle_file.read_bytes())
    index, patient = next(
        ((i, e["resource"]) for i, e in enumerate(bundle.get("entry", [])) if _is_patient(e.get("resource"))),
        (None, None),
    )
    if patient is None:
        raise DevError(f"{bundle_file.name} has no Patient")
    url = f"{fhir_base}/$seed" if keep_ids else fhir_base
    try:
        response = session.post(
            url,
            data=json.dumps(bundle),
            headers={"Content-Type": _FHIR_JSON, "Accept": _FHIR_JSON},
            timeout=_FHIR_LOAD_TIMEOUT,
        )
    except requests.RequestException as exc:
        raise DevError(f"the FHIR server at {fhir_base} is not answering ({type(exc).__name__})") from None
    if response.status_code >= 300:
        raise DevError(f"the FHIR server at {fhir_base} refused {bundle_file.name}: HTTP {response.status_code}")
    try:
        entries = response.json().get("entry") or []
        location = str(entries[index].get("response", {}).get("location", "")) if index < len(entries) else ""
    except (ValueError, AttributeError):
        location = ""
    # A standard transaction names where the server put the patient; $seed keeps the bundle's id.
    patient_id = location.split("/")[1] if location.startswith("Patient/") else patient.get("id", "")
    return DemoPatient(bundle_file, patient_id, patient.get("gender", "?"), _age(patient.get("birthDate")))


def _is_patient(resource: Any) -> bool:
    return isinstance(resource, dict) and resource.get("resourceType") == "Patient"


def _age(birth_date: Any) -> int | None:
    try:
        born = date.fromisoformat(str(birth_date)[:10])
    except ValueError:
        return None
    today = date.today()
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


def _diagnostics(response: requests.Response) -> str:
    try:
        issues = response.json().get("issue") or [{}]
        return str(issues[0].get("diagnostics") or response.reason)
    except (ValueError, AttributeError):
        return response.reason or ""


def _gateway_answers(session: requests.Session, base: str, clients_file: Path) -> None:
    try:
        session.get(f"{base}/cds-services", timeout=_GATEWAY_TIMEOUT)
    except requests.RequestException:
        raise DevError(f"the gateway is not answering at {base}: {_start_hint(clients_file)}") from None


def call_patient_view(
    session: requests.Session, client: DevClient, base: str, fhir_base: str, patient: DemoPatient
) -> requests.Response:
    """The cardiovascular-risk service for one patient, with no prefetch: the gateway reads the record itself."""
    url = service_url(base, SAMPLE_SERVICE)
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": fhir_base,
        "fhirAuthorization": {  # the demo's FHIR server takes any token
            "access_token": "dev-demo",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.rs",
            "subject": "dev-demo",
        },
        "context": {"userId": "Practitioner/dev-demo", "patientId": patient.id},
    }
    headers = {"Authorization": f"Bearer {client.token(url)}", "Content-Type": "application/json"}
    try:
        return session.post(url, json=body, headers=headers, timeout=_GATEWAY_TIMEOUT)
    except requests.RequestException as exc:
        raise DevError(f"the gateway stopped answering at {base} ({type(exc).__name__})") from None


def _card_line(response: requests.Response) -> str:
    cards = response.json().get("cards") or []
    if not cards:
        return "no card"
    more = f" (+{len(cards) - 1} more)" if len(cards) > 1 else ""
    return f"[{cards[0].get('indicator')}] {cards[0].get('summary')}{more}"


@dev_cli.command("demo")
@click.option("--patients", "count", type=click.IntRange(1, 100), default=5, show_default=True)
@click.option("--fhir-server", help="Load the patients into this FHIR R4 server instead of a local test server.")
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default=SYNTHEA_DIR,
    show_default=True,
    help="The Synthea sample (bundles/ and pce_patients.csv).",
)
@_dir_option
@click.option("--base-url", help="The running gateway (default: PUBLIC_BASE_URL).")
def demo_command(count: int, fhir_server: str | None, data: Path, directory: Path | None, base_url: str | None):
    """Load a few Synthea patients into a local FHIR server and call the running gateway's cardiovascular-risk
    service for each, signed as the development client (run `gateway dev client` first)."""
    bundles = pick_patients(data, count)
    client = DevClient.load(_directory(directory))
    base = _base_url(base_url)
    with requests.Session() as session:
        _gateway_answers(session, base, client.clients_path)
        server = contextlib.nullcontext(fhir_server.rstrip("/")) if fhir_server else local_fhir_server()
        with server as fhir_base:
            click.echo(f"Loading {len(bundles)} Synthea patients into {fhir_base} ...")
            patients = [load_patient(session, fhir_base, b, keep_ids=fhir_server is None) for b in bundles]
            click.echo(f"Calling {service_url(base, SAMPLE_SERVICE)} for each (the gateway reads their records):")
            failed = sum(not _demo_call(session, client, base, fhir_base, patient) for patient in patients)
    if failed:
        raise DevError(f"{failed} of {len(patients)} calls failed")


def _demo_call(session: requests.Session, client: DevClient, base: str, fhir_base: str, patient: DemoPatient) -> bool:
    """One patient's call and its line (id, sex, age, time, card); False when the service answered an error."""
    started = time.monotonic()
    response = call_patient_view(session, client, base, fhir_base, patient)
    elapsed = f"{(time.monotonic() - started) * 1000:.0f} ms"
    if response.status_code in (401, 403):
        raise DevError(
            f"the gateway at {base} refused the development client ({response.status_code}: "
            f"{_diagnostics(response)}): {_start_hint(client.clients_path)}, with PUBLIC_BASE_URL {base}"
        )
    age = "?" if patient.age is None else patient.age
    who = f"{patient.id}  {patient.sex:<6} {age:>3}  {elapsed:>7}"
    if response.status_code != 200:
        click.echo(f"{who}  HTTP {response.status_code}: {_diagnostics(response)}")
        return False
    click.echo(f"{who}  {_card_line(response)}")
    return True


def _start_hint(clients_file: Path) -> str:
    return f"start it with `CDS_CLIENTS_FILE={shlex.quote(str(clients_file))} make run`"


def init_cli(app: Flask) -> None:
    """Register ``gateway dev client``, ``dev token`` and ``dev demo``."""
    app.cli.add_command(dev_cli)
