"""How a job is shown to its client, to operators (CLI and admin API): the same JSON everywhere."""

from __future__ import annotations

from typing import Any

from app.jobs import ledger


def _time(value) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def job_summary(job: ledger.Job, *, full: bool = False) -> dict[str, Any]:
    """Status, attempts and times; the result once succeeded; the last error (type and place, never PHI).
    ``full`` adds the payload and lease, for operators only."""
    summary: dict[str, Any] = {
        "id": job.id,
        "kind": job.kind,
        "status": job.state,
        "attempts": job.attempts,
        "maxAttempts": job.max_attempts,
        "createdAt": _time(job.created_at),
        "updatedAt": _time(job.updated_at),
        "expiresAt": _time(job.expires_at),
    }
    if job.state == ledger.QUEUED and job.attempts:
        summary["nextAttemptAt"] = _time(job.run_after)
    if job.last_error and job.state != ledger.SUCCEEDED:
        summary["lastError"] = job.last_error
    if job.state == ledger.SUCCEEDED:
        summary["result"] = job.result
    if full:
        summary |= {
            "payload": job.payload,
            "leaseOwner": job.lease_owner,
            "leaseExpiresAt": _time(job.lease_expires_at),
        }
    return summary
