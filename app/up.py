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
    # A plain flag, not a threading.Event: the handler runs in the main thread, possibly while that thread holds
    # the Event's lock inside Event.wait, and Event.set would then wait for it forever (seen: make run hung).
    stopping: list[int] = []

    def on_signal(signum, _frame):
        stopping.append(signum)

    # Kept until the process exits: a late stop signal (make forwards its own) must not kill this process with the
    # default action while it waits for the others to stop.
    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    processes = {
        name: subprocess.Popen(argv, start_new_session=True)  # noqa: S603 - our own commands, no shell
        for name, argv in named_commands.items()
    }
    first_exit: tuple[str, int] | None = None
    while not stopping:
        for name, process in processes.items():
            if process.poll() is not None:
                first_exit = (name, process.returncode)
                break
        if first_exit:
            break
        time.sleep(POLL_S)  # the handler runs during the sleep; the flag is seen within POLL_S
    if first_exit:
        name, status = first_exit
        click.echo(f"gateway up: the {name} exited (status {status}); stopping the others", err=True)
    _stop_all(processes, stop_timeout)
    return (first_exit[1] or 1) if first_exit else 0


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
