"""Shared state of the CDS endpoints, built once per application, and their registration."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from flask import current_app

from app.audit import audit
from app.cds.auth import ClientAuthenticator, Principal
from app.cds.cards import Card, cards_response
from app.cds.clients import TrustedClients, install_trusted_clients
from app.cds.prefetch import FhirAccess, PrefetchResolver, fhir_access
from app.cds.replay import make_replay_cache
from app.cds.request import HookRequest
from app.cds.responses import unrouted_error
from app.cds.routes import bp
from app.cds.service import load_services
from app.clock import SYSTEM_CLOCK, Clock, app_clock
from app.development import reload_refusal
from app.host_state import HostState
from app.http import answer_unrouted, pooled_session

log = logging.getLogger(__name__)

AUTH_OFF_LABEL = " [UNAUTHENTICATED: CDS_AUTH=off, development only]"


class CdsState:
    """What the CDS endpoints share for the application's lifetime."""

    def __init__(
        self,
        config: dict[str, Any],
        clients: TrustedClients,
        host_state: HostState | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ):
        self.clients = clients  # the application's one registry, re-read when CDS_CLIENTS_FILE changes
        self.auth_on = config["CDS_AUTH"]
        self.allow_anonymous = config["FHIR_ALLOW_ANONYMOUS"]
        self.fhir_timeout = float(config["FHIR_TIMEOUT_S"])
        self.session = pooled_session()
        self.authenticator = ClientAuthenticator(
            self.clients,
            config["PUBLIC_BASE_URL"],
            make_replay_cache(config["REDIS_URL"], host_state, clock),
            clock=clock,
        )
        self.resolver = PrefetchResolver(ThreadPoolExecutor(max_workers=32, thread_name_prefix="prefetch"))

    def authenticate(self, header: str | None, path: str) -> Principal | None:
        return self.authenticator.authenticate(header, path) if self.auth_on else None

    def fhir_access(self, request: HookRequest, principal: Principal | None) -> FhirAccess:
        """FHIR access limited to the calling client's allowlist (any configured client's when auth is off)."""
        if principal is not None:
            allows = principal.client.allows_fhir_server
        else:
            registry = self.clients.current()
            allows = lambda url: any(c.allows_fhir_server(url) for c in registry)  # noqa: E731
        return fhir_access(request, allows, self.allow_anonymous, self.session, self.fhir_timeout)

    def fetch_auditor(self, call_record: dict[str, Any]):
        """A callback writing one audit record per FHIR fetch, tagged with this call's who and what."""
        log_ = audit(current_app)
        who = {k: call_record.get(k) for k in ("iss", "tenant", "user", "service", "hookInstance", "patient")}
        return lambda fetch: log_.record("fhir.fetch", **who, **fetch)

    def cards_body(self, cards: list[Card]) -> dict[str, Any]:
        if not self.auth_on:
            cards = [replace(c, source=replace(c.source, label=c.source.label + AUTH_OFF_LABEL)) for c in cards]
        return cards_response(cards)


def init_app(app) -> None:
    """Load the declared services, build the shared state, register the endpoints and error handlers."""
    load_services()
    # A development-only file is refused on reload unless the service started in development (app/development.py).
    clients = install_trusted_clients(app, lambda path: reload_refusal(app.config, path))
    state = CdsState(app.config, clients, app.extensions.get("host_state"), app_clock(app))
    app.extensions["cds"] = state
    if not state.auth_on:
        log.warning("CDS_AUTH=off: client authentication is DISABLED; never run this way with real patients")
    if state.allow_anonymous:
        log.warning("FHIR_ALLOW_ANONYMOUS=1: fetching from allowlisted FHIR servers without a token (development)")
    app.register_blueprint(bp)
    answer_unrouted(app, "/cds-services", unrouted_error)
