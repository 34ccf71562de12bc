"""State that every process of this host shares without Redis: a small SQLite file in the instance folder.

gunicorn workers and job workers are separate processes, so per-process memory would let a client JWT be
replayed against another worker and let each worker keep its own circuit breaker. This file is what they share
when no Redis is configured (and while Redis is down). It holds only short-lived protocol state (seen JWT ids,
breaker state and the breakers' windows of recent outcomes), never PHI, and losing it is safe: a new file
records its own start, and the replay cache refuses tokens issued before it (see ``started_at``). It must be on
a local disk, not a network share. A file deleted or replaced while the service runs is noticed at the next use
(a stat of the path per use), and every process moves to the file now at the path; after an OS crash or power
loss (a new kernel boot id), the file counts as a new one, as writes are not flushed to disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = "host-state.db"
# How long a writer waits for another process's write to finish; writes here take tens of microseconds.
BUSY_WAIT_S = 0.5
_BUSY_SLEEP_S = 0.0002  # SQLite's own busy handler sleeps 1 ms or more per round; a short spin keeps p99 low
_BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jti (key TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS jti_expires ON jti (expires);
CREATE TABLE IF NOT EXISTS breaker (
    name TEXT PRIMARY KEY, state TEXT NOT NULL, epoch INTEGER NOT NULL, opened_ms INTEGER NOT NULL,
    successes INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS breaker_trial (
    name TEXT NOT NULL, token TEXT NOT NULL, expires_ms INTEGER NOT NULL, PRIMARY KEY (name, token)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS breaker_window (
    name TEXT NOT NULL, size INTEGER NOT NULL, calls INTEGER NOT NULL, failure INTEGER NOT NULL,
    slow INTEGER NOT NULL, PRIMARY KEY (name, size)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS breaker_outcome (
    name TEXT NOT NULL, size INTEGER NOT NULL, slot INTEGER NOT NULL, verdict TEXT NOT NULL,
    PRIMARY KEY (name, size, slot)
) WITHOUT ROWID;
"""
_STARTED = "INSERT OR IGNORE INTO meta (name, value) VALUES ('started_at', {now!r});"
_BOOTED = "INSERT INTO meta (name, value) VALUES ('boot_id', '{boot}');"
# A file last written during another boot may have lost committed rows (synchronous=OFF): it starts anew.
_REBOOTED = """
UPDATE meta SET value = {now!r} WHERE name = 'started_at'
    AND NOT EXISTS (SELECT 1 FROM meta WHERE name = 'boot_id' AND value = '{boot}');
INSERT OR REPLACE INTO meta (name, value) VALUES ('boot_id', '{boot}');
"""


class HostStateError(Exception):
    """The host's shared state cannot be read or written (disk full, file unreadable, locked too long)."""


class _Damaged(HostStateError):
    """SQLite says the file is not a database, or is malformed."""


@dataclass(frozen=True)
class _Link:
    """One thread's connection, to the file that was at the path when it was opened."""

    conn: sqlite3.Connection
    pid: int
    file: tuple[int, int] | None  # (st_dev, st_ino)


class HostState:
    """The shared SQLite file: one connection per thread and process, short write transactions, wall-clock time.

    ``started_at`` is when this file was created, or first opened after a reboot (seconds since the epoch):
    anything remembered only since then, such as the JWT ids seen, says nothing about what came before it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        try:
            self._link()  # made now: a locked or unwritable file stops the start
        except _Damaged as exc:
            log.warning("host state %s is damaged (%s); it is set aside and a new one started", self.path, exc)
            self._set_aside()
            self._link()

    @classmethod
    def in_instance(cls, instance_path: str | Path) -> HostState:
        return cls(Path(instance_path) / FILE_NAME)

    @property
    def started_at(self) -> float:
        return float(self.read("SELECT value FROM meta WHERE name = 'started_at'")[0][0])

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE), committed at the end of the block and rolled back on any error;
        every SQLite error (locked too long, disk full, I/O) comes out as HostStateError.

        This process's threads queue on a lock first, so that only one of them at a time competes with the
        other processes for SQLite's write lock (measured: p99 of a jti check 24 ms without it, 16 threads in
        each of two processes)."""
        with self._write_lock:
            conn = self._link().conn
            self._begin(conn)
            try:
                yield conn
                conn.commit()
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.rollback()  # a failed COMMIT leaves the transaction, and the write lock, open
                if isinstance(exc, sqlite3.Error):
                    raise HostStateError(f"host state not written: {exc}") from None
                raise

    def read(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of one query, read outside any write lock (WAL readers never wait for writers)."""
        try:
            return self._link().conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise HostStateError(f"host state not read: {exc}") from None

    def _begin(self, conn: sqlite3.Connection) -> None:
        _patiently(lambda: conn.execute("BEGIN IMMEDIATE"), "host state not writable")

    def _link(self) -> _Link:
        """This thread's connection, opened again when the file at the path is no longer the one it has open
        (deleted or replaced: one stat, about 2 µs) or in a forked child (connections must not cross a fork)."""
        link = getattr(self._local, "link", None)
        if link is not None and link.pid == os.getpid() and link.file == _identity(self.path):
            return link
        if link is not None and link.pid == os.getpid():
            log.warning("host state %s was replaced while in use; this process now uses the new file", self.path)
            link.conn.close()
        self._local.link = None
        self._local.link = link = self._open()
        return link

    def _open(self) -> _Link:
        """Open the file at the path, making it (and its tables, and its start) if missing."""
        self._make_file()
        file = _identity(self.path)  # before connecting: a file swapped meanwhile is seen at the next use
        try:
            # mode=rw: SQLite must not make a file itself (with the umask's mode and beside stale -wal/-shm).
            # isolation_level=None: we issue BEGIN ourselves; timeout=0: our own short wait (see _patiently).
            uri = self.path.absolute().as_uri() + "?mode=rw"
            conn = sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise HostStateError(f"cannot open {self.path}: {exc}") from None
        try:
            _patiently(lambda: conn.execute("PRAGMA journal_mode=WAL"), f"cannot open {self.path}")
            # No fsync: after an OS crash the boot id differs and the file starts anew (see _prepare).
            conn.execute("PRAGMA synchronous=OFF")
            self._prepare(conn)
        except (sqlite3.OperationalError, HostStateError) as exc:
            conn.close()
            raise HostStateError(f"cannot use {self.path}: {exc}") from None
        except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
            conn.close()
            raise _Damaged(f"cannot use {self.path}: {exc}") from None
        return _Link(conn, os.getpid(), file)

    def _make_file(self) -> None:
        """Make the file if missing, whole (tables and start written under another name, then renamed in), under
        a lock file, so that no process ever opens a file without tables, and the -wal and -shm a deleted file
        left behind (other processes may still use them) are removed only before a new file exists."""
        if self.path.exists():
            return
        lock_path = self._lock_path
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            first_here = not lock_path.exists()
            lock = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not self.path.exists():
                    for suffix in ("-wal", "-shm"):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(f"{self.path}{suffix}")
                    self._build(first_here)
            finally:
                os.close(lock)
        except OSError as exc:
            raise HostStateError(f"cannot create {self.path}: {exc.strerror}") from None
        except sqlite3.Error as exc:
            raise HostStateError(f"cannot create {self.path}: {exc}") from None

    def _build(self, first_here: bool) -> None:
        """A new file with its tables and start. The first file ever at this path (no lock file yet) starts at
        0: no token can have been checked here before. Any later one (the previous file was deleted) starts
        now, so that tokens checked against the lost file are refused."""
        building = Path(f"{self.path}.new")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{building}{suffix}")
        os.close(os.open(building, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
        conn = sqlite3.connect(building, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            boot = _boot_id()
            started = _STARTED.format(now=0.0 if first_here else time.time())
            booted = _BOOTED.format(boot=boot) if boot else ""
            conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} {started} {booted} COMMIT;")
        finally:
            conn.close()  # the last connection checkpoints and removes the -wal
        os.rename(building, self.path)

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Tables and start made if missing (a file of an older version), and a new start after a reboot: one
        transaction at each open."""
        now, boot = time.time(), _boot_id()
        rebooted = _REBOOTED.format(now=now, boot=boot) if boot else ""
        script = f"BEGIN IMMEDIATE; {_SCHEMA} {_STARTED.format(now=now)} {rebooted} COMMIT;"
        _patiently(lambda: _run_script(conn, script), "host state not writable")

    @property
    def _lock_path(self) -> Path:
        """Serialises making the file; its presence says a file was here before (it outlives `rm host-state.db*`)."""
        return self.path.with_name(f".{self.path.name}.lock")

    def _set_aside(self) -> None:
        os.close(os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o600))  # the next file starts now, not at 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}{suffix}", f"{self.path}{suffix}.damaged")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def _boot_id() -> str | None:
    """This boot of the kernel (Linux); None elsewhere, where a reboot is not noticed."""
    try:
        return str(uuid.UUID(_BOOT_ID_FILE.read_text().strip()))
    except (OSError, ValueError):
        return None


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    try:
        conn.executescript(script)
    except sqlite3.OperationalError:
        if conn.in_transaction:
            conn.rollback()
        raise


def _patiently(step, failure: str):
    """Run ``step``, retrying while another process holds the write lock, for at most BUSY_WAIT_S."""
    give_up = time.monotonic() + BUSY_WAIT_S
    while True:
        try:
            return step()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise HostStateError(f"{failure}: {exc}") from None
            if time.monotonic() > give_up:
                raise HostStateError(f"{failure}: locked for too long") from None
            time.sleep(_BUSY_SLEEP_S)


def init_app(app) -> None:
    """One handle on this host's state file per application, for the replay cache and the breakers."""
    app.extensions["host_state"] = HostState.in_instance(app.instance_path)


def host_state(app) -> HostState:
    return app.extensions["host_state"]
