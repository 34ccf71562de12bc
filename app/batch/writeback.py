"""Write-back of a scored bucket: its RiskAssessments to the EHR, in transaction Bundles of conditional creates.

Each entry is created only if no RiskAssessment carries its identifier (run and patient) yet, so a bucket written
again after a kill, or a retried Bundle whose answer was lost, never makes a second resource. A marker file beside
the bucket says its write-back is complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from app.batch import runs
from app.batch.parts import write_atomically
from app.fhir.client import Client, FhirError, Sender
from app.jobs.registry import JobContext

BUNDLE_ENTRIES = 50
# Servers cap transactions (Medplum: 8 entries with conditional creates); a refused Bundle is halved and sent
# again, and the size that worked is used for the rest of the process's work on that server.
_LEARNED: dict[str, int] = {}
_REFUSALS = (400, 413, 422)


def transaction(assessments: list[dict[str, Any]]) -> dict[str, Any]:
    """A transaction Bundle creating each RiskAssessment unless one with its identifier exists."""
    entries = []
    for resource in assessments:
        identifier = resource["identifier"][0]
        token = quote(f"{identifier['system']}|{identifier['value']}", safe="")
        entries.append(
            {
                "resource": resource,
                "request": {"method": "POST", "url": "RiskAssessment", "ifNoneExist": f"identifier={token}"},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def create_all(client: Client, assessments: list[dict[str, Any]]) -> None:
    """Create ``assessments`` in transactions as large as the server takes (halving a refused one)."""
    size = _LEARNED.get(client.base, BUNDLE_ENTRIES)
    for start in range(0, len(assessments), size):
        _send(client, assessments[start : start + size])


def _send(client: Client, assessments: list[dict[str, Any]]) -> None:
    try:
        client.transaction(transaction(assessments))
    except FhirError as exc:
        if exc.status not in _REFUSALS or len(assessments) == 1:
            raise
        half = (len(assessments) + 1) // 2
        _LEARNED[client.base] = min(_LEARNED.get(client.base, BUNDLE_ENTRIES), half)
        _send(client, assessments[:half])
        _send(client, assessments[half:])


def write_back_bucket(ctx: JobContext, run: runs.Run, directory: Path, bucket: int, send: Sender) -> int:
    """Write the bucket's RiskAssessments to the EHR unless done before; how many were sent."""
    marker = directory / "parts" / f"b{bucket:06d}.written"
    if marker.is_file():
        return 0
    source = directory / "parts" / f"b{bucket:06d}" / "RiskAssessment.ndjson"
    observe = ctx.fhir_auditor(iss=run.client_iss, service=run.service, run=run.id)
    session, timeout = ctx.app.extensions["cds"].session, float(ctx.app.config["FHIR_TIMEOUT_S"]) * 4
    client = Client(run.fhir_server, None, session, timeout, send=send, observe=observe)
    with open(source, "rb") as handle:
        assessments = [orjson.loads(line) for line in handle]
    create_all(client, assessments)
    sent = len(assessments)
    write_atomically(marker, orjson.dumps({"sent": sent}))
    return sent
