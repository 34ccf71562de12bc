"""A run's stages as ledger jobs, run by the ordinary job workers (any number, on any host sharing BATCH_DIR).

``batch.export`` kicks off the Bulk Data export (its status URL stored before anything else), polls it as the
server asks (each poll a short job run, snoozed until the next one is due), downloads the files and plans the
parts; ``batch.split`` cuts one line range into patient buckets; ``batch.score`` scores one bucket (and writes
it back); ``batch.finish`` merges the outputs, writes the report and the manifest, and tells the client.

Each handler checks what is already on disk first (``app.batch.parts``), so a job run again after a kill redoes
only its unfinished step; the next stage's jobs are enqueued under fixed ids by whoever finishes last, so they
are enqueued once however many workers race. Batch jobs have a lower claim priority than clinical jobs.
"""

from __future__ import annotations

import logging
import shutil
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
from flask import Flask
from prometheus_client import Counter, Histogram

from app import smart
from app.ai import ModelUnavailable, batch_lane
from app.audit import audit
from app.batch import outputs, parts, runs
from app.batch.export import (
    BulkDataClient,
    Busy,
    Complete,
    ExportFailed,
    ExportRequest,
    FileExpired,
    Manifest,
    kickoff_url,
)
from app.batch.parts import Identity, Range
from app.batch.report import render_report
from app.batch.writeback import write_back_bucket
from app.cds.clients import trusted_clients
from app.cds.service import get_service, services
from app.clock import app_clock, wall_time
from app.jobs.registry import JobContext, PermanentFailure, Snooze, job_handler, submit
from app.jobs.retry import ExponentialBackoff, RetryPolicy
from app.logs import describe
from app.private_files import private_folders
from app.webhooks import emit

log = logging.getLogger(__name__)

EXPORT, SPLIT, SCORE, FINISH = "batch.export", "batch.split", "batch.score", "batch.finish"
COMPLETED_EVENT = "batch.completed"
PRIORITY = 10  # after every clinical job that is due
# A part fails for a while (the EHR's FHIR server down during write-back, a full disk) before the run fails.
PART_RETRY = RetryPolicy(max_attempts=8, backoff=ExponentialBackoff(base=5, cap=600))
MAX_EXPORTS = 3  # kick-offs per run: a new export when the files expired before they were all fetched
SPLIT_WAIT_S = 5.0
BUSY_WAIT_S = 2.0  # the batch bulkhead is full (more worker threads than BATCH_AI_MAX_IN_FLIGHT): soon again

RUNS = Counter("gateway_batch_runs_total", "Batch runs that ended, by service and state", ["service", "state"])
PARTS = Counter("gateway_batch_parts_total", "Batch part runs, by stage and outcome", ["stage", "outcome"])
PATIENTS = Counter(
    "gateway_batch_patients_total", "Patients of batch runs, by service and outcome", ["service", "outcome"]
)
PART_SECONDS = Histogram(
    "gateway_batch_part_seconds",
    "Duration of batch part runs that did work, by stage",
    ["stage"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)


def run_dir(app: Flask, run_id: str) -> Path:
    return Path(app.config["BATCH_DIR"]) / run_id


def job_id(run_id: str, stage: str, number: int | None = None) -> str:
    return f"batch:{run_id}:{stage}" + (f":{number:06d}" if number is not None else "")


class BatchError(ValueError):
    """A run that cannot be started as asked; the message names the parameter."""


def start(
    app: Flask,
    *,
    service_id: str,
    client_iss: str,
    fhir_server: str,
    group: str | None = None,
    since: str | None = None,
    write_back: bool = False,
) -> runs.Run:
    """Create a run and enqueue its export; BatchError when a parameter is not usable."""
    service = get_service(service_id)
    if service is None or service.population is None:
        batchable = sorted(s.id for s in _batchable())
        raise BatchError(f"service {service_id!r} cannot score a population (batchable: {', '.join(batchable)})")
    trusted = trusted_clients(app).get(client_iss)
    if trusted is None:
        raise BatchError(f"client {client_iss!r} is not in CDS_CLIENTS_FILE")
    if not trusted.allows_fhir_server(fhir_server):
        raise BatchError(f"fhir server {fhir_server!r} is not on the allowlist of client {client_iss!r}")
    if not trusted.smart_backend and not app.config["FHIR_ALLOW_ANONYMOUS"]:
        raise BatchError(f"client {client_iss!r} has no smart_backend: the export needs Backend Services access")
    try:  # the kick-off's own checks, now rather than at the kick-off: a group id, an instant with seconds
        kickoff_url(fhir_server, _export_request(service, group, since))
    except ValueError as exc:
        raise BatchError(str(exc)) from None
    engine = app.extensions["db"]
    run = runs.create(
        engine,
        service=service_id,
        client_iss=client_iss,
        fhir_server=fhir_server.rstrip("/"),
        group_id=group,
        since=since,
        write_back=write_back,
    )
    submit(app, EXPORT, job_id(run.id, "export"), {"run": run.id})
    audit(app).record("batch", action="start", run=run.id, service=service_id, iss=client_iss, writeBack=write_back)
    return run


def cancel(app: Flask, run_id: str) -> bool:
    """Stop a run: its queued parts do nothing when they come up, and its export is deleted on the server."""
    engine = app.extensions["db"]
    run = runs.get(engine, run_id)
    if run is None or not runs.update(engine, run_id, state=runs.CANCELLED, note=None, stamp="cancelled"):
        return False
    if run.status_url and run.state == runs.EXPORTING:
        try:
            _bulk_client(app, run).delete(run.status_url)
        except Exception as exc:  # the server forgets it anyway; cancelling must not fail on it
            log.warning("batch %s: could not delete the export: %s", run_id, describe(exc))
    RUNS.labels(run.service, runs.CANCELLED).inc()
    audit(app).record("batch", action="cancel", run=run_id, service=run.service)
    drop_intermediates(run_dir(app, run_id))
    return True


def drop_intermediates(directory: Path) -> None:
    """Delete a run's export, splits and parts: PHI that its outputs (or its end) make useless. A part still
    running fails its rename and finds the run ended when it tries again."""
    for intermediate in ("export", "split", "parts"):
        shutil.rmtree(directory / intermediate, ignore_errors=True)


def _export_request(service, group: str | None, since: str | None) -> ExportRequest:
    """What to export for ``service``: the types and filters its prefetch reads, for ``group`` (or everyone)."""
    types, filters = service.export_scope
    return ExportRequest(group=group, types=types, type_filters=filters, since=since)


def _batchable():
    return [s for s in services() if s.population is not None]


# ---- the stages ------------------------------------------------------------------------------------------------


def _active_run(ctx: JobContext) -> runs.Run | None:
    run = runs.get(ctx.engine, ctx.payload["run"])
    if run is None or run.ended:
        PARTS.labels(ctx.job.kind.split(".")[1], "skipped").inc()
        return None
    return run


def _failing(ctx: JobContext, run: runs.Run, exc: BaseException) -> None:
    """End the run as failed when this was the part's last attempt (or the failure is permanent)."""
    if isinstance(exc, PermanentFailure) or ctx.job.attempts >= ctx.job.max_attempts:
        why = f"{ctx.job.kind} failed: {exc if isinstance(exc, PermanentFailure) else describe(exc)}"
        counts = run_summary(ctx.app, run)["counts"]  # before its intermediates go: what it had done by then
        if runs.update(ctx.engine, run.id, state=runs.FAILED, error=why[:500], note=None, stamp="failed"):
            RUNS.labels(run.service, runs.FAILED).inc()
            audit(ctx.app).record("batch", action="failed", run=run.id, service=run.service, error=why[:200], **counts)
            _emit_completed(ctx.app, runs.get(ctx.engine, run.id))
            drop_intermediates(run_dir(ctx.app, run.id))


def _stage(fn):
    """Common to every stage: skip an ended run, fail the run on a part's last failure or a BATCH_DIR others may
    write in, count and time it."""

    def handler(ctx: JobContext) -> Any:
        run = _active_run(ctx)
        if run is None:
            return {"skipped": True}
        stage, started = ctx.job.kind.split(".")[1], time.monotonic()
        try:
            _private_run_dir(ctx.app, run.id)
            result = fn(ctx, run)
        except Snooze:
            PARTS.labels(stage, "waiting").inc()
            raise
        except Exception as exc:
            PARTS.labels(stage, "failed").inc()
            _failing(ctx, run, exc)
            raise
        PARTS.labels(stage, "done").inc()
        PART_SECONDS.labels(stage).observe(time.monotonic() - started)
        return result

    handler.__name__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return handler


def _private_run_dir(app: Flask, run_id: str) -> Path:
    """The run's directory, private, in a BATCH_DIR no one else may write in; PermanentFailure when it is not."""
    try:
        parts.private_root(Path(app.config["BATCH_DIR"]))
    except parts.UnsafeDirectory as exc:
        raise PermanentFailure(str(exc)) from None
    return private_folders(run_dir(app, run_id))


def run_sender(app: Flask, run: runs.Run):
    """How the run calls its FHIR server as ourselves; PermanentFailure when its client may no longer."""
    trusted = trusted_clients(app).get(run.client_iss)
    if trusted is None:
        raise PermanentFailure("the run's client is no longer in CDS_CLIENTS_FILE")
    if not trusted.allows_fhir_server(run.fhir_server):
        raise PermanentFailure("the run's FHIR server is no longer on its client's allowlist")
    send = smart.fhir_sender(app, trusted)
    if send is None:
        raise PermanentFailure("no SMART Backend Services credentials (smart_backend) for the run's client")
    return send


def _bulk_client(app: Flask, run: runs.Run) -> BulkDataClient:
    return BulkDataClient(run.fhir_server, run_sender(app, run), timeout=float(app.config["FHIR_TIMEOUT_S"]))


@job_handler(EXPORT, retry=PART_RETRY, priority=PRIORITY)
@_stage
def export_stage(ctx: JobContext, run: runs.Run) -> dict[str, Any]:
    """Kick off (once), poll as told, download every file, delete the export, and plan the parts."""
    with _bulk_client(ctx.app, run) as client:
        return _export(ctx, run, client)


def _export(ctx: JobContext, run: runs.Run, client: BulkDataClient) -> dict[str, Any]:
    app, engine = ctx.app, ctx.engine
    if run.manifest is None:
        _await_export(ctx, run, client)  # raises Snooze until the export is complete
        run = runs.get(engine, run.id)
    manifest = Manifest.from_json(run.manifest)
    directory = run_dir(app, run.id)
    private_folders(directory / "export")
    files = []
    for number, output in enumerate(manifest.output):
        relative = f"export/{number:03d}-{output.type}.ndjson"
        if not (directory / relative).is_file():
            try:
                client.download(
                    output.url,
                    directory / relative,
                    requires_access_token=manifest.requires_access_token,
                    expected_type=output.type,
                )
            except FileExpired:
                _export_again(ctx, run, directory)
        files.append(relative)
    errors = client.errors(manifest, directory / "export" / "errors") if manifest.error else []
    if run.status_url:
        client.delete(run.status_url)  # the files are safe on our disk: the server may forget them
    part_bytes = app.config["BATCH_PART_BYTES"]
    ranges = parts.plan_ranges(directory, files, part_bytes)
    total = sum((directory / f).stat().st_size for f in files)
    plan = {
        "ranges": [r.to_json() for r in ranges],
        "buckets": parts.bucket_count(total, part_bytes),
        "files": [{"file": f, "bytes": (directory / f).stat().st_size} for f in files],
        "exportErrors": [_short_issue(e) for e in errors][:100],
    }
    # The plan first, then its jobs: a split claimed at once must find it. A kill in between is redone by this
    # job's next run (the run is still active; downloads and DELETE are done, the plan is the same).
    runs.update(engine, run.id, when=(runs.EXPORTING,), state=runs.SPLITTING, plan=plan, note=None, stamp="exported")
    for index in range(len(ranges)):
        submit(app, SPLIT, job_id(run.id, "split", index), {"run": run.id, "range": index})
    if not ranges:
        _after_split(ctx, runs.get(engine, run.id))
    return {"files": len(files), "ranges": len(ranges), "buckets": plan["buckets"]}


def _short_issue(issue: Any) -> str:
    if isinstance(issue, dict):
        return str(issue.get("diagnostics") or issue.get("code") or "error")[:200]
    return str(issue)[:200]


def _await_export(ctx: JobContext, run: runs.Run, client: BulkDataClient) -> None:
    """Kick the export off when it has no status URL yet, else poll it; raise Snooze until it is complete."""
    engine = ctx.engine
    if (wall_time(app_clock(ctx.app)) - run.created_at).total_seconds() > ctx.app.config["BATCH_EXPORT_TIMEOUT_S"]:
        raise PermanentFailure("the export did not complete within BATCH_EXPORT_TIMEOUT_S")
    if run.status_url is None:
        request = _export_request(get_service(run.service), run.group_id, run.since)
        try:
            kicked = client.kick_off(request)
        except Busy as busy:
            raise Snooze(busy.retry_after if busy.retry_after is not None else 30.0, "export server busy") from None
        except ExportFailed as failed:
            if failed.permanent:
                raise PermanentFailure(f"export refused: {failed}") from None
            raise
        runs.update(
            engine,
            run.id,
            when=(runs.EXPORTING,),
            status_url=kicked.status_url,
            type_filtered=kicked.filtered,
            exports=run.exports + 1,
            note="export requested",
            stamp="exportRequested",
        )
        raise Snooze(1.0, "export requested")
    try:
        answer = client.poll(run.status_url)
    except ExportFailed as failed:
        if failed.permanent:
            raise PermanentFailure(f"export failed: {failed}") from None
        raise
    if not isinstance(answer, Complete):
        polls = int(ctx.job.payload.get("polls", 0)) if isinstance(ctx.job.payload, dict) else 0
        delay = client.next_poll_delay(answer, polls + 1)
        note = "export in progress" + (f": {answer.progress}" if answer.progress else "")
        runs.update(engine, run.id, when=(runs.EXPORTING,), note=note[:200])
        raise Snooze(delay, note[:200])
    manifest = answer.manifest
    runs.update(
        engine,
        run.id,
        when=(runs.EXPORTING,),
        manifest=manifest.to_json(),
        transaction_time=manifest.transaction_time,
        note="downloading the export",
        stamp="exportCompleted",
    )


def _export_again(ctx: JobContext, run: runs.Run, directory: Path) -> None:
    """The files expired before we had them all: forget this export and ask for a new one (a few times)."""
    if run.exports >= MAX_EXPORTS:
        raise PermanentFailure(f"the export's files expired before they could be fetched, {run.exports} times")
    shutil.rmtree(directory / "export", ignore_errors=True)
    runs.update(
        ctx.engine,
        run.id,
        when=(runs.EXPORTING,),
        status_url=None,
        manifest=None,
        note="files expired: exporting again",
    )
    raise Snooze(0.0, "files expired: exporting again")


def _plan(run: runs.Run) -> tuple[list[Range], int]:
    plan = run.plan or {}
    return [Range.from_json(r) for r in plan.get("ranges", ())], int(plan.get("buckets", 1))


@job_handler(SPLIT, retry=PART_RETRY, priority=PRIORITY)
@_stage
def split_stage(ctx: JobContext, run: runs.Run) -> dict[str, Any]:
    """Split one line range of the export into patient buckets; the last one to finish starts the scoring."""
    ranges, buckets = _plan(run)
    index = int(ctx.payload["range"])
    if index >= len(ranges):  # enqueued by a release that wrote its plan later: never with this order, but harmless
        raise Snooze(SPLIT_WAIT_S, "waiting for the plan")
    counts = parts.split_range(run_dir(ctx.app, run.id), index, ranges[index], buckets, run.fhir_server)
    _after_split(ctx, run)
    return counts.to_json() if counts else {"done before": True}


def _after_split(ctx: JobContext, run: runs.Run) -> None:
    ranges, buckets = _plan(run)
    if not parts.split_done(run_dir(ctx.app, run.id), len(ranges)):
        return
    runs.update(ctx.engine, run.id, when=(runs.SPLITTING,), state=runs.SCORING, stamp="split")
    for bucket in range(buckets):  # after the state, so the stamps are in order; again if a kill came between
        submit(ctx.app, SCORE, job_id(run.id, "score", bucket), {"run": run.id, "bucket": bucket})


def _as_of(run: runs.Run) -> tuple[str, date]:
    """The export's transaction time and its day: ages and 'old' values are as of the data, so that a run
    resumed tomorrow gives the same answers as one that ran through."""
    moment = run.transaction_time or run.times.get("created")
    try:
        parsed = datetime.fromisoformat(str(moment).replace("Z", "+00:00"))
    except ValueError:
        parsed = run.created_at
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return parsed.isoformat().replace("+00:00", "Z"), parsed.astimezone(UTC).date()


def identity(app: Flask, run_id: str) -> Identity:
    return Identity(app.config["PUBLIC_BASE_URL"].rstrip("/") + "/batch", run_id)


@job_handler(SCORE, retry=PART_RETRY, priority=PRIORITY)
@_stage
def score_stage(ctx: JobContext, run: runs.Run) -> dict[str, Any]:
    """Score one bucket with the service's own code (pausing while the model is unavailable), write it back when
    asked; the last bucket to finish starts the finish."""
    app, engine = ctx.app, ctx.engine
    ranges, buckets = _plan(run)
    directory = run_dir(app, run.id)
    if not parts.split_done(directory, len(ranges)):
        raise Snooze(SPLIT_WAIT_S, "waiting for the split")
    bucket = int(ctx.payload["bucket"])
    population = get_service(run.service).population
    occurrence, today = _as_of(run)
    try:
        with batch_lane():
            summary = parts.score_bucket(
                directory,
                bucket,
                population.score,
                population,
                identity(app, run.id),
                occurrence,
                today,
                run.fhir_server,
            )
    except ModelUnavailable as exc:
        note = f"paused: model unavailable ({exc.reason})"
        runs.update(engine, run.id, note=note)
        wait = BUSY_WAIT_S if exc.reason == "overloaded" else float(app.config["BREAKER_OPEN_SECONDS"])
        raise Snooze(wait, note) from None
    if summary is not None:
        PATIENTS.labels(run.service, "scored").inc(summary.scored)
        PATIENTS.labels(run.service, "not scored").inc(summary.not_scored)
    if summary is not None and summary.scored and run.note and run.note.startswith("paused"):
        runs.update(engine, run.id, note=None)  # the model answered: no longer paused
    written = write_back_bucket(ctx, run, directory, bucket, run_sender(app, run)) if run.write_back else None
    if parts.scored_done(directory, buckets) and (not run.write_back or _written_done(directory, buckets)):
        runs.update(engine, run.id, when=(runs.SCORING,), state=runs.FINISHING, stamp="scored")
        submit(app, FINISH, job_id(run.id, "finish"), {"run": run.id})
    return {"bucket": bucket, "patients": summary.patients if summary else None, "written": written}


def _written_done(directory: Path, buckets: int) -> bool:
    return all((directory / "parts" / f"b{b:06d}.written").is_file() for b in range(buckets))


@job_handler(FINISH, retry=PART_RETRY, priority=PRIORITY)
@_stage
def finish_stage(ctx: JobContext, run: runs.Run) -> dict[str, Any]:
    """Merge the outputs, write the report and manifest, end the run, tell the client, drop the intermediates."""
    app, engine = ctx.app, ctx.engine
    ranges, buckets = _plan(run)
    directory = run_dir(app, run.id)
    files = outputs.merge(directory, buckets, len(ranges))
    summary = run_summary(app, run, final=True, files=files)
    with parts.open_private(directory / outputs.REPORT) as handle:
        handle.write(render_report(summary).encode())
    manifest = {
        "run": run.id,
        "service": run.service,
        "parameters": run.parameters(),
        "transactionTime": run.transaction_time,
        "counts": summary["counts"],
        "files": files,
    }
    outputs.write_manifest(directory, manifest)
    if runs.update(engine, run.id, state=runs.SUCCEEDED, summary=summary, note=None, stamp="finished"):
        RUNS.labels(run.service, runs.SUCCEEDED).inc()
        counts = summary["counts"]
        audit(app).record("batch", action="succeeded", run=run.id, service=run.service, **counts)
        _emit_completed(app, runs.get(engine, run.id))
    drop_intermediates(directory)  # PHI kept no longer than needed: the outputs hold it all
    return summary["counts"]


def _emit_completed(app: Flask, run: runs.Run | None) -> None:
    if run is None:
        return
    data = {"run": run.id, "service": run.service, "state": run.state}
    if run.summary:
        data["counts"] = run.summary.get("counts")
    try:
        emit(app, COMPLETED_EVENT, f"batch:{run.id}:completed", data, client_iss=run.client_iss)
    except Exception as exc:  # the run is done whatever the notification's fate; the log says it was not sent
        log.error("batch %s: could not enqueue the %s event: %s", run.id, COMPLETED_EVENT, describe(exc))


# ---- what status, the report and the admin API show ------------------------------------------------------------


def _seconds_between(times: dict[str, str], first: str, last: str) -> float | None:
    try:
        return round((datetime.fromisoformat(times[last]) - datetime.fromisoformat(times[first])).total_seconds(), 3)
    except (KeyError, ValueError):
        return None


def run_summary(app: Flask, run: runs.Run, *, final: bool = False, files: list | None = None) -> dict[str, Any]:
    """Counts, durations and files of a run, in the shape ``app.batch.report`` documents (the report's input,
    ``status --json`` and the admin API): never patient data. An ended run's is the one it kept."""
    if run.summary and not final:
        return run.summary
    directory = run_dir(app, run.id)
    _, buckets = _plan(run)
    there = directory.is_dir()
    scored = parts.progress(directory) if there else parts.BucketSummary()
    splits = [_json(path) for path in directory.glob("split/*/counts.json")] if there else []
    written = sum(_json(path).get("sent", 0) for path in directory.glob("parts/b*.written")) if there else 0
    done = len(list(directory.glob("parts/b*/summary.json"))) if there else 0
    now = datetime.now(UTC).isoformat()
    times = dict(run.times)
    if final:
        times["finished"] = now
    service = get_service(run.service)
    population = service.population if service else None
    step, top = parts.HISTOGRAM_STEP, parts.HISTOGRAM_TOP
    return {
        "version": 1,
        "run": run.id,
        "service": {"id": run.service, "title": service.title if service else run.service},
        "state": runs.SUCCEEDED if final else run.state,
        "note": run.note,
        "error": run.error,
        "created": times.get("created"),
        "started": times.get("exportRequested"),
        "finished": times.get("finished") or times.get("failed") or times.get("cancelled"),
        "updated": now,
        "times": times,
        "parameters": run.parameters(),
        "transactionTime": run.transaction_time,
        "parts": {"done": done, "total": buckets if run.plan else None},
        "counts": {
            "patients": scored.patients,
            "scored": scored.scored,
            "notScored": scored.not_scored,
            "badLines": sum(split.get("bad", 0) for split in splits),
            "dropped": sum(split.get("dropped", 0) for split in splits),
            "worklist": scored.worklist,
            "writtenBack": written if run.write_back else None,
        },
        "byCategory": {c: scored.by_category.get(c, 0) for c in (population.categories if population else ())}
        | scored.by_category,
        "notScoredReasons": dict(sorted(scored.reasons.items(), key=lambda item: (-item[1], item[0]))),
        "reasonLabels": {r: (population.reasons.get(r, r) if population else r) for r in scored.reasons},
        "histogram": [
            {"low": round(i * step, 4), "high": round((i + 1) * step, 4), "count": n}
            for i, n in enumerate(scored.histogram[:-1])
        ]
        + [{"low": top, "high": None, "count": scored.histogram[-1]}],
        "durations": {
            "export": _seconds_between(times, "created", "exported"),
            "split": _seconds_between(times, "exported", "split"),
            "score": _seconds_between(times, "split", "scored"),
            "total": _seconds_between(times, "created", "finished"),
        },
        "errors": (run.plan or {}).get("exportErrors", []),
        "files": files or [],
    }


def _json(path: Path) -> dict[str, Any]:
    try:
        return orjson.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
