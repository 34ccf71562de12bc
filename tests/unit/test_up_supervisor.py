"""`gateway up` (what `make run` starts) stops on every stop signal, however many arrive and whenever they do."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.support.assertions import wait_for
from tests.support.processes import children

SUPERVISOR = textwrap.dedent(
    """
    import sys
    from app.up import run_together
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    sys.exit(run_together({"web server": sleeper, "job worker": sleeper}, stop_timeout=5))
    """
)


def test_repeated_stop_signals_never_hang_the_supervisor():
    # `make run` stopped by a process-group SIGTERM gets it twice (once directly, once forwarded by make): a
    # handler that waits on a lock its own thread holds hung there for good. Many trials, signals at random times.
    rng = random.Random(7)
    for trial in range(12):
        supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR], start_new_session=True)
        pid = supervisor.pid
        wait_for(lambda pid=pid: len(children(pid)) == 2, "the supervisor did not start its two processes", 30)
        started = children(pid)
        time.sleep(rng.random() * 0.2)
        for _ in range(3):  # some arrive while it stops the others: they must not kill it with the default action
            os.killpg(supervisor.pid, signal.SIGTERM)
            time.sleep(rng.random() * 0.05)
        try:
            # Stopped, with its processes: 0, or the signal's own status when one came during the interpreter's
            # exit (Python restores the default action then); never still running.
            assert supervisor.wait(timeout=10) in (0, -signal.SIGTERM), f"trial {trial}"
            assert not [child for child in started if Path(f"/proc/{child}").exists()], f"trial {trial}"
        finally:
            if supervisor.poll() is None:
                os.killpg(supervisor.pid, signal.SIGKILL)
