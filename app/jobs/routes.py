"""Job status for the client that asked for the work, and the dead letter queue for operators."""

from __future__ import annotations

import re

from flask import Blueprint, abort, current_app, request

from app.audit import audit
from app.cds.errors import CdsError
from app.cds.responses import add_cors_headers, cds_error, unrouted_error
from app.http import (
    admin_blueprint,
    answer_unrouted,
    http_error_outcome,
    json_response,
    operation_outcome,
    operation_outcome_errors,
)
from app.jobs import ledger
from app.jobs.registry import job_kind
from app.jobs.views import job_summary

bp = Blueprint("jobs", __name__)
# The job status is read by the CDS clients, authenticated as their hook calls are: the same errors and CORS.
operation_outcome_errors(bp)
bp.register_error_handler(CdsError, cds_error)
bp.after_request(add_cors_headers)

# What a job id or kind can be: no control characters (PostgreSQL cannot even compare a NUL), bounded.
_NAME = re.compile(r"[^\x00-\x1f\x7f-\x9f]{1,200}")


def _engine():
    return current_app.extensions["db"]


def _get(job_id: str) -> ledger.Job | None:
    """The job, or None, also for an id no job can have (without asking the database)."""
    return ledger.get(_engine(), job_id) if _NAME.fullmatch(job_id) else None


@bp.get("/jobs/<job_id>")
def job_status(job_id: str):
    """Status and, once done, the result, for the trusted client whose hook call created the job (client JWT,
    as for CDS Hooks calls). Jobs of other clients, and internal jobs, are 404: their existence is not told."""
    principal = current_app.extensions["cds"].authenticate(request.headers.get("Authorization"), request.path)
    job = _get(job_id)
    declared = job_kind(job.kind) if job else None
    caller = principal.iss if principal else None
    owner = job.payload.get("client_iss") if job and isinstance(job.payload, dict) else None
    if job is None or declared is None or not declared.client_visible or (principal and owner != caller):
        abort(404, description=f"No job with id {job_id!r}")
    audit(current_app).record("job.read", iss=caller, job=job.id, kind=job.kind, status=job.state)
    return json_response(job_summary(job))


admin = admin_blueprint("jobs_admin", __name__, "/admin/jobs")


@admin.get("")
def stats():
    engine = _engine()
    return json_response({"jobs": ledger.counts(engine), "oldestQueuedSeconds": ledger.oldest_queued_age(engine)})


@admin.get("/dead")
def dead_letters():
    """The dead letter queue, most recent first (``kind``, ``limit`` up to 1000)."""
    limit, kind = request.args.get("limit", "100"), request.args.get("kind")
    if not re.fullmatch(r"[0-9]{1,4}", limit) or not 1 <= int(limit) <= 1000:
        return operation_outcome(400, "invalid", "limit must be a whole number from 1 to 1000", "limit")
    if kind is not None and not _NAME.fullmatch(kind):
        return operation_outcome(400, "invalid", "kind must be a job kind (no control characters)", "kind")
    dead = ledger.find(_engine(), ledger.DEAD, kind=kind, limit=int(limit))
    return json_response({"jobs": [job_summary(job) for job in dead]})


@admin.get("/<job_id>")
def show(job_id: str):
    job = _get(job_id)
    if job is None:
        abort(404, description=f"No job with id {job_id!r}")
    return json_response(job_summary(job, full=True))


@admin.post("/<job_id>/requeue")
def requeue(job_id: str):
    """Send a dead job back to the queue (attempts reset); 409 when it is not dead."""
    job = _get(job_id)
    if job is None:
        abort(404, description=f"No job with id {job_id!r}")
    if not ledger.requeue(_engine(), job_id):
        abort(409, description=f"Job {job_id!r} is {job.state}, not dead: only dead jobs are requeued")
    return json_response(job_summary(ledger.get(_engine(), job_id)))


def init_app(app) -> None:
    """Register the job status endpoint and the admin API, with their answers to paths that match no route."""
    app.register_blueprint(bp)
    app.register_blueprint(admin)
    answer_unrouted(app, "/jobs", unrouted_error)
    answer_unrouted(app, admin.url_prefix, http_error_outcome)
