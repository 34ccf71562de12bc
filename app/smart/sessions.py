"""SMART app state: the pending launch sealed in the browser, then a server-side session once the EHR has signed in.

Until the callback, a launch costs us no database row: its pending state (``state``, the PKCE ``code_verifier``,
``iss``, endpoints) travels in a cookie sealed with Fernet (AES-128-CBC + HMAC-SHA256), which the browser can
neither read nor change, and which opens only for a few minutes. After a successful code exchange the token
response and a CSRF token become a session: the browser holds a random token, the database its SHA-256 as the row
id and the state encrypted under the same key (``instance/keys/smart-sessions.fernet``), so a copy of the
database alone yields no access or refresh token and cannot be replayed as a cookie either.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken

from app.clock import SYSTEM_CLOCK, Clock, utc_now, wall_time
from app.db import UTCDateTime, metadata
from app.smart.keys import make_private

KEY_FILE = "smart-sessions.fernet"

smart_sessions = sa.Table(
    "smart_sessions",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),  # sha256 hex of the cookie's token
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("state", sa.Text, nullable=False),  # Fernet token of the JSON state
    sa.Index("ix_smart_sessions_expires_at", "expires_at"),
)


def session_id(cookie_token: str) -> str:
    """The row id for a cookie token: its SHA-256, hex."""
    return hashlib.sha256(cookie_token.encode("utf-8")).hexdigest()


def new_cookie_token() -> str:
    """256 bits of randomness, URL-safe."""
    return secrets.token_urlsafe(32)


def load_or_create_key(directory: Path) -> Fernet:
    """The Fernet key in ``directory``, created (mode 0600) on first use.

    Processes that start together race to create it: the key is written whole to a temporary file and then
    linked into place, which fails if another process got there first, so no process ever reads a half-written
    key and all of them end up with the same one."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / KEY_FILE
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")  # mkstemp creates files 0600
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(Fernet.generate_key())
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    for private in (directory, path):
        make_private(private)
    return Fernet(path.read_bytes().strip())


@dataclass(frozen=True)
class SmartSession:
    """One browser's session: the cookie token that names it and its decrypted state."""

    token: str
    state: dict[str, Any]
    created_at: datetime
    expires_at: datetime


class SessionStore:
    """Create, read, replace and delete sessions; expired or undecryptable rows read as absent. Lifetimes run on
    ``clock`` (wall time: the rows are shared by every process)."""

    def __init__(self, engine: sa.Engine, fernet: Fernet, ttl_s: int, *, clock: Clock = SYSTEM_CLOCK):
        self.engine = engine
        self.fernet = fernet
        self.ttl = timedelta(seconds=ttl_s)
        self.clock = clock

    def _now(self, now: datetime | None) -> datetime:
        return utc_now(now) if now is not None else wall_time(self.clock)

    def _seal(self, state: dict[str, Any]) -> str:
        return self.fernet.encrypt(json.dumps(state, separators=(",", ":")).encode("utf-8")).decode("ascii")

    def _open(self, sealed: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.fernet.decrypt(sealed.encode("ascii")))
        except (InvalidToken, ValueError):
            return None

    def create(self, state: dict[str, Any], *, now: datetime | None = None) -> SmartSession:
        """A new session holding ``state``; expired rows are purged on the way."""
        now = self._now(now)
        token = new_cookie_token()
        with self.engine.begin() as conn:
            conn.execute(sa.delete(smart_sessions).where(smart_sessions.c.expires_at <= now))
            conn.execute(
                sa.insert(smart_sessions).values(
                    id=session_id(token), created_at=now, expires_at=now + self.ttl, state=self._seal(state)
                )
            )
        return SmartSession(token, state, now, now + self.ttl)

    def load(self, token: str | None, *, now: datetime | None = None) -> SmartSession | None:
        """The live session for a cookie token, or None."""
        if not token:
            return None
        now = self._now(now)
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(smart_sessions).where(smart_sessions.c.id == session_id(token))).first()
        if row is None or row.expires_at <= now:
            return None
        state = self._open(row.state)
        return None if state is None else SmartSession(token, state, row.created_at, row.expires_at)

    def save(self, session: SmartSession, state: dict[str, Any]) -> SmartSession:
        """Replace a session's state (e.g. after a token refresh); its lifetime is unchanged."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(smart_sessions)
                .where(smart_sessions.c.id == session_id(session.token))
                .values(state=self._seal(state))
            )
        return SmartSession(session.token, state, session.created_at, session.expires_at)

    def delete(self, token: str | None) -> None:
        if token:
            with self.engine.begin() as conn:
                conn.execute(sa.delete(smart_sessions).where(smart_sessions.c.id == session_id(token)))


def purge_expired(engine: sa.Engine, *, now: datetime, batch: int = 1000, budget_s: float = 1.0) -> int:
    """Delete sessions past their expiry (SMART_SESSION_TTL_S after sign-in: encrypted tokens and patient
    context), oldest first through the expiry index, ``batch`` rows per transaction and again while batches
    come back full, for at most ``budget_s``; returns how many went."""
    expired = (
        sa.select(smart_sessions.c.id)
        .where(smart_sessions.c.expires_at <= now)
        .order_by(smart_sessions.c.expires_at)
        .limit(batch)
    )
    removed, give_up = 0, time.monotonic() + budget_s
    while True:
        with engine.begin() as conn:
            ids = list(conn.execute(expired).scalars())
            deleted = conn.execute(sa.delete(smart_sessions).where(smart_sessions.c.id.in_(ids))).rowcount if ids else 0
        removed += deleted
        if len(ids) < batch or time.monotonic() > give_up:
            return removed


class PendingLaunchSeal:
    """Seals a pending launch into a cookie value and opens it again within ``ttl_s`` seconds of ``clock``.

    The marker keeps a sealed session state (same key) from passing for a pending launch.
    """

    _KIND = "smart-pending-launch"

    def __init__(self, fernet: Fernet, ttl_s: int, *, clock: Clock = SYSTEM_CLOCK):
        self.fernet = fernet
        self.ttl_s = ttl_s
        self.clock = clock

    def seal(self, pending: dict[str, Any], *, now: int | None = None) -> str:
        plain = json.dumps({"kind": self._KIND, "pending": pending}, separators=(",", ":")).encode("utf-8")
        return self.fernet.encrypt_at_time(plain, int(self.clock.now()) if now is None else now).decode("ascii")

    def open(self, sealed: str | None, *, now: int | None = None) -> dict[str, Any] | None:
        """The pending launch, or None when ``sealed`` is missing, changed, from another purpose or too old."""
        if not sealed:
            return None
        try:
            at = int(self.clock.now()) if now is None else now
            content = json.loads(self.fernet.decrypt_at_time(sealed.encode("ascii"), self.ttl_s, at))
        except (InvalidToken, ValueError):
            return None
        if not isinstance(content, dict) or content.get("kind") != self._KIND:
            return None
        pending = content.get("pending")
        return pending if isinstance(pending, dict) else None

    def sealed_at(self, sealed: str) -> int | None:
        """When ``sealed`` was made (Unix seconds), or None when it is not ours."""
        try:
            return self.fernet.extract_timestamp(sealed.encode("ascii"))
        except (InvalidToken, ValueError):
            return None
