"""One JSON log line per job state change, for log shipping and for following a job across processes.

A line holds the job id, kind, states from and to, attempt, worker id and, for failures, the error's class:
never the payload, the result or an error's text, which may hold PHI. The ledger writes them after each change
is committed, so every path that changes a job (hooks enqueueing, workers, the sweep, operators) is covered.
The lines are JSON objects of their own on standard error (not wrapped in the plain log format of
``app.logs``), one per line, at INFO, or WARNING for a retry or a lapsed lease, ERROR for a dead letter:
``LOG_LEVEL=WARNING`` keeps only those.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

LOGGER_NAME = "app.jobs.events"

ENQUEUED = "enqueued"
CLAIMED = "claimed"
SUCCEEDED = "succeeded"
RETRY = "retry"  # a failed attempt, queued again after its backoff
DEAD = "dead"
EXPIRED = "expired"
RELEASED = "released"  # handed back unfinished by a worker shutting down
LEASE_LAPSED = "lease-lapsed"  # its worker stopped renewing the lease (killed, hung): queued again by the sweep
REQUEUED = "requeued"  # an operator sent a dead job back to the queue

LEVELS = {RETRY: logging.WARNING, LEASE_LAPSED: logging.WARNING, DEAD: logging.ERROR}
_ERROR_CLASS = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


class _JsonLines(logging.StreamHandler):
    """The message alone (already a JSON object), on whatever ``sys.stderr`` is at the time of the write."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):  # StreamHandler.__init__ assigns one; the current sys.stderr is used instead
        pass


log = logging.getLogger(LOGGER_NAME)
if not any(isinstance(h, _JsonLines) for h in log.handlers):
    log.addHandler(_JsonLines())
log.propagate = False  # a line of its own, not inside the plain format of the root logger


def error_class(error: str | None) -> str | None:
    """The class at the head of a ledger error ("RetryLater: ...", "ValueError at x.py:3 in f"): no text."""
    if not error:
        return None
    match = _ERROR_CLASS.match(error)
    return match.group(0) if match else None


def job_changed(
    change: str,
    job_id: str,
    kind: str,
    source: str | None,
    target: str,
    attempt: int,
    *,
    worker: str | None = None,
    error: str | None = None,
    retry_in: float | None = None,
) -> None:
    """Log one state change of one job (``error``: a ledger error, of which only the class is written)."""
    level = LEVELS.get(change, logging.INFO)
    if not log.isEnabledFor(level):
        return
    entry = {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "level": logging.getLevelName(level),
        "event": f"job.{change}",
        "job": job_id,
        "kind": kind,
        "from": source,
        "to": target,
        "attempt": attempt,
        "worker": worker,
        "error": error_class(error),
        "retryInSeconds": None if retry_in is None else round(retry_in, 3),
    }
    log.log(level, json.dumps({k: v for k, v in entry.items() if v is not None}, separators=(",", ":")))
