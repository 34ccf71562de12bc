"""Files and folders that hold PHI or secrets: readable by the service alone, whatever the umask.

A leaf module (nothing of the app imported), so that configuration, the audit log, keys and batch runs can all
use it without import cycles."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path


def private_folders(path: Path) -> Path:
    """Create ``path`` and every missing folder above it 0700 (``mkdir(parents=True)`` would give the parents the
    umask's mode); folders that exist are left as they are. Returns ``path``."""
    missing, level = [], Path(path)
    while not level.is_dir() and level != level.parent:
        missing.append(level)
        level = level.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it first
            folder.mkdir(mode=0o700)
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask
    return Path(path)


def tighten(path: Path) -> int | None:
    """Take group and other users' access away from ``path`` (a file or folder that holds secrets or patient data
    and was made by hand or under another umask); returns its former mode when it changed, else None. OSError
    when it cannot be changed."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return None
    if not mode & 0o077:
        return None
    os.chmod(path, mode & 0o700)
    return mode


def private_file(path: Path) -> Path:
    """Create ``path`` 0600 (its missing folders 0700) unless it exists, and tighten it when it does: for a file
    that another program opens by name under its own umask (gunicorn's access log). Returns ``path``."""
    path = Path(path)
    private_folders(path.parent)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    tighten(path)
    return path
