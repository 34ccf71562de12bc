"""``gateway up``: the web server and one job worker together on one machine (what ``make run`` starts).

Both run in process groups of their own, so a Ctrl-C at the terminal reaches only this supervisor, which asks
both to stop gracefully (SIGTERM: gunicorn finishes the requests in flight, the worker the job in hand) and
waits for them. If either one exits on its own, the other is stopped too: a gateway whose worker died would
take discharge jobs that nobody runs.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import click

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_S = 0.1


def commands(worker_args: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """The two processes, by name, started with this interpreter so that no PATH or activated venv is needed."""
    gateway = [sys.executable, "-m", "app.cli"]
    return {"web server": [*gateway, "serve"], "job worker": [*gateway, "jobs", "worker", *worker_args]}


def run_together(named_commands: dict[str, list[str]], stop_timeout: float) -> int:
    """Start every command; return once all have exited: 0 after a stop signal, else the first one's status."""
    stop = threading.Event()

    def on_signal(_signum, _frame):
        stop.set()

    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    processes = {
        name: subprocess.Popen(argv, start_new_session=True)  # noqa: S603 - our own commands, no shell
        for name, argv in named_commands.items()
    }
    try:
        first_exit: tuple[str, int] | None = None
        while not stop.is_set():
            for name, process in processes.items():
                if process.poll() is not None:
                    first_exit = (name, process.returncode)
                    break
            if first_exit:
                break
            stop.wait(POLL_S)
        if first_exit:
            name, status = first_exit
            click.echo(f"gateway up: the {name} exited (status {status}); stopping the others", err=True)
        _stop_all(processes, stop_timeout)
        return (first_exit[1] or 1) if first_exit else 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop_all(processes: dict[str, subprocess.Popen], timeout: float) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for name, process in processes.items():
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            click.echo(f"gateway up: the {name} did not stop within {timeout:g} s; killed", err=True)
            process.kill()
            process.wait()


@click.command("up", context_settings={"ignore_unknown_options": True})
@click.option(
    "--stop-timeout",
    default=25.0,
    show_default=True,
    help="Seconds to wait for a graceful stop before killing (gunicorn's graceful timeout is 20 s).",
)
@click.argument("worker_args", nargs=-1, type=click.UNPROCESSED)
def up_command(stop_timeout: float, worker_args: tuple[str, ...]) -> None:
    """Serve, with one job worker beside the web server; arguments after -- go to the worker."""
    sys.exit(run_together(commands(worker_args), stop_timeout))
