"""The files that hold PHI are the service user's alone: instance/ 0700; the SQLite database, its -wal and -shm
files and the audit log 0600, whatever the umask, and also when they existed with looser modes."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

import pytest

from app import create_app
from app.config import ConfigError
from app.db import upgrade
from tests.conftest import PUBLIC_BASE_URL
from tests.support.files import mode, umask

FEEDBACK = "/cds-services/cardiovascular-risk/feedback"


def instance_settings(instance: Path) -> dict[str, str]:
    return {
        "INSTANCE_PATH": str(instance),
        "DATABASE_URL": f"sqlite:///{instance / 'gateway.db'}",
        "AUDIT_LOG": str(instance / "audit.jsonl"),
    }


@pytest.mark.parametrize("process_umask", [0o000, 0o022], ids=["umask-000", "umask-022"])
def test_database_wal_shm_and_audit_log_are_0600_in_a_0700_instance_folder(
    clients_file, tmp_path, signing_key, process_umask
):
    instance = tmp_path / "instance"
    settings = {
        **instance_settings(instance),
        "CDS_CLIENTS_FILE": str(clients_file),
        "PUBLIC_BASE_URL": PUBLIC_BASE_URL,
    }
    with umask(process_umask):
        app = create_app(settings)  # then migrate, in the order of `flask --app app db upgrade`
        upgrade(settings["DATABASE_URL"])
        entry = {"card": "4e0a3a1e", "outcome": "overridden", "outcomeTimestamp": "2026-11-28T10:05:31Z"}
        response = app.test_client().post(
            FEEDBACK,
            json={"feedback": [entry]},
            headers={"Authorization": f"Bearer {signing_key.token(PUBLIC_BASE_URL + FEEDBACK)}"},
        )
        assert response.status_code == 200
        # The write made SQLite create -wal and -shm; the pool keeps them while its connection is open.
        database = instance / "gateway.db"
        assert Path(f"{database}-wal").exists() and Path(f"{database}-shm").exists()
        assert mode(instance) == 0o700
        files = [database, Path(f"{database}-wal"), Path(f"{database}-shm"), instance / "audit.jsonl"]
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}


def test_an_instance_folder_open_to_others_is_made_0700(make_app, tmp_path, caplog):
    instance = tmp_path / "instance"
    instance.mkdir()
    os.chmod(instance, 0o755)
    with caplog.at_level(logging.WARNING, logger="app.db"):
        make_app(**instance_settings(instance))
    assert mode(instance) == 0o700
    assert "was mode 0755" in caplog.text


def test_a_database_and_its_wal_readable_by_others_are_made_0600(make_app, tmp_path):
    instance = tmp_path / "instance"
    instance.mkdir(mode=0o700)
    database = instance / "gateway.db"
    older = sqlite3.connect(database)  # as an older version left it: SQLite makes its files 0644
    older.execute("PRAGMA journal_mode=WAL")
    older.execute("CREATE TABLE t (x)")
    older.commit()
    try:
        assert mode(database) == 0o644 and mode(Path(f"{database}-wal")) == 0o644
        make_app(**instance_settings(instance))
        for name in ("gateway.db", "gateway.db-wal", "gateway.db-shm"):
            assert mode(instance / name) == 0o600, name
    finally:
        older.close()


def test_a_shared_instance_folder_stops_the_start_naming_instance_path(make_app, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    with pytest.raises(ConfigError, match="INSTANCE_PATH .*shared folder"):
        make_app(INSTANCE_PATH=str(shared))
    assert mode(shared) == 0o1777


def test_a_database_outside_the_instance_folder_is_0600_and_its_existing_folder_left_alone(make_app, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    os.chmod(folder, 0o755)
    with umask(0o000):
        make_app(DATABASE_URL=f"sqlite:///{folder / 'gateway.db'}")
    assert mode(folder) == 0o755
    assert mode(folder / "gateway.db") == 0o600
