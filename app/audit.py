"""The audit trail: one JSON line per hook call, feedback and FHIR fetch, where operators can ship it.

Records say who (client ``iss``, ``userId``), what (service, ``hookInstance``, patient reference), the outcome
and the latency. They never hold tokens or clinical values.
"""

from __future__ import annotations

import os
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson


class AuditLog:
    """Appends JSON lines to a file (``-`` for standard output), one ``write`` per record."""

    def __init__(self, target: str):
        self._lock = threading.Lock()
        if target == "-":
            self._fd = sys.stdout.fileno()
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            # O_APPEND makes each single write land whole at the end, also with several gunicorn workers.
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.target = target

    def record(self, event: str, **fields: Any) -> None:
        """Write one record; fields whose value is None are left out."""
        entry = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event}
        entry.update((k, v) for k, v in fields.items() if v is not None)
        line = orjson.dumps(entry) + b"\n"
        with self._lock:
            os.write(self._fd, line)


def init_app(app) -> None:
    app.extensions["audit"] = AuditLog(app.config["AUDIT_LOG"])


def audit(app) -> AuditLog:
    return app.extensions["audit"]
