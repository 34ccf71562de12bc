"""The host's shared metrics directory: one per PID namespace under INSTANCE_PATH/metrics, files of exited
processes removed at start, and metrics written there even when prometheus_client was imported first. Each case
runs in a process of its own, since multiprocess mode is process-wide."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.metrics import remove_dead_process_files

ROOT = Path(__file__).resolve().parents[2]


def exited_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_files_of_processes_that_exited_are_removed(tmp_path):
    dead, alive = exited_pid(), os.getppid()
    names = [
        f"counter_{dead}.db",
        f"histogram_{dead}.db",
        f"gauge_livesum_{dead}.db",
        f"counter_{alive}.db",
        f"gauge_max_{os.getpid()}.db",
        "notes.db",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert remove_dead_process_files(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[3:])


def run(script: str, env: dict[str, str], prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | env
    return subprocess.run(
        [*prefix, sys.executable, "-c", script], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60
    )


SCRIPT = """
import os, sys
import prometheus_client  # already imported, as in a process that built the app before preparing
from app.metrics import prepare_multiprocess_dir
directory = prepare_multiprocess_dir(sys.argv[1] if len(sys.argv) > 1 else {instance!r})
counter = prometheus_client.Counter("wv_test_total", "test", ["kind"])
counter.labels("x").inc()
print(directory, os.environ["PROMETHEUS_MULTIPROC_DIR"], os.getpid())
"""


def test_a_process_writes_its_metrics_under_the_instance_folder_and_the_next_one_clears_them(tmp_path):
    instance = tmp_path / "instance"
    first = run(SCRIPT.format(instance=str(instance)), {})
    assert first.returncode == 0, first.stderr
    directory, variable, pid = first.stdout.split()
    namespace = os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    assert directory == variable == str(instance / "metrics" / f"pidns-{namespace}")
    assert {folder.stat().st_mode & 0o777 for folder in (instance, instance / "metrics", Path(directory))} == {0o700}
    assert (Path(directory) / f"counter_{pid}.db").stat().st_size > 0

    second = run(SCRIPT.format(instance=str(instance)), {})
    assert second.returncode == 0, second.stderr
    assert [p.name for p in Path(directory).iterdir()] == [f"counter_{second.stdout.split()[2]}.db"]


def test_processes_of_another_pid_namespace_write_and_clean_up_a_directory_of_their_own(tmp_path):
    """Containers sharing an INSTANCE_PATH volume: process ids repeat across them, and a process id of one is
    not alive (or is someone else) in another."""
    unshare = shutil.which("unshare")
    if not unshare or subprocess.run([unshare, "--pid", "--fork", "--mount-proc", "true"]).returncode != 0:
        pytest.skip("cannot make a PID namespace here (unshare needs root or user namespaces)")
    instance = tmp_path / "instance"
    ours = run(SCRIPT.format(instance=str(instance)), {})
    assert ours.returncode == 0, ours.stderr
    ours_dir, _, ours_pid = ours.stdout.split()
    keep = Path(ours_dir) / f"counter_{os.getpid()}.db"  # a process of ours, alive: another namespace leaves it
    keep.write_bytes(b"")
    theirs = run(SCRIPT.format(instance=str(instance)), {}, prefix=(unshare, "--pid", "--fork", "--mount-proc"))
    assert theirs.returncode == 0, theirs.stderr
    theirs_dir, _, theirs_pid = theirs.stdout.split()
    assert theirs_dir != ours_dir and Path(theirs_dir).parent == Path(ours_dir).parent
    assert theirs_pid == "1"  # the first process of a new namespace, as in a container
    assert sorted(p.name for p in Path(ours_dir).iterdir()) == sorted([f"counter_{ours_pid}.db", keep.name])
    assert [p.name for p in Path(theirs_dir).iterdir()] == ["counter_1.db"]


def test_a_directory_set_in_the_environment_is_kept(tmp_path):
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    done = run(SCRIPT.format(instance=str(tmp_path / "instance")), {"PROMETHEUS_MULTIPROC_DIR": str(chosen)})
    assert done.returncode == 0, done.stderr
    pid = done.stdout.split()[2]
    assert (chosen / f"counter_{pid}.db").exists()
    assert not (tmp_path / "instance").exists()
