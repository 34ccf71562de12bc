"""discharge-summary (encounter-discharge): an AI draft of the discharge summary, prepared off the hook's budget.

The hook answers at once with an info card and enqueues one job per (service, model version, FHIR server,
patient, encounter), so repeated hook calls for the same discharge make one job, and a call naming another patient
never shares it. The worker gathers the encounter's conditions, procedures, medications and results with our own
SMART Backend Services credentials (the hook's token is for that call only), drafts the summary, writes a
preliminary DocumentReference with a conditional create keyed on the job id (a re-run finds the first document),
and emits ``discharge-summary.ready``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from flask import Flask, current_app

from app import ai, smart, webhooks
from app.ai import InvalidModelInput, Prediction
from app.ai.guard import Guard, deadline
from app.ai.local import LocalBackend
from app.ai.models.discharge_summary import DischargeSummary, extract_inputs
from app.ai.openai_compat import ChatCompletionsBackend
from app.cds.cards import Card, Source
from app.cds.clients import TrustedClient
from app.cds.service import ServiceCall, Setting, cds_service
from app.fhir.client import Client, FhirError, FhirNotFound, UnusablePaging
from app.fhir.compartment import Compartment, bundle_aliases
from app.jobs import ledger
from app.jobs.registry import JobContext, JobExpired, PermanentFailure, job_handler, submit
from app.jobs.retry import ExponentialBackoff, RetryPolicy
from app.smart.job_page import job_belongs, job_explanation

log = logging.getLogger(__name__)

SERVICE_ID = "discharge-summary"
SUMMARY_MODEL = "discharge-summary"
SETTINGS = {
    # A draft not made within this long after the discharge is not made (or delivered) at all.
    "DISCHARGE_SUMMARY_TTL_S": Setting(int, 86400, 60, 2_592_000),
    # An OpenAI-compatible endpoint that drafts instead of the embedded deterministic summariser.
    "LLM_URL": Setting("url"),
    "LLM_MODEL": Setting(str, "gpt-4o-mini"),
    "LLM_API_KEY": Setting(str, secret=True),
    "LLM_TIMEOUT_S": Setting(int, 60, 1, 600),
}
JOB_KIND = "discharge-summary.draft"
# The audit event with how many gathered resources were left out as another patient's or encounter's (counts only).
SCREENED_EVENT = "job.fhir-screened"
# Begins every dead-letter reason about the encounter itself, so that the card can say what went wrong.
ENCOUNTER_UNREADABLE = "the encounter could not be read"
READY_EVENT = "discharge-summary.ready"
LOINC_DISCHARGE_SUMMARY = {"system": "http://loinc.org", "code": "18842-5", "display": "Discharge summary"}
# HL7 security label "AI asserted": tells every reader of the chart that software wrote this document.
AI_ASSERTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
GATHERED = {
    "conditions": "Condition",
    "procedures": "Procedure",
    "medications": "MedicationRequest",
    "results": "Observation",
}
MAX_PAGES = 20
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


def summary_guard(app: Flask) -> Guard:
    """The guard in front of the summariser (``LLM_URL`` when set, else the embedded deterministic one): a
    generative endpoint is slow by nature, so its deadline and slow-call threshold come from LLM_TIMEOUT_S."""
    config = app.config
    timeout = float(config["LLM_TIMEOUT_S"])
    if config["LLM_URL"]:
        backend = ChatCompletionsBackend(config["LLM_URL"], config["LLM_MODEL"], api_key=config["LLM_API_KEY"])
        return ai.make_guard(app, backend, endpoint=f"llm:{config['LLM_URL']}", timeout=timeout)
    # Not among the embedded models that `models serve` offers over KServe v2: a nested record and a sectioned
    # text do not fit its flat tensors.
    return ai.make_guard(app, LocalBackend([DischargeSummary()]), endpoint="summary:in-process", timeout=timeout)


def summarise(inputs: dict[str, Any]) -> Prediction:
    """Draft a discharge summary from extracted encounter facts through ``ai.infer``, within ``LLM_TIMEOUT_S``."""
    with deadline(time.monotonic() + current_app.config["LLM_TIMEOUT_S"]):
        return ai.infer(SUMMARY_MODEL, inputs)


def summary_model_version(app: Flask) -> str:
    """Which summariser drafts now, as ``name@version``: part of a summary job's idempotency key, so a new
    model makes a new draft rather than reusing the old one."""
    if app.config["LLM_URL"]:
        return f"llm:{app.config['LLM_MODEL']}"
    backend = ai.model_guard(app, SUMMARY_MODEL).backend
    return f"{SUMMARY_MODEL}@{backend.model(SUMMARY_MODEL).version}"


def job_id_for(model_version: str, fhir_server: str, patient_id: str, encounter_id: str) -> str:
    """The idempotency key: opaque (no PHI in URLs, webhooks or logs), the same for the same discharge of the same
    patient. The patient is in it so that a hook naming another patient for the encounter never reaches this job
    (jobs keyed before the patient was part of the key are not found by hook calls; their links still open)."""
    key = "\x1f".join((SERVICE_ID, model_version, fhir_server.rstrip("/"), patient_id, encounter_id))
    return "ds-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def _calling_client(call: ServiceCall, fhir_server: str) -> TrustedClient | None:
    """The caller; with CDS_AUTH off, the first configured client that may use this FHIR server."""
    if call.client is not None:
        return call.client
    return next((c for c in current_app.extensions["cds"].clients if c.allows_fhir_server(fhir_server)), None)


def _source() -> Source:
    return Source(label=f"Clinical AI gateway: discharge summary draft ({summary_model_version(current_app)})")


def _cannot_draft(why: str) -> list[Card]:
    return [
        Card(
            summary="No AI draft discharge summary for this encounter",
            indicator="info",
            detail=f"{why} Write the discharge summary as usual.",
            source=_source(),
        )
    ]


def _can_write_back(client: TrustedClient) -> bool:
    return client.smart_backend is not None or current_app.config["FHIR_ALLOW_ANONYMOUS"]


STATUS_CARDS = {
    ledger.QUEUED: ("A draft discharge summary is being prepared", "info"),
    ledger.RUNNING: ("A draft discharge summary is being prepared", "info"),
    ledger.SUCCEEDED: ("A draft discharge summary is ready for your review", "info"),
    ledger.DEAD: ("The draft discharge summary could not be prepared", "warning"),
    ledger.EXPIRED: ("The draft discharge summary was not prepared in time", "warning"),
}


def _status_card(call: ServiceCall, job: ledger.Job) -> Card:
    summary, indicator = STATUS_CARDS[job.state]
    if job.state == ledger.DEAD and ENCOUNTER_UNREADABLE in (job.last_error or ""):
        detail = "The encounter could not be read for this patient from the FHIR server. Write the summary as usual."
    elif job.state in (ledger.DEAD, ledger.EXPIRED):
        detail = "Write the discharge summary as usual. The failure is in the gateway's dead letter queue for review."
    else:
        detail = (
            "The AI draft is saved to the chart as a **preliminary** discharge summary (LOINC 18842-5) for you to "
            "review, correct and sign. It is built only from this encounter's recorded conditions, procedures, "
            "medications and results; nothing in it is final until a clinician signs it."
        )
    link = call.explain({"job_id": job.id})
    return Card(summary=summary, indicator=indicator, detail=detail, source=_source(), links=[link] if link else [])


@cds_service(
    id=SERVICE_ID,
    hook="encounter-discharge",
    title="Discharge summary draft",
    description="Prepares an AI draft of the discharge summary from the encounter's record, for clinician review.",
    explanation=job_explanation(label="Draft status and content", title="Discharge summary draft"),
    settings=SETTINGS,
    models={SUMMARY_MODEL: summary_guard},
)
def discharge_summary(call: ServiceCall) -> list[Card]:
    request = call.request
    fhir_server = request.fhir_server
    if not fhir_server:
        return _cannot_draft("The EHR sent no FHIR server with this hook, so the record cannot be read.")
    client = _calling_client(call, fhir_server)
    if client is None or not client.allows_fhir_server(fhir_server):
        return _cannot_draft("This EHR's FHIR server is not configured for the gateway.")
    if not all(FHIR_ID.match(request.context[key]) for key in ("patientId", "encounterId")):
        return _cannot_draft("The encounter or patient id sent with this hook is not a FHIR id.")
    if not _can_write_back(client):
        return _cannot_draft("Write-back to this EHR is not configured (no SMART Backend Services credentials).")
    app = current_app._get_current_object()
    job_id = job_id_for(summary_model_version(app), fhir_server, request.patient_id, request.encounter_id)
    submit(
        app,
        JOB_KIND,
        job_id,
        {
            "client_iss": client.iss,
            "fhir_server": fhir_server,
            "patient_id": request.context["patientId"],
            "encounter_id": request.context["encounterId"],
            "user_id": request.context["userId"],
            "hook_instance": request.hook_instance,
        },
        expires_in=app.config["DISCHARGE_SUMMARY_TTL_S"],
    )
    job = ledger.get(app.extensions["db"], job_id)
    if job is None or not job_belongs(job, request.patient_id, fhir_server):
        return _cannot_draft("The gateway holds no draft job for this patient's encounter.")
    return [_status_card(call, job)]


# ---------------------------------------------------------------------------------------------------------------
# The job


def _fhir_client(ctx: JobContext) -> Client:
    """A FHIR client with our own credentials for the job's server, or PermanentFailure saying what is missing.
    Every request it makes is in the audit log (``job.fhir-read``, ``job.fhir-write``), with the job and the
    who and what of the hook call that asked for it."""
    app, payload = ctx.app, ctx.payload
    trusted = app.extensions["cds"].clients.get(payload["client_iss"])
    server = payload["fhir_server"]
    if trusted is None:
        raise PermanentFailure("the trusted client that asked for this job is no longer configured")
    if not trusted.allows_fhir_server(server):
        raise PermanentFailure("the job's FHIR server is not on its client's allowlist")
    session, timeout = app.extensions["cds"].session, app.config["FHIR_TIMEOUT_S"]
    observe = ctx.fhir_auditor(**_who(payload))
    send = smart.fhir_sender(app, trusted)
    if send is None:
        raise PermanentFailure("no SMART Backend Services credentials (smart_backend) for this client")
    return Client(server, None, session, timeout, send=send, observe=observe)


def _who(payload: dict[str, Any]) -> dict[str, Any]:
    """Who asked for the job and for whom, as hook audit records say it: the tags of the job's audit records."""
    return {
        "iss": payload["client_iss"],
        "user": payload.get("user_id"),
        "service": SERVICE_ID,
        "hookInstance": payload.get("hook_instance"),
        "patient": f"Patient/{payload['patient_id']}",
    }


def gather(
    fhir: Client,
    patient_id: str,
    encounter_id: str,
    on_screened: Callable[[dict[str, int]], None] = lambda dropped: None,
) -> tuple[dict, dict]:
    """The encounter and what was recorded in it: conditions, procedures, medications, results, the patient.

    Only the context patient's records of this encounter are kept (``app.fhir.compartment``): a server that answers
    ``encounter=`` with another patient's resource does not put it in the draft. ``on_screened`` gets how many were
    left out per gathered key (counts only, for the audit record).
    """
    try:
        encounter = fhir.get(f"Encounter/{encounter_id}")
    except FhirNotFound:
        raise PermanentFailure(f"{ENCOUNTER_UNREADABLE}: it does not exist on the FHIR server") from None
    patient = Compartment(patient_id, fhir.base)
    # An encounter naming no patient (no subject) is not known to be the context's: it is not drafted either.
    if encounter.get("id") != encounter_id or not patient.holds(encounter):
        raise PermanentFailure(f"{ENCOUNTER_UNREADABLE}: on the FHIR server it is not the context patient's")
    resources: dict[str, list[dict]] = {}
    try:
        resources["patient"] = [r for r in [fhir.get(f"Patient/{patient_id}")] if patient.holds(r)]
    except FhirNotFound:
        resources["patient"] = []
    query = urlencode({"encounter": f"Encounter/{encounter_id}", "_count": 200})
    dropped: dict[str, int] = {}
    for key, resource_type in GATHERED.items():
        # Paging links are followed only on this server: our token for it must not travel anywhere else.
        bundle = fhir.search_all(f"{resource_type}?{query}", max_pages=MAX_PAGES, allow_url=fhir.holds)
        in_encounter = Compartment(patient_id, fhir.base, bundle_aliases([bundle])).of_encounter(encounter_id)
        found = [
            e["resource"]
            for e in bundle.get("entry") or ()
            if isinstance(e, dict)
            and isinstance(e.get("resource"), dict)
            and e["resource"].get("resourceType") == resource_type
        ]
        # Our own read of the server: the base its fullUrls print is not checked (compartment.as_read_from).
        resources[key] = [r for r in found if in_encounter.holds(r)]
        if len(found) > len(resources[key]):
            dropped[key] = len(found) - len(resources[key])
    if dropped:
        log.warning(
            "discharge summary: %d resources of another patient or encounter were left out", sum(dropped.values())
        )
    on_screened(dropped)
    return encounter, resources


def identifier_system(app: Flask) -> str:
    return f"{app.config['PUBLIC_BASE_URL']}/jobs"


def document_reference(app: Flask, job: ledger.Job, encounter: dict, text: str, model_version: str) -> dict:
    """The draft as a preliminary DocumentReference carrying the job id, marked as written by AI."""
    payload = job.payload
    period = encounter.get("period") if isinstance(encounter.get("period"), dict) else None
    return {
        "resourceType": "DocumentReference",
        "meta": {"security": [AI_ASSERTED]},
        "identifier": [{"system": identifier_system(app), "value": job.id}],
        "status": "current",
        "docStatus": "preliminary",
        "type": {"coding": [LOINC_DISCHARGE_SUMMARY], "text": "Discharge summary (AI draft)"},
        "category": [
            {
                "coding": [
                    {
                        "system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
                        "code": "clinical-note",
                        "display": "Clinical Note",
                    }
                ]
            }
        ],
        "subject": {"reference": f"Patient/{payload['patient_id']}"},
        "date": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "description": f"AI-generated draft discharge summary for clinician review ({model_version})",
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "language": "en",
                    "data": base64.b64encode(text.encode()).decode(),
                    "title": "Discharge summary (AI draft)",
                }
            }
        ],
        "context": {
            "encounter": [{"reference": f"Encounter/{payload['encounter_id']}"}],
            **({"period": period} if period else {}),
        },
    }


@job_handler(
    JOB_KIND,
    retry=RetryPolicy(
        max_attempts=5,
        max_attempts_setting="JOB_MAX_ATTEMPTS",  # operators' override, when set
        backoff=ExponentialBackoff(base=2, cap=300, jitter="full"),
    ),
    client_visible=True,
)
def draft_discharge_summary(ctx: JobContext) -> dict[str, Any]:
    """Gather, draft, write back (conditional create), then tell subscribers; safe to run twice."""
    app = ctx.app
    fhir = _fhir_client(ctx)
    try:
        return _draft(app, ctx, fhir)
    except UnusablePaging as exc:
        raise PermanentFailure(f"{ENCOUNTER_UNREADABLE}: {exc}") from None
    except FhirError as exc:
        if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (408, 429):
            # Refused (401/403 after a fresh token, 412 several matches, 422 invalid): retrying cannot help.
            raise PermanentFailure(f"the FHIR server refused: HTTP {exc.status}") from None
        raise


def _stale(job: ledger.Job) -> bool:
    return job.expires_at is not None and job.expires_at <= datetime.now(UTC)


def _draft(app: Flask, ctx: JobContext, fhir: Client) -> dict[str, Any]:
    job, payload = ctx.job, ctx.payload
    encounter, resources = gather(
        fhir,
        payload["patient_id"],
        payload["encounter_id"],
        # counts only: which resources were left out, and what they held, never reaches the audit trail
        lambda dropped: ctx.audit(
            SCREENED_EVENT, **_who(payload), dropped=sum(dropped.values()), dropped_by_key=dropped or None
        ),
    )
    try:
        prediction = summarise(extract_inputs(encounter, resources))
    except InvalidModelInput as exc:
        raise PermanentFailure(f"the summariser rejected the encounter's data ({type(exc).__name__})") from None
    ctx.heartbeat()
    if _stale(job):  # the draft came too late to be useful: write and announce nothing
        raise JobExpired("the draft was ready only after the job's clinical expiry")
    version = f"{prediction.model}@{prediction.version}"
    text = prediction.outputs["text"]
    document, created = fhir.create(
        document_reference(app, job, encounter, text, version),
        if_none_exist=urlencode({"identifier": f"{identifier_system(app)}|{job.id}"}),
    )
    reference = f"DocumentReference/{document['id']}"
    stored_text = _attachment_text(document) or text  # a re-run keeps the first draft, not a second one
    url = f"{app.config['PUBLIC_BASE_URL']}/jobs/{job.id}"
    remaining = (job.expires_at - datetime.now(UTC)).total_seconds() if job.expires_at else None
    webhooks.emit(
        app,
        READY_EVENT,
        job.id,
        {"jobId": job.id, "url": url},
        client_iss=payload["client_iss"],
        full_data={
            "documentReference": reference,
            "patient": f"Patient/{payload['patient_id']}",
            "encounter": f"Encounter/{payload['encounter_id']}",
            "summary": stored_text,
        },
        expires_in=max(remaining, 1.0) if remaining is not None else None,
    )
    return {
        "documentReference": reference,
        "created": created,
        "fhirServer": payload["fhir_server"],
        "patient": f"Patient/{payload['patient_id']}",
        "encounter": f"Encounter/{payload['encounter_id']}",
        "docStatus": "preliminary",
        "model": {"name": prediction.model, "version": prediction.version},
        "summary": stored_text,
    }


def _attachment_text(document: dict) -> str | None:
    try:
        return base64.b64decode(document["content"][0]["attachment"]["data"]).decode()
    except (KeyError, IndexError, TypeError, ValueError):
        return None
