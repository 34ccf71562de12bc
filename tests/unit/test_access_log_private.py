"""gunicorn's access log is created 0600 in 0700 folders whatever the umask: it names callers and paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.files import mode

PROJECT = Path(__file__).resolve().parents[2]


def load_gunicorn_settings(tmp_path: Path, access_log: Path) -> None:
    """Import the settings module as gunicorn's master does, under umask 000."""
    env = {
        **os.environ,
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "AUDIT_LOG": str(tmp_path / "audit.jsonl"),
        "ACCESS_LOG": str(access_log),
    }
    code = "import os; os.umask(0); import app.gunicorn_conf"
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_new_access_log_and_its_folders_are_the_services_alone(tmp_path):
    access_log = tmp_path / "logs" / "nested" / "access.log"
    load_gunicorn_settings(tmp_path, access_log)
    assert mode(access_log) == 0o600
    assert mode(access_log.parent) == 0o700 and mode(access_log.parent.parent) == 0o700


def test_an_existing_wider_access_log_is_tightened(tmp_path):
    access_log = tmp_path / "access.log"
    access_log.write_text("earlier line\n")
    access_log.chmod(0o666)
    load_gunicorn_settings(tmp_path, access_log)
    assert mode(access_log) == 0o600 and access_log.read_text() == "earlier line\n"
