"""A full instance disk never kills a process through its Prometheus files: they are memory-mapped, and a write
to a page without a disk block is SIGBUS. On a real 2 MiB tmpfs (mounting needs root: skipped otherwise)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.processes import ROOT

# In a process of its own (SIGBUS would kill pytest): metrics files made, the disk filled, then many new series.
FILL_THEN_RECORD = """
import sys
from pathlib import Path
from app.metrics import prepare_multiprocess_dir
disk = Path(sys.argv[1])
prepare_multiprocess_dir(disk / "instance")
from prometheus_client import Counter
calls = Counter("full_disk_calls_total", "Calls", ["patient_service"])
calls.labels("first").inc()  # the file is made while there is room
if sys.argv[2] == "after":
    from tests.integration.test_metrics_full_disk import fill
    fill(disk)
for i in range(2000):  # about 150 kB of new series: pages the file had no block for
    calls.labels(f"service-{i}").inc()
print(sum(1 for _ in calls.collect()[0].samples))
"""


@pytest.fixture
def small_disk():
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with tempfile.TemporaryDirectory(prefix="full-disk-") as directory:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", directory], capture_output=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
        try:
            yield Path(directory)
        finally:
            subprocess.run(["umount", directory], check=True)


def fill(disk: Path) -> None:
    """Write to ``disk`` until it has no block left."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, b"x" * 4096)
    os.close(fd)


def record(disk: Path, when: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return subprocess.run(
        [sys.executable, "-c", FILL_THEN_RECORD, str(disk), when],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_new_series_after_the_disk_filled_up_do_not_kill_the_process(small_disk):
    done = record(small_disk, "after")
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert int(done.stdout) >= 2001


def test_a_process_started_on_a_full_disk_keeps_its_metrics_in_memory(small_disk):
    fill(small_disk)
    done = record(small_disk, "before")
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert int(done.stdout) >= 2001 and "kept in memory only" in done.stderr
