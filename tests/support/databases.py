"""Throwaway databases for tests: a migrated SQLite file, or a fresh PostgreSQL database dropped afterwards."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg

from app.db import upgrade

ADMIN_URL = os.environ.get("TEST_POSTGRES_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def postgres_unavailable() -> str | None:
    """Why the test PostgreSQL server cannot be used, or None when it can."""
    try:
        psycopg.connect(ADMIN_URL, connect_timeout=2).close()
    except psycopg.Error as exc:
        return f"no PostgreSQL at {ADMIN_URL}: {type(exc).__name__}"
    return None


def sqlite_database(directory: Path) -> str:
    url = f"sqlite:///{directory / 'jobs.db'}"
    upgrade(url)
    return url


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A new, migrated PostgreSQL database (SQLAlchemy URL, psycopg 3), dropped when the block ends."""
    name = f"gateway_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
