"""podman from tests: why it cannot be used, and a labelled session that removes every container and image it made.

The base image (python:3.11-slim) is made once by ``.ci/container-setup`` (root); nothing here pulls from a registry.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

BASE_IMAGE = "docker.io/library/python:3.11-slim"
LABEL = "clinical-ai-gateway.test"
SETUP = ".ci/container-setup"
# podman 4.3 logs these for every container with a HEALTHCHECK on a host without systemd; the check itself works
# (`podman healthcheck run`), only its timer is missing.
_SYSTEMD_NOISE = re.compile(r".*unable to get systemd connection.*\n?")


def podman_unavailable() -> str | None:
    """Why the container tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root: the container tests run podman as root"
    if not shutil.which("podman"):
        return f"podman is not installed (run {SETUP} as root)"
    found = subprocess.run(["podman", "image", "exists", BASE_IMAGE], capture_output=True, timeout=30)
    if found.returncode != 0:
        return f"no {BASE_IMAGE} base image (run {SETUP} as root to make it)"
    return None


def pip_mirror_volumes() -> list[str]:
    """``--volume`` options for the local package directories this host's pip reads (find-links, file:// indexes),
    read-only at the same paths, so that pip in a build sees what pip on the host sees (the base image carries the
    host's pip configuration, not the packages)."""
    listed = subprocess.run(["pip", "config", "list"], capture_output=True, text=True, timeout=30).stdout
    paths = set()
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if not key.endswith(("find-links", "index-url")):
            continue
        for item in value.strip("'\"").split():
            path = urlsplit(item).path if item.startswith("file:") else item
            if path.startswith("/"):
                # An index URL names .../simple; its package files lie beside it (../files).
                paths.add(Path(path).parent if key.endswith("index-url") else Path(path))
    return [f"--volume={p}:{p}:ro" for p in sorted(paths) if p.is_dir()]


class Podman:
    """podman commands under one label, so that :meth:`clean_up` finds and removes everything a test session made."""

    def __init__(self) -> None:
        self.run_id = uuid.uuid4().hex[:12]
        self.label = f"{LABEL}={self.run_id}"

    def __call__(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
        result.stderr = _SYSTEMD_NOISE.sub("", result.stderr)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
        return result

    def build(self, context: Path, tag: str, timeout: float = 240) -> str:
        """Build ``context`` with its Dockerfile; the builder stage's image carries the label too."""
        self(
            "build",
            "--pull=never",
            "--format=docker",  # OCI images have no HEALTHCHECK
            "--layers=false",  # no intermediate images left behind: only each stage's, which carry the label
            f"--label={self.label}",
            *pip_mirror_volumes(),
            f"--tag={tag}",
            str(context),
            timeout=timeout,
        )
        return tag

    def start(self, name: str, image: str, *args: str, options: tuple[str, ...] = ()) -> str:
        """A detached container named ``<name>-<run id>`` on the host's network; returns its name."""
        full = f"{name}-{self.run_id}"
        self("run", "--detach", f"--name={full}", f"--label={self.label}", "--network=host", *options, image, *args)
        return full

    def stop(self, name: str, timeout: float = 30) -> tuple[float, int]:
        """SIGTERM (the image's stop signal), SIGKILL after ``timeout``: (seconds it took, exit status)."""
        started = time.monotonic()
        self("stop", f"--time={int(timeout)}", name, timeout=timeout + 30)
        took = time.monotonic() - started
        status = int(self("inspect", "--format={{.State.ExitCode}}", name).stdout.strip())
        return took, status

    def logs(self, name: str) -> str:
        result = self("logs", name, check=False)
        return result.stdout + result.stderr

    def clean_up(self) -> None:
        """Remove this session's containers (with their anonymous volumes), then its images."""
        containers = self("ps", "--all", "--quiet", f"--filter=label={self.label}", check=False).stdout.split()
        if containers:
            self("rm", "--force", "--volumes", "--time=0", *containers, check=False)
        images = self("images", "--quiet", f"--filter=label={self.label}", check=False).stdout.split()
        if images:
            self("rmi", "--force", *dict.fromkeys(images), check=False, timeout=120)


@contextlib.contextmanager
def podman_session() -> Iterator[Podman]:
    engine = Podman()
    try:
        yield engine
    finally:
        engine.clean_up()
