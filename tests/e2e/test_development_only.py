"""The real server refuses development-only settings on an address other hosts can reach, and says why in one line."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import requests

from tests.support.processes import free_port, gunicorn
from tests.support.tokens import clients_document

ROOT = Path(__file__).resolve().parents[2]


def serve(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `gateway serve` as the Docker image and `make run` do, expecting it to refuse and exit."""
    environ = {k: v for k, v in os.environ.items() if k not in ("CDS_CLIENTS_FILE", "HOST", "GUNICORN_CMD_ARGS")}
    return subprocess.run(
        [str(ROOT / ".venv/bin/gateway"), "serve"],
        cwd=env.get("INSTANCE_PATH", ROOT),
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def base_env(tmp_path: Path, port: int) -> dict[str, str]:
    return {
        "PORT": str(port),
        "INSTANCE_PATH": str(tmp_path),
        "AUDIT_LOG": str(tmp_path / "audit.jsonl"),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}",
    }


def refusal_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "not starting" in line]


def test_the_docker_images_defaults_without_a_clients_file_refuse_to_start(tmp_path):
    port = free_port()
    done = serve({**base_env(tmp_path, port), "HOST": "0.0.0.0"})  # noqa: S104 - as the Dockerfile sets
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = refusal_lines(done.stderr)
    assert "CDS_CLIENTS_FILE unset" in line and "0.0.0.0" in line
    assert "Traceback" not in done.stderr


def test_a_bind_given_on_the_command_line_is_checked_too(tmp_path):
    port = free_port()
    env = {
        **base_env(tmp_path, port),
        "PUBLIC_BASE_URL": f"http://localhost:{port}",
        "GUNICORN_CMD_ARGS": f"--bind 0.0.0.0:{port}",
    }
    done = serve(env)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = refusal_lines(done.stderr)
    assert f"0.0.0.0:{port}" in line


def test_a_deployment_with_its_own_clients_serves_on_every_interface(tmp_path, signing_key):
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps(clients_document(signing_key, ["https://ehr.example.org/fhir"])))
    port = free_port()
    env = {
        **base_env(tmp_path, port),
        "HOST": "0.0.0.0",  # noqa: S104
        "PUBLIC_BASE_URL": "https://cds.example.org",
        "CDS_CLIENTS_FILE": str(clients),
    }
    with gunicorn(env, port) as base:
        assert requests.get(f"{base}/healthz", timeout=5).status_code == 200


def test_a_job_worker_with_development_settings_off_this_host_refuses_to_start(tmp_path):
    environ = {k: v for k, v in os.environ.items() if k != "CDS_CLIENTS_FILE"}
    done = subprocess.run(
        [str(ROOT / ".venv/bin/gateway"), "jobs", "worker", "--burst"],
        cwd=ROOT,
        env={**environ, **base_env(tmp_path, free_port()), "PUBLIC_BASE_URL": "https://cds.example.org"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.splitlines()  # one line, no traceback
    assert line.startswith("gateway: ") and "CDS_CLIENTS_FILE unset" in line
