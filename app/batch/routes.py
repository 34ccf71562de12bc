"""The batch admin API (behind ADMIN_TOKEN): start a run, see it, read its report, cancel it."""

from __future__ import annotations

import re
from typing import Any

import orjson
from flask import Response, abort, current_app, request

from app.batch import runs, tasks
from app.batch.report import content_security_policy, render_report
from app.http import admin_blueprint, answer_unrouted, http_error_outcome, json_response, operation_outcome

admin = admin_blueprint("batch_admin", __name__, "/admin/batch")
_RUN_ID = re.compile(r"run-[0-9a-f]{16}")
_FIELDS = {"service": str, "client": str, "fhirServer": str, "group": str, "since": str, "writeBack": bool}


def run_view(app, run: runs.Run) -> dict[str, Any]:
    """A run as the admin API and ``gateway batch status --json`` show it: state, progress, counts; no PHI."""
    summary = tasks.run_summary(app, run)
    return {
        "id": run.id,
        "state": run.state,
        "note": run.note,
        "error": run.error,
        "parameters": run.parameters(),
        "exports": run.exports,
        "transactionTime": run.transaction_time,
        "created": run.created_at.isoformat(),
        "finished": run.finished_at.isoformat() if run.finished_at else None,
        "times": run.times,
        "files": len((run.plan or {}).get("files", [])) if run.plan else None,
        "parts": summary.get("parts"),
        "counts": summary.get("counts"),
        "byCategory": summary.get("byCategory"),
        "outputs": summary.get("files") or [],
        "report": f"/admin/batch/{run.id}/report",
    }


def _run_or_404(run_id: str) -> runs.Run:
    run = runs.get(current_app.extensions["db"], run_id) if _RUN_ID.fullmatch(run_id) else None
    if run is None:
        abort(404, description=f"No batch run with id {run_id!r}")
    return run


@admin.post("")
def start():
    """Start a run: JSON ``{"service", "client", "fhirServer", "group"?, "since"?, "writeBack"?}``; 202."""
    try:
        body = orjson.loads(request.get_data(cache=False))
    except orjson.JSONDecodeError:
        return operation_outcome(400, "invalid", "The body must be a JSON object", "body")
    if not isinstance(body, dict):
        return operation_outcome(400, "invalid", "The body must be a JSON object", "body")
    for name, value in body.items():
        if name not in _FIELDS:
            return operation_outcome(400, "invalid", f"Unknown field {name!r}", name)
        if value is not None and not isinstance(value, _FIELDS[name]):
            return operation_outcome(400, "invalid", f"{name} must be a {_FIELDS[name].__name__}", name)
    for name in ("service", "client", "fhirServer"):
        if not body.get(name):
            return operation_outcome(400, "required", f"{name} is required", name)
    try:
        run = tasks.start(
            current_app,
            service_id=body["service"],
            client_iss=body["client"],
            fhir_server=body["fhirServer"],
            group=body.get("group"),
            since=body.get("since"),
            write_back=bool(body.get("writeBack")),
        )
    except tasks.BatchError as exc:
        return operation_outcome(422, "invalid", str(exc))
    response = json_response(run_view(current_app, run), 202)
    response.headers["Location"] = f"/admin/batch/{run.id}"
    return response


@admin.get("")
def recent():
    """The newest runs first (``limit`` up to 500)."""
    limit = request.args.get("limit", "50")
    if not re.fullmatch(r"[0-9]{1,3}", limit) or not 1 <= int(limit) <= 500:
        return operation_outcome(400, "invalid", "limit must be a whole number from 1 to 500", "limit")
    engine = current_app.extensions["db"]
    return json_response({"runs": [run_view(current_app, run) for run in runs.recent(engine, int(limit))]})


@admin.get("/<run_id>")
def show(run_id: str):
    return json_response(run_view(current_app, _run_or_404(run_id)))


@admin.get("/<run_id>/report")
def report(run_id: str):
    """The run's report: the file it wrote when finished, else one made now from its progress."""
    run = _run_or_404(run_id)
    path = tasks.run_dir(current_app, run.id) / "report.html"
    html = path.read_text(encoding="utf-8") if path.is_file() else render_report(tasks.run_summary(current_app, run))
    response = Response(html, content_type="text/html; charset=utf-8")
    response.headers["Content-Security-Policy"] = content_security_policy(html)
    return response


@admin.post("/<run_id>/cancel")
def cancel(run_id: str):
    """Cancel a run that has not ended; 409 when it has."""
    run = _run_or_404(run_id)
    if not tasks.cancel(current_app, run.id):
        abort(409, description=f"Batch run {run_id!r} is {run.state}: only a run that has not ended can be cancelled")
    return json_response(run_view(current_app, runs.get(current_app.extensions["db"], run.id)))


def init_app(app) -> None:
    app.register_blueprint(admin)
    answer_unrouted(app, admin.url_prefix, http_error_outcome)
