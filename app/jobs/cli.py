"""``flask --app app jobs ...`` (``gateway jobs ...``): run workers and see them, list, inspect and requeue the
dead letter queue, and manage webhook endpoints."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import uuid

import click
from flask import Flask

from app.jobs import ledger, presence
from app.jobs.canary import CANARY
from app.jobs.registry import job_kinds, submit
from app.jobs.views import job_summary
from app.jobs.worker import Worker, new_worker_id
from app.metrics import mark_process_dead, prepare_multiprocess_dir, serve_process_metrics

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def init_cli(app: Flask) -> None:
    """``flask jobs``; other areas add their own commands to the group (the webhooks area its ``webhooks``)."""

    @app.cli.group("jobs")
    def jobs_group():
        """Asynchronous jobs: workers, the dead letter queue, webhook endpoints."""

    @jobs_group.command("worker")
    @click.option("--threads", default=2, show_default=True, type=click.IntRange(1, 64), help="Claim loops.")
    @click.option("--kind", "kinds", multiple=True, help="Only these job kinds (repeatable). Default: all.")
    @click.option("--burst", is_flag=True, help="Exit when no job is due (for scripts and benchmarks).")
    @click.option("--grace", default=20.0, show_default=True, help="Seconds to finish the job in hand on SIGTERM.")
    @click.option(
        "--nice",
        default=10,
        show_default=True,
        type=click.IntRange(0, 19),
        help="Lower this process's CPU priority by this much, so that on a shared host the processes answering "
        "hooks get the CPU first.",
    )
    @click.option(
        "--heartbeat",
        default=presence.HEARTBEAT_SECONDS,
        show_default=True,
        type=click.FloatRange(0.05, 300),
        help=f"Seconds between this worker's heartbeats; after {presence.LIVE_BEATS} missed ones it counts as lost "
        "(/readyz, gateway_workers_live).",
    )
    @click.option(
        "--metrics-port",
        default=None,
        type=click.IntRange(1, 65535),
        help="Also serve this worker's own metrics at http://HOST:PORT/metrics (a worker in a container of its "
        "own; next to gunicorn, the gateway's /metrics already includes them).",
    )
    def worker_command(
        threads: int,
        kinds: tuple[str, ...],
        burst: bool,
        grace: float,
        nice: int,
        heartbeat: float,
        metrics_port: int | None,
    ) -> None:
        """Run jobs until SIGTERM/SIGINT; the job in hand is finished or, after --grace, handed back."""
        prepare_multiprocess_dir(app.config["INSTANCE_PATH"])
        metrics_server = (
            _serve_metrics(app.config["HOST"], metrics_port, app.config["METRICS_TOKEN"]) if metrics_port else None
        )
        os.nice(nice)
        stop = threading.Event()
        _stop_on_signals(stop)
        process_id = new_worker_id()
        beating = presence.Presence.for_app(
            app, process_id, list(kinds) or job_kinds(), threads=1 if burst else threads, interval=heartbeat
        ).start()
        try:
            workers = [
                Worker(
                    app,
                    worker_id=f"{process_id}/{i}",
                    kinds=list(kinds) or None,
                    grace_seconds=grace,
                    stop=stop,
                    presence=beating,
                )
                for i in range(threads)
            ]
            if burst:
                done = sum(len(w.run_until_idle()) for w in workers[:1])
                click.echo(f"{done} jobs run")
                return
            loops = [threading.Thread(target=w.run, name=f"worker-{i}") for i, w in enumerate(workers)]
            for loop in loops:
                loop.start()
            while any(loop.is_alive() for loop in loops):
                for loop in loops:
                    loop.join(timeout=0.5)
        finally:
            beating.stop()
            if metrics_server is not None:
                metrics_server.shutdown()
            mark_process_dead()

    @jobs_group.command("workers")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
    def workers_command(as_json: bool) -> None:
        """Worker processes seen in the last day: live, lost (no heartbeat lately) or stopped."""
        rows = presence.listing(app.extensions["db"])
        for row in rows:
            if as_json:
                click.echo(json.dumps(row))
            else:
                click.echo(
                    f"{row['id']}\t{row['state']}\tseen {row['seenAt']}\t{row['jobsRun']} run, "
                    f"{row['jobsFailed']} failed\t{','.join(row['kinds'])}"
                )
        if not as_json:
            live = sum(row["state"] == "live" for row in rows)
            click.echo(f"{live} live worker(s)", err=True)

    @jobs_group.command("canary")
    @click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for a worker to run it.")
    def canary_command(timeout: float) -> None:
        """Enqueue a no-op job and wait until a worker has run it: exit 0 when workers are working."""
        engine = app.extensions["db"]
        job_id = f"canary-{uuid.uuid4().hex}"
        submit(app, CANARY, job_id, {}, expires_in=timeout)
        deadline = time.monotonic() + timeout
        while (job := ledger.get(engine, job_id)).state not in (ledger.SUCCEEDED, ledger.DEAD, ledger.EXPIRED):
            if time.monotonic() > deadline:
                raise click.ClickException(f"no worker ran the canary job within {timeout:g} s (still {job.state})")
            time.sleep(0.1)
        if job.state != ledger.SUCCEEDED:
            raise click.ClickException(f"the canary job ended {job.state}: {job.last_error or ''}")
        click.echo(f"canary run by {job.result['worker']}")

    @jobs_group.command("stats")
    def stats_command() -> None:
        """Jobs per state, how long the oldest due job has waited, and which database was read (password hidden):
        a command run without the server's DATABASE_URL reads another database, and must say so."""
        engine = app.extensions["db"]
        report = {
            "database": engine.url.render_as_string(hide_password=True),
            "jobs": ledger.counts(engine),
            "oldestQueuedSeconds": ledger.oldest_queued_age(engine),
        }
        click.echo(json.dumps(report))

    @jobs_group.group("dlq")
    def dlq_group():
        """The dead letter queue: jobs that will not be retried until an operator requeues them."""

    @dlq_group.command("list")
    @click.option("--kind", default=None, help="Only this job kind.")
    @click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10_000))
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
    def dlq_list(kind: str | None, limit: int, as_json: bool) -> None:
        """Dead jobs, most recent first: id, kind, attempts, when, last error."""
        dead = ledger.find(app.extensions["db"], ledger.DEAD, kind=kind, limit=limit)
        for job in dead:
            if as_json:
                click.echo(json.dumps(job_summary(job)))
            else:
                click.echo(
                    f"{job.id}\t{job.kind}\t{job.attempts}/{job.max_attempts}\t"
                    f"{job.updated_at.isoformat()}\t{job.last_error or ''}"
                )
        if not as_json:
            click.echo(f"{len(dead)} dead job(s)", err=True)

    @dlq_group.command("show")
    @click.argument("job_id")
    def dlq_show(job_id: str) -> None:
        """One job in full (its payload and result too: operators only, it may hold PHI)."""
        job = ledger.get(app.extensions["db"], job_id)
        if job is None:
            raise click.ClickException(f"no job {job_id!r}")
        click.echo(json.dumps(job_summary(job, full=True), indent=2))

    @dlq_group.command("requeue")
    @click.argument("job_ids", nargs=-1)
    @click.option("--all", "requeue_all", is_flag=True, help="Every dead job (of --kind, when given).")
    @click.option("--kind", default=None)
    def dlq_requeue(job_ids: tuple[str, ...], requeue_all: bool, kind: str | None) -> None:
        """Send dead jobs back to the queue with their attempts reset."""
        engine = app.extensions["db"]
        if requeue_all == bool(job_ids):
            raise click.UsageError("give job ids or --all, not both")
        if requeue_all:
            job_ids = tuple(job.id for job in ledger.find(engine, ledger.DEAD, kind=kind, limit=1_000_000))
        missing = [job_id for job_id in job_ids if not ledger.requeue(engine, job_id)]
        click.echo(f"{len(job_ids) - len(missing)} job(s) requeued")
        if missing:
            raise click.ClickException(f"not dead (or unknown), left alone: {', '.join(missing)}")


def _stop_on_signals(stop: threading.Event) -> None:
    """Set ``stop`` at SIGTERM/SIGINT, from a thread of its own: the handler only writes a byte to a pipe. A handler
    that took a lock (Event.set) deadlocked when a second signal ran it again inside the first one (seen:
    `timeout -s TERM` hung); the handlers stay until the process exits, so a late signal never kills it mid-stop."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)

    def on_signal(_signum, _frame):
        with contextlib.suppress(BlockingIOError):  # the pipe is full of earlier signals: one byte is enough
            os.write(wake_write, b"!")

    def relay():
        os.read(wake_read, 1)
        stop.set()

    threading.Thread(target=relay, name="stop-signals", daemon=True).start()
    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)


def _serve_metrics(host: str, port: int, token: str | None):
    """This process's own metrics over HTTP (behind METRICS_TOKEN when set); the server, to shut down."""
    try:
        return serve_process_metrics(host, port, token)
    except OSError as exc:
        raise click.ClickException(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
