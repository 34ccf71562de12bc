"""The database: one SQLAlchemy engine per application, tables in SQLAlchemy Core, schema by Alembic."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

import click
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event

from app.clock import as_utc
from app.config import ConfigError
from app.private_files import private_folders, tighten

log = logging.getLogger(__name__)

metadata = sa.MetaData()


class UTCDateTime(sa.types.TypeDecorator):
    """A timestamptz that always binds UTC and always reads back aware (SQLite stores no offset); a naive value
    is UTC (``app.clock.as_utc``), in both directions."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else as_utc(value)

    def process_result_value(self, value, dialect):
        return None if value is None else as_utc(value)


feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("service_id", sa.String(200), nullable=False),
    sa.Column("card_uuid", sa.String(200), nullable=False, index=True),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("accepted_suggestions", sa.JSON, nullable=False),
    sa.Column("override_reason", sa.JSON, nullable=True),
    sa.Column("outcome_timestamp", sa.DateTime(timezone=True), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("client_iss", sa.String(500), nullable=True),
    sa.Column("tenant", sa.String(200), nullable=True),
    sa.Column("entry", sa.JSON, nullable=False),
)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str) -> sa.Engine:
    """An engine for ``url``; SQLite gets WAL and a busy timeout so that several processes can share it."""
    if url.startswith("sqlite"):
        _private_sqlite_file(url)
        engine = sa.create_engine(url, connect_args={"timeout": 15})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA busy_timeout=15000")
            # Switching to WAL needs the database to itself; asking is free. A connection opened while a worker
            # holds the write lock must not fail on a switch that was made when the file was created.
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, connect_args={"connect_timeout": 5})


def private_instance_directory(path: str | Path) -> None:
    """Create the instance folder 0700, or tighten an existing one of ours: it holds PHI (database, audit log).

    A folder that is shared (sticky, like /tmp), another user's, or cannot be changed stops the start instead.
    """
    path = Path(path)
    private_folders(path)
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o077:
        return
    problem = None
    if info.st_mode & stat.S_ISVTX:
        problem = "is a shared folder (sticky bit)"
    elif info.st_uid != os.geteuid():
        problem = "belongs to another user"
    else:
        try:
            os.chmod(path, 0o700)
        except OSError as exc:
            problem = f"cannot be made private ({exc.strerror})"
    if problem:
        raise ConfigError(
            f"INSTANCE_PATH {path} is mode {mode:04o} and {problem}: give the service a folder of its own (0700)"
        )
    log.warning("INSTANCE_PATH %s was mode %04o; made it 0700 (it holds patient data)", path, mode)


def _private_sqlite_file(url: str) -> None:
    """Create the SQLite database file 0600 before SQLite does (it would make it 0644; its -wal and -shm files
    take the database file's mode), and tighten an existing one and its -wal and -shm files."""
    path = _sqlite_path(url)
    if path is None:
        return
    private_folders(path.parent)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            mode = tighten(name)
        except OSError as exc:
            raise ConfigError(f"DATABASE_URL: {name} is wider than 0600, unchangeable ({exc.strerror})") from None
        if mode is not None:
            log.warning("%s was mode %04o; took away other users' access (it holds patient data)", name, mode)


def _sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL, also a URI filename (``sqlite:///file:/path/g.db?uri=true``); None in memory."""
    parsed = sa.engine.make_url(url)
    database = parsed.database
    if database and database.startswith("file:") and parsed.query.get("uri") == "true":
        if parsed.query.get("mode") == "memory":
            return None
        database = unquote(urlsplit(database).path)
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at ``url`` up to ``revision``."""
    if url.startswith("sqlite"):
        _private_sqlite_file(url)  # before Alembic's own engine creates the file
    command.upgrade(alembic_config(url), revision)


def init_app(app) -> None:
    """Make the instance folder private, create the engine once and register ``flask db upgrade``."""
    private_instance_directory(app.config["INSTANCE_PATH"])
    app.extensions["db"] = make_engine(app.config["DATABASE_URL"])

    @app.cli.group("db")
    def db_group():
        """Database schema commands."""

    @db_group.command("upgrade")
    @click.option("--revision", default="head", show_default=True)
    def upgrade_command(revision: str) -> None:
        """Apply schema migrations to DATABASE_URL."""
        upgrade(app.config["DATABASE_URL"], revision)
        click.echo(f"database at revision {revision}")


def engine(app) -> sa.Engine:
    return app.extensions["db"]
