"""The canary job: does nothing but say which worker ran it, so operators (and benchmarks) can check that
workers are claiming and completing jobs end to end."""

from __future__ import annotations

from app.jobs.registry import JobContext, job_handler
from app.jobs.retry import RetryPolicy

CANARY = "jobs.canary"


@job_handler(CANARY, retry=RetryPolicy(max_attempts=3))
def canary(ctx: JobContext) -> dict[str, str]:
    return {"worker": ctx.job.lease_owner or ""}
