"""Application logging that cannot leak PHI: exceptions are described by type and place, never by message."""

from __future__ import annotations

import logging
import traceback


def where(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame, for a log line without the exception's message."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown"
    last = frames[-1]
    return f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name}"


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__} at {where(exc)}"


def configure(level: str) -> None:
    """Plain key-value logs on stderr, unless a server (gunicorn) already configured the root logger."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root.setLevel(level)
