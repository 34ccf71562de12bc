"""The CDS Hooks endpoints: discovery, service call, feedback. Thin: the work is in plain functions."""

from __future__ import annotations

import time

from flask import Blueprint, current_app, g, request

from app.audit import audit
from app.cds.errors import CdsError, UnknownService
from app.cds.feedback import parse_feedback, store_feedback
from app.cds.invoke import run_service
from app.cds.request import parse_hook_request
from app.cds.responses import add_cors_headers, cds_error
from app.cds.service import get_service, services
from app.db import engine
from app.http import json_response, operation_outcome_errors
from app.metrics import HOOK_SECONDS

bp = Blueprint("cds", __name__)
# Errors and CORS for these routes only (the SMART app and the admin API answer their own way); requests under
# /cds-services that match no route are answered the same way by ``responses.unrouted_error`` (see setup).
operation_outcome_errors(bp)
bp.register_error_handler(CdsError, cds_error)
bp.after_request(add_cors_headers)


def _state():
    return current_app.extensions["cds"]


def _authenticate():
    """The calling client, or None when CDS_AUTH is off; raises ClientNotTrusted (401)."""
    principal = _state().authenticate(request.headers.get("Authorization"), request.path)
    g.audit.update(iss=principal.iss if principal else None, tenant=principal.tenant if principal else None)
    return principal


def _service(service_id: str):
    service = get_service(service_id)
    if service is None:
        raise UnknownService(f"No CDS service with id {service_id!r}", "id")
    g.audit["service"] = service_id
    return service


@bp.before_request
def _start_audit():
    g.started = time.monotonic()
    g.audit = {}


@bp.after_request
def _write_audit(response):
    if request.method != "OPTIONS" and "event" in g.get("audit", {}):
        record = g.audit
        event = record.pop("event")
        seconds = time.monotonic() - g.started
        audit(current_app).record(event, status=response.status_code, latency_ms=round(seconds * 1000, 1), **record)
        if event == "hook":
            HOOK_SECONDS.labels(record.get("service", "unknown"), record.get("outcome", "error")).observe(seconds)
    return response


@bp.get("/cds-services")
def discovery():
    g.audit["event"] = "discovery"
    _authenticate()
    return json_response({"services": [s.discovery_entry() for s in services()]})


@bp.post("/cds-services/<service_id>")
def call_service(service_id: str):
    g.audit["event"] = "hook"
    principal = _authenticate()
    service = _service(service_id)
    hook_request = parse_hook_request(request.get_data(cache=False), expected_hook=service.hook)
    g.audit.update(
        hookInstance=hook_request.hook_instance,
        user=hook_request.user_id,
        patient=f"Patient/{hook_request.patient_id}" if hook_request.patient_id else None,
    )
    state = _state()
    run = run_service(
        service,
        hook_request,
        state.resolver,
        state.fhir_access(hook_request, principal),
        g.started,
        current_app.config["HOOK_BUDGET_MS"],
        state.fetch_auditor(g.audit),
        current_app.config["AI_RESERVE_MS"],
        principal.client if principal else None,
    )
    g.audit.update(
        outcome=run.outcome,
        cards=len(run.cards),
        # counts only: which resources were left out, and what they held, never reaches the audit trail
        prefetch_dropped=sum(run.dropped.values()),
        prefetch_dropped_by_key=run.dropped or None,
        prefetch_incomplete=sorted(run.incomplete) or None,
    )
    return json_response(state.cards_body(run.cards))


@bp.post("/cds-services/<service_id>/feedback")
def feedback(service_id: str):
    g.audit["event"] = "feedback"
    principal = _authenticate()
    _service(service_id)
    entries = parse_feedback(request.get_data(cache=False))
    store_feedback(
        engine(current_app),
        service_id,
        entries,
        principal.iss if principal else None,
        principal.tenant if principal else None,
    )
    g.audit.update(entries=len(entries), cards=sorted({e.card for e in entries}))
    return json_response({})
