"""File modes in tests: what a file's permission bits are, and a block run under another umask."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path


def mode(path: Path) -> int:
    """The permission bits of ``path`` (0o600, 0o700, ...)."""
    return stat.S_IMODE(Path(path).stat().st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    """Run the block under ``value`` as this process's umask (000 shows what code makes without it)."""
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)
