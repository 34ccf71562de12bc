"""The job worker's stop signals never deadlock it: its handler takes no lock, so a signal that arrives while the
main thread holds the stop Event's lock (inside Event.set for an earlier signal) still stops the worker."""

from __future__ import annotations

import subprocess
import sys

from tests.support.processes import ROOT

# In a process of its own: the handlers stay installed until exit, and the old handler hung forever here.
SIGNAL_INSIDE_EVENT_SET = """
import os, signal, threading
from app.jobs.cli import _stop_on_signals
stop = threading.Event()
_stop_on_signals(stop)
with stop._cond:  # the main thread is inside Event.set when the next signal comes
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(10_000):
        pass  # the handler runs between these bytecodes
print("stopped" if stop.wait(10) else "not stopped")
"""


def test_a_stop_signal_inside_event_set_does_not_deadlock_the_worker():
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_INSIDE_EVENT_SET], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert (done.returncode, done.stdout.strip()) == (0, "stopped"), done.stderr
