"""Development-only settings refuse to serve off this host however the server is started: past app/gunicorn_conf.py,
with gunicorn's own default bind, or with ``flask run``; and a job worker beside a deployment refuses them too."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.processes import free_port
from tests.support.tokens import clients_document

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv/bin"
REFUSED = "development only, and the service is reachable from other hosts"


def run(argv: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """One of the ways to start the gateway, with development defaults (no CDS_CLIENTS_FILE), expected to exit."""
    environ = {k: v for k, v in os.environ.items() if k not in ("CDS_CLIENTS_FILE", "HOST", "GUNICORN_CMD_ARGS")}
    environ.update(
        INSTANCE_PATH=str(tmp_path),
        AUDIT_LOG=str(tmp_path / "audit.jsonl"),
        DATABASE_URL=f"sqlite:///{tmp_path / 'gateway.db'}",
        **env,
    )
    return subprocess.run(argv, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=90)  # noqa: S603


@pytest.mark.parametrize(
    "how",
    [
        pytest.param(lambda port: [str(BIN / "gateway"), "serve", "-c", "/dev/null", "-b", f"0.0.0.0:{port}"], id="-c"),
        pytest.param(
            lambda port: [str(BIN / "gunicorn"), "-b", f"0.0.0.0:{port}", "app:create_app()"], id="bare gunicorn"
        ),
    ],
)
def test_gunicorn_started_past_its_config_refuses_development_defaults_on_every_interface(tmp_path, how):
    port = free_port()
    done = run(how(port), tmp_path, PORT=str(port))
    assert done.returncode != 0, done.stderr[-2000:]
    assert "Worker failed to boot" in done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("CDS_CLIENTS_FILE unset")]
    assert REFUSED in line and f"0.0.0.0:{port}" in line


def test_flask_run_on_every_interface_refuses_development_defaults(tmp_path):
    port = free_port()
    done = run([str(BIN / "flask"), "--app", "app", "run", "--host", "0.0.0.0", "--port", str(port)], tmp_path)
    assert done.returncode != 0
    assert REFUSED in done.stderr and f"0.0.0.0:{port}" in done.stderr


def test_a_job_worker_with_switches_beside_a_deployments_clients_refuses_to_start(tmp_path, signing_key):
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps(clients_document(signing_key, ["https://ehr.example.org/fhir"])))
    done = run(
        [str(BIN / "gateway"), "jobs", "worker", "--burst"],
        tmp_path,
        CDS_CLIENTS_FILE=str(clients),
        WEBHOOKS_ALLOW_PRIVATE="1",
        FHIR_ALLOW_ANONYMOUS="1",
    )
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.splitlines()
    assert line.startswith("gateway: not starting: FHIR_ALLOW_ANONYMOUS=1")
    assert "a job worker" in line
