"""Starting the gateway as a real server process for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = ROOT / ".venv/bin/gateway"  # the console command `make` installs (pyproject.toml [project.scripts])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_gateway_settings(work: Path, port: int, signing_key, **extra: str) -> dict[str, str]:
    """The environment of a gateway on loopback ``port`` keeping everything under ``work`` (SQLite, instance,
    audit log) and trusting ``signing_key``'s client only; ``extra`` settings on top."""
    from tests.support.tokens import clients_document

    clients = work / "clients.json"
    clients.write_text(json.dumps(clients_document(signing_key, [])))
    return {
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "INSTANCE_PATH": str(work),
        "DATABASE_URL": f"sqlite:///{work / 'gateway.db'}",
        "CDS_CLIENTS_FILE": str(clients),
        "AUDIT_LOG": str(work / "audit.jsonl"),
        **extra,
    }


def migrate(env: dict[str, str]) -> None:
    """``gateway db upgrade`` with these settings (on top of this process's environment)."""
    subprocess.run(
        [str(GATEWAY), "db", "upgrade"],
        cwd=ROOT,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        timeout=60,
    )


def healthy(base: str) -> bool:
    try:
        return requests.get(f"{base}/healthz", timeout=1).status_code == 200
    except requests.RequestException:  # not listening yet, or listening while its workers still boot
        return False


@contextlib.contextmanager
def gunicorn(env: dict[str, str], port: int, startup_seconds: float = 60) -> Iterator[str]:
    """Migrate, then ``gateway serve`` (gunicorn under app/gunicorn_conf.py) on ``port``; yields its base URL."""
    env = {**os.environ, **env, "PORT": str(port)}
    migrate(env)
    proc = subprocess.Popen(
        [str(GATEWAY), "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_seconds
        while not healthy(base):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("gunicorn did not become healthy")
            time.sleep(0.2)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def start_worker(env: dict[str, str], *args: str, log_path: Path | None = None) -> subprocess.Popen:
    """``gateway jobs worker`` as its own process (its own session, so it can be killed alone)."""
    output = log_path.open("ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(
        [str(GATEWAY), "jobs", "worker", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=output,
        stderr=output,
        start_new_session=True,
    )


def _parents() -> dict[int, list[int]]:
    """Each process's children, from /proc (a parent may start them in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    return _parents().get(pid, [])


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, not by process group (sessions of their own are followed too)."""
    tree, found, todo = _parents(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
