"""The `gateway` command as an operator runs it: from any directory, one line and status 2 for a bad setting."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.databases import postgres_database, postgres_unavailable
from tests.support.processes import ROOT, free_port

GATEWAY = ROOT / ".venv/bin/gateway"


def gateway(*args: str, env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "GUNICORN_CMD_ARGS", "HOST")}
    return subprocess.run(
        [str(GATEWAY), *args], cwd=cwd, env={**environ, **env}, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def local_env(tmp_path, clients_file) -> dict[str, str]:
    return {
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "CDS_CLIENTS_FILE": str(clients_file),
        "AUDIT_LOG": str(tmp_path / "audit.jsonl"),
        "PORT": str(free_port()),
    }


def test_every_flask_command_is_a_gateway_command_from_any_directory(tmp_path, local_env):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    migrated = gateway("db", "upgrade", env=local_env, cwd=elsewhere)
    assert migrated.returncode == 0, migrated.stderr
    stats = gateway("jobs", "stats", env=local_env, cwd=elsewhere)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["jobs"]["queued"] == 0
    assert json.loads(stats.stdout)["database"] == f"sqlite:///{tmp_path / 'instance' / 'gateway.db'}"
    assert (tmp_path / "instance" / "gateway.db").is_file()  # the instance folder named, not one under elsewhere/
    assert not list(elsewhere.iterdir())
    listed = gateway("--help", env=local_env, cwd=elsewhere).stdout
    for command in ("db", "jobs", "keys", "models", "serve", "up"):
        assert f"\n  {command} " in listed


def test_the_database_a_command_reads_is_the_one_the_environment_names(tmp_path, local_env):
    if reason := postgres_unavailable():
        pytest.skip(reason)
    with postgres_database() as url:
        env = {**local_env, "DATABASE_URL": url}
        assert gateway("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
        stats = gateway("jobs", "stats", env=env, cwd=tmp_path)
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["database"] == url  # no password in the test URL to hide
    assert not (tmp_path / "instance" / "gateway.db").exists()  # no silent fallback to the local SQLite file


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [
        ("PORT", "eighty", "PORT must be a whole number"),
        ("WEB_CONCURRENCY", "0", "WEB_CONCURRENCY must be between 1 and 256"),
        ("GUNICORN_THREADS", "many", "GUNICORN_THREADS must be a whole number"),
        ("JOB_LEASE_S", "-1", "JOB_LEASE_S must be between"),
        ("CDS_CLIENTS_FILE", "/nonexistent/clients.json", "CDS_CLIENTS_FILE '/nonexistent/clients.json' does not"),
    ],
)
@pytest.mark.parametrize("command", [("jobs", "stats"), ("serve",), ("jobs", "worker", "--burst")])
def test_a_bad_setting_is_one_line_naming_it_and_status_2(tmp_path, local_env, setting, value, named, command):
    done = gateway(*command, env={**local_env, setting: value}, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = [line for line in done.stderr.splitlines() if line.strip()]
    assert line.startswith("gateway: ") and named in line
    assert "Traceback" not in done.stderr


def test_gunicorn_settings_given_to_gunicorn_are_checked_too(tmp_path, local_env):
    done = gateway("serve", env={**local_env, "GUNICORN_CMD_ARGS": "--workers 0"}, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = [line for line in done.stderr.splitlines() if "not starting" in line]
    assert "gunicorn workers must be at least 1" in line


def test_a_database_that_is_not_migrated_is_one_line_naming_it(tmp_path, local_env):
    done = gateway("jobs", "stats", env=local_env, cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"gateway: database sqlite:///{tmp_path / 'instance' / 'gateway.db'}: no such table" in done.stderr
    assert "gateway db upgrade" in done.stderr
