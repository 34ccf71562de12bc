"""A job worker yields the CPU to the processes that answer hooks: it runs at a lower priority (nice)."""

from __future__ import annotations

import os
import signal
import time

from tests.support.databases import sqlite_database
from tests.support.processes import start_worker


def niceness_of(pid: int, timeout: float = 30.0) -> int:
    """The worker's niceness once it has started its loops (it lowers its priority before that)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        niceness = os.getpriority(os.PRIO_PROCESS, pid)
        if niceness != os.getpriority(os.PRIO_PROCESS, 0):
            return niceness
        time.sleep(0.1)
    return os.getpriority(os.PRIO_PROCESS, pid)


def test_a_worker_runs_at_a_lower_priority_than_the_service_by_default(tmp_path, clients_file):
    env = {
        "DATABASE_URL": sqlite_database(tmp_path),
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "CDS_CLIENTS_FILE": str(clients_file),
        "PUBLIC_BASE_URL": "http://localhost:8080",
    }
    worker = start_worker(env)
    try:
        assert niceness_of(worker.pid) == os.getpriority(os.PRIO_PROCESS, 0) + 10
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
