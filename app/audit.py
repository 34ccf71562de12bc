"""The audit trail: one JSON line per hook call, feedback and FHIR fetch, where operators can ship it.

Records say who (client ``iss``, ``userId``), what (service, ``hookInstance``, patient reference), the outcome
and the latency. They never hold tokens or clinical values.

No caller can make a record long: text is cut at MAX_TEXT_CHARS, lists and objects at MAX_ITEMS, and the
names of the fields that were cut are listed in ``truncated``. A whole record stays under MAX_RECORD_BYTES,
well below PIPE_BUF (4096), so that each one is a single write that lands whole, also through a pipe (``-``)
shared by several gunicorn workers.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import sys
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from app.private_files import private_folders

MAX_TEXT_CHARS = 200
MAX_ITEMS = 20
MAX_RECORD_BYTES = 2048
# Tighter caps for a record still over MAX_RECORD_BYTES (many long fields, or text that JSON escapes 6:1).
_SHRINKING_CAPS = ((MAX_TEXT_CHARS, MAX_ITEMS), (64, 8), (16, 2))
_NATIVE = (bool, float, datetime, dt.date, uuid.UUID)  # orjson writes these as they are


class AuditLog:
    """Appends JSON lines to a file (``-`` for standard output), one ``write`` per record."""

    def __init__(self, target: str):
        self._lock = threading.Lock()
        if target == "-":
            self._fd = sys.stdout.fileno()
        else:
            private_folders(Path(target).parent)
            # O_APPEND makes each single write land whole at the end, also with several gunicorn workers.
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            if stat.S_ISREG(os.fstat(self._fd).st_mode):
                os.fchmod(self._fd, 0o600)  # also an older log, or one made under another umask
        self.target = target

    def record(self, event: str, **fields: Any) -> None:
        """Write one record; fields whose value is None are left out, long values are cut (see the module)."""
        ts = datetime.now(UTC).isoformat(timespec="milliseconds")
        fields = {k: v for k, v in fields.items() if v is not None}
        for text_chars, items in _SHRINKING_CAPS:
            line = _line(ts, event, fields, text_chars, items)
            if len(line) <= MAX_RECORD_BYTES:
                break
        else:
            line = orjson.dumps({"ts": ts, "event": event, "pid": os.getpid(), "truncated": ["*"]}) + b"\n"
        with self._lock:
            os.write(self._fd, line)


def _line(ts: str, event: str, fields: dict[str, Any], text_chars: int, items: int) -> bytes:
    entry: dict[str, Any] = {"ts": ts, "event": event, "pid": os.getpid()}  # which worker process: operations
    truncated = []
    for name, value in fields.items():
        kind = type(value)
        if (
            (kind is str and len(value) <= text_chars)
            or kind is float
            or kind is bool
            or (kind is int and _fits(value))
        ):
            entry[name] = value  # the usual short field, without a call
            continue
        entry[name], cut = _capped(value, text_chars, items)
        if cut:
            truncated.append(name)
    if truncated:
        entry["truncated"] = truncated
    try:
        return orjson.dumps(entry) + b"\n"
    except orjson.JSONEncodeError:  # a lone surrogate in some text
        return orjson.dumps(_valid_utf8(entry)) + b"\n"


def _capped(value: Any, text_chars: int, items: int, depth: int = 0) -> tuple[Any, bool]:
    """``value`` with text cut at ``text_chars`` and lists and objects at ``items``; whether anything was cut."""
    if isinstance(value, _NATIVE) or (isinstance(value, int) and _fits(value)):
        return value, False
    if isinstance(value, int):
        return "(integer beyond 64 bits)", True
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        if depth >= 2:
            return "...", True
        pairs = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
        cut = len(pairs) > items
        kept = []
        for key, item in pairs[:items]:
            item, item_cut = _capped(item, text_chars, items, depth + 1)
            key, key_cut = str(key)[:text_chars], len(str(key)) > text_chars
            kept.append((key, item))
            cut = cut or item_cut or key_cut
        return (dict(kept) if isinstance(value, dict) else [item for _, item in kept]), cut
    text = value if isinstance(value, str) else str(value)
    return text[:text_chars], len(text) > text_chars


def _fits(number: int) -> bool:
    return -(2**63) <= number < 2**64  # what orjson can write


def _valid_utf8(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, list):
        return [_valid_utf8(item) for item in value]
    if isinstance(value, dict):
        return {_valid_utf8(k): _valid_utf8(v) for k, v in value.items()}
    return value


def init_app(app) -> None:
    app.extensions["audit"] = AuditLog(app.config["AUDIT_LOG"])


def audit(app) -> AuditLog:
    return app.extensions["audit"]
