"""The explanation page of a service whose result is a job: its status in words and, once done, its draft.

A service declares ``explanation=job_explanation(label=..., title=...)`` and explains its card with
``call.explain({"job_id": ...})``; the page reads the job from the ledger each time it is opened, so a reload shows
the draft once it is ready. The job's result may carry ``summary`` (the draft text), ``documentReference``,
``docStatus`` and ``model`` (``name``, ``version``).
"""

from __future__ import annotations

from typing import Any

from flask import current_app

from app.cds.service import Explanation
from app.jobs import ledger
from app.results import StoredResult
from app.smart.pages import LaunchContext, when

TEMPLATE = "smart/result_job.html"
JOB_STATUS_WORDS = {
    ledger.QUEUED: "Waiting to start",
    ledger.RUNNING: "Being drafted now",
    ledger.SUCCEEDED: "Done: the draft is ready",
    ledger.DEAD: "Failed: the draft could not be made",
    ledger.EXPIRED: "Expired: the draft was not made in time and would no longer be clinically current",
}


def job_explanation(*, label: str, title: str) -> Explanation:
    """An explanation page showing the job named by the stored result's ``job_id``."""
    return Explanation(label=label, title=title, template=TEMPLATE, view=job_view)


def job_view(result: StoredResult, context: LaunchContext) -> dict[str, Any]:
    """The template's ``job``: the stored result's job as the ledger has it now (``found`` False when gone, or when
    the job is not for the result's patient on the result's FHIR server: a page never shows another patient's)."""
    job_id = result.data.get("job_id") if isinstance(result.data, dict) else None
    job = ledger.get(current_app.extensions["db"], job_id) if isinstance(job_id, str) else None
    if job is not None and not job_belongs(job, result.patient_id, result.fhir_server):
        job = None
    return {"job": job_status(job)}


def job_belongs(job: ledger.Job, patient_id: str | None, fhir_server: str | None) -> bool:
    """Whether a job's payload names this patient on this FHIR server: a job naming no patient belongs to none."""
    payload = job.payload if isinstance(job.payload, dict) else {}
    return (
        patient_id is not None
        and payload.get("patient_id") == patient_id
        and _server(payload.get("fhir_server")) == _server(fhir_server)
    )


def _server(url: Any) -> str | None:
    return url.rstrip("/") if isinstance(url, str) else None


def job_status(job: ledger.Job | None) -> dict[str, Any]:
    """A job's status, attempts, times and draft, in the words the page shows."""
    if job is None:
        return {"found": False}
    outcome = job.result if isinstance(job.result, dict) else {}
    model = outcome.get("model") if isinstance(outcome.get("model"), dict) else {}
    status = JOB_STATUS_WORDS.get(job.state, job.state)
    if job.state == ledger.QUEUED and job.attempts:
        status = f"Waiting to try again (attempt {job.attempts} of {job.max_attempts} did not succeed)"
    return {
        "found": True,
        "state": job.state,
        "status": status,
        "succeeded": job.state == ledger.SUCCEEDED,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "created": when(job.created_at),
        "updated": when(job.updated_at),
        "expires": when(job.expires_at) if job.expires_at else "",
        "summary": outcome.get("summary") if isinstance(outcome.get("summary"), str) else "",
        "document": outcome.get("documentReference") or "",
        "doc_status": outcome.get("docStatus") or "preliminary",
        "model_name": model.get("name") or "",
        "model_version": model.get("version") or "",
    }
