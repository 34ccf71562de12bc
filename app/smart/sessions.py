"""Server-side SMART app sessions: the browser holds a random token, the database its hash and encrypted state.

A session's state is a JSON object: first the pending launch (``state``, ``code_verifier``, ``iss``, ``launch``,
endpoints), then, after the callback, the token response and a CSRF token. The whole state is encrypted with
Fernet (AES-128-CBC + HMAC-SHA256) under a key kept in ``instance/keys/smart-sessions.fernet``, so a copy of the
database alone yields no access or refresh token. The row id is the SHA-256 of the cookie's token, so the
database alone cannot be replayed as a cookie either.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken

from app.db import metadata
from app.jobs.ledger import UTCDateTime

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
    """The Fernet key in ``directory`` (created with mode 0600 on first use)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return Fernet(path.read_bytes().strip())
    with os.fdopen(fd, "wb") as handle:
        key = Fernet.generate_key()
        handle.write(key)
    return Fernet(key)


@dataclass(frozen=True)
class SmartSession:
    """One browser's session: the cookie token that names it and its decrypted state."""

    token: str
    state: dict[str, Any]
    created_at: datetime
    expires_at: datetime


class SessionStore:
    """Create, read, replace and delete sessions; expired or undecryptable rows read as absent."""

    def __init__(self, engine: sa.Engine, fernet: Fernet, ttl_s: int):
        self.engine = engine
        self.fernet = fernet
        self.ttl = timedelta(seconds=ttl_s)

    def _seal(self, state: dict[str, Any]) -> str:
        return self.fernet.encrypt(json.dumps(state, separators=(",", ":")).encode("utf-8")).decode("ascii")

    def _open(self, sealed: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.fernet.decrypt(sealed.encode("ascii")))
        except (InvalidToken, ValueError):
            return None

    def create(self, state: dict[str, Any], *, now: datetime | None = None) -> SmartSession:
        """A new session holding ``state``; expired rows are purged on the way."""
        now = now or datetime.now(UTC)
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
        now = now or datetime.now(UTC)
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

    def rotate(self, session: SmartSession, state: dict[str, Any], *, now: datetime | None = None) -> SmartSession:
        """Move a session to a new cookie token with new ``state`` and a fresh lifetime (prevents fixation)."""
        now = now or datetime.now(UTC)
        token = new_cookie_token()
        with self.engine.begin() as conn:
            conn.execute(sa.delete(smart_sessions).where(smart_sessions.c.id == session_id(session.token)))
            conn.execute(
                sa.insert(smart_sessions).values(
                    id=session_id(token), created_at=now, expires_at=now + self.ttl, state=self._seal(state)
                )
            )
        return SmartSession(token, state, now, now + self.ttl)

    def delete(self, token: str | None) -> None:
        if token:
            with self.engine.begin() as conn:
                conn.execute(sa.delete(smart_sessions).where(smart_sessions.c.id == session_id(token)))
