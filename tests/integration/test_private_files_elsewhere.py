"""PHI and secrets outside the instance folder are the service user's alone too: an audit log in a new nested
folder (every folder made 0700), a SQLite database named by a URI filename (0600), and signing keys and the SMART
session key in a KEYS_DIR that someone made readable by others (tightened when loaded, with a warning)."""

from __future__ import annotations

import logging
import os

import sqlalchemy as sa

from app.audit import AuditLog
from app.db import make_engine, upgrade
from app.smart.keys import INDEX_FILE, KeyStore
from app.smart.sessions import KEY_FILE, load_or_create_key
from tests.support.files import mode, umask


def test_every_folder_made_for_a_nested_audit_log_is_0700(tmp_path):
    with umask(0o000):
        AuditLog(str(tmp_path / "var" / "log" / "gateway" / "audit.jsonl")).record("hook")
    folders = [tmp_path / "var", tmp_path / "var" / "log", tmp_path / "var" / "log" / "gateway"]
    assert [mode(folder) for folder in folders] == [0o700, 0o700, 0o700]


def test_a_sqlite_database_named_by_a_uri_filename_is_0600(tmp_path):
    path = tmp_path / "g.db"
    url = f"sqlite:///file:{path}?uri=true"
    with umask(0o022):
        upgrade(url)
        engine = make_engine(url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM ai_results")).scalar() == 0
        engine.dispose()
    assert mode(path) == 0o600


def test_keys_readable_by_others_are_made_private_when_loaded(tmp_path, caplog):
    keys = tmp_path / "keys"
    KeyStore(keys).generate()
    load_or_create_key(keys)
    opened = [keys, *keys.glob("*.pem"), keys / INDEX_FILE, keys / KEY_FILE]
    for path in opened:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)

    with caplog.at_level(logging.WARNING):
        store = KeyStore(keys)  # another process, starting
        assert store.usable()
        load_or_create_key(keys)

    assert {path.name: mode(path) for path in opened} == {
        path.name: 0o700 if path.is_dir() else 0o600 for path in opened
    }
    assert sum("took away other users' access" in r.getMessage() for r in caplog.records) == len(opened)
