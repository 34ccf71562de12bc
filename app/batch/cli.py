"""``gateway batch start|status|list|cancel``: population runs from the command line (the workers do the work)."""

from __future__ import annotations

import json
import sys
import time

import click
from flask import Flask
from tqdm import tqdm

from app.batch import runs, tasks
from app.batch.routes import run_view

POLL_S = 0.5


def _counts_line(view: dict) -> str:
    counts = view.get("counts") or {}
    return (
        f"{counts.get('patients', 0)} patients: {counts.get('scored', 0)} scored, "
        f"{counts.get('notScored', 0)} not scored, {counts.get('worklist', 0)} on the worklist, "
        f"{counts.get('badLines', 0)} bad lines, {counts.get('dropped', 0)} resources of no patient left out"
    )


def _wait(app: Flask, run_id: str) -> runs.Run:
    """Show a progress bar (stage, files, patients scored, rate, ETA) until the run ends."""
    engine = app.extensions["db"]
    bar = tqdm(total=None, unit="part", file=sys.stderr, dynamic_ncols=True, disable=None)
    try:
        while True:
            run = runs.get(engine, run_id)
            view = run_view(app, run)
            total, done = (view["parts"] or {}).get("total"), (view["parts"] or {}).get("done") or 0
            if total and bar.total != total:
                bar.reset(total=total)
            bar.n = done
            counts = view.get("counts") or {}
            bar.set_description(run.state + (f" ({run.note})" if run.note else ""), refresh=False)
            bar.set_postfix(files=view["files"] or 0, scored=counts.get("scored", 0), refresh=False)
            bar.refresh()
            if run.ended:
                return run
            time.sleep(POLL_S)
    finally:
        bar.close()


def init_cli(app: Flask) -> None:
    @app.cli.group("batch")
    def batch_group():
        """Population runs over FHIR Bulk Data (the job workers do the work: run `gateway jobs worker`)."""

    @batch_group.command("start")
    @click.argument("service")
    @click.option("--client", "client_iss", required=True, help="The trusted client (iss) whose EHR is read.")
    @click.option("--fhir-server", required=True, help="The EHR's FHIR base URL (on the client's allowlist).")
    @click.option("--group", default=None, help="Export this Group's members (default: every patient).")
    @click.option("--since", default=None, help="Only resources changed since this FHIR instant.")
    @click.option("--write-back", is_flag=True, help="Write each RiskAssessment to the EHR (conditional create).")
    @click.option("--wait", is_flag=True, help="Show progress; exit 0 when the run succeeded, 1 otherwise.")
    def start(service, client_iss, fhir_server, group, since, write_back, wait):
        """Start a run; prints its id first."""
        try:
            run = tasks.start(
                app,
                service_id=service,
                client_iss=client_iss,
                fhir_server=fhir_server,
                group=group,
                since=since,
                write_back=write_back,
            )
        except tasks.BatchError as exc:
            raise click.UsageError(str(exc)) from None
        click.echo(run.id)
        if not wait:
            click.echo(f"started; follow it with: gateway batch status {run.id}")
            return
        ended = _wait(app, run.id)
        _print_status(app, ended)
        sys.exit(0 if ended.state == runs.SUCCEEDED else 1)

    @batch_group.command("status")
    @click.argument("run_id")
    @click.option("--json", "as_json", is_flag=True, help="The whole status as JSON.")
    def status(run_id, as_json):
        """A run's state, progress and counts."""
        run = runs.get(app.extensions["db"], run_id)
        if run is None:
            raise click.UsageError(f"no batch run {run_id!r}")
        if as_json:
            click.echo(json.dumps(run_view(app, run), indent=2))
            return
        _print_status(app, run)

    @batch_group.command("list")
    @click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 500))
    def list_runs(limit):
        """The newest runs first."""
        for run in runs.recent(app.extensions["db"], limit):
            click.echo(f"{run.id}\t{run.state}\t{run.service}\t{run.created_at.isoformat(timespec='seconds')}")

    @batch_group.command("cancel")
    @click.argument("run_id")
    def cancel(run_id):
        """Cancel a run that has not ended."""
        run = runs.get(app.extensions["db"], run_id)
        if run is None:
            raise click.UsageError(f"no batch run {run_id!r}")
        if not tasks.cancel(app, run_id):
            raise click.ClickException(f"run {run_id} is {run.state}: only a run that has not ended can be cancelled")
        click.echo(f"{run_id} cancelled")


def _print_status(app: Flask, run: runs.Run) -> None:
    view = run_view(app, run)
    click.echo(f"{run.id}: {run.state}" + (f" ({run.note})" if run.note else ""))
    if run.error:
        click.echo(f"error: {run.error}")
    progress = view["parts"] or {}
    if progress.get("total"):
        click.echo(f"parts: {progress['done']}/{progress['total']}")
    click.echo(_counts_line(view))
    if run.state == runs.SUCCEEDED:
        click.echo(f"outputs: {tasks.run_dir(app, run.id)}")
