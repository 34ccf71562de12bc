"""SMART on FHIR: our signing keys and their JWKS, the ``keys`` CLI, and Backend Services clients per EHR."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import click
from flask import Blueprint, Flask, current_app, jsonify

from app.cds.clients import TrustedClient
from app.http import pooled_session
from app.smart.backend import BackendAuthError, BackendAuthTimeout, BackendServicesClient
from app.smart.keys import KeyStore, NoSigningKey

__all__ = [
    "BackendAuthError",
    "BackendAuthTimeout",
    "BackendServicesClient",
    "KeyStore",
    "NoSigningKey",
    "backend_client",
    "init_app",
    "jwks_url",
]

log = logging.getLogger(__name__)

JWKS_PATH = "/.well-known/jwks.json"
_KEYS = "smart_keys"
_BACKENDS = "smart_backend_clients"

jwks_bp = Blueprint("smart_jwks", __name__)


@jwks_bp.get(JWKS_PATH)
def jwks():
    """Our public signing keys, for EHRs to register (S-10); empty, not an error, before keys are generated."""
    store: KeyStore = current_app.extensions[_KEYS]
    document = store.jwks()
    if not document["keys"] and not current_app.extensions.get("smart_jwks_warned"):
        current_app.extensions["smart_jwks_warned"] = True
        log.warning("no signing keys in %s: run `flask --app app keys generate`", store.directory)
    response = jsonify(document)
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response


def jwks_url(app: Flask) -> str:
    """The URL an EHR registers for our keys."""
    return app.config["PUBLIC_BASE_URL"].rstrip("/") + JWKS_PATH


def backend_client(app: Flask, client: TrustedClient) -> BackendServicesClient | None:
    """The Backend Services client for a trusted EHR (one per issuer, so its token is shared), or None when the
    EHR has no ``smart_backend`` configured."""
    config = client.smart_backend
    if not config:
        return None
    settings = (config["token_url"], config["client_id"], config["scope"], config.get("alg", "RS384"))
    state = app.extensions[_BACKENDS]
    with state["lock"]:
        cached = state["clients"].get(client.iss)
        if cached is not None and cached[0] == settings:
            return cached[1]
        token_url, client_id, scope, alg = settings
        backend = BackendServicesClient(
            token_url,
            client_id,
            scope,
            app.extensions[_KEYS],
            alg=alg,
            session=state["session"],
            timeout=float(app.config["FHIR_TIMEOUT_S"]),
        )
        state["clients"][client.iss] = (settings, backend)
        return backend


def fhir_sender(app: Flask, client: TrustedClient):
    """How jobs call ``client``'s FHIR server as ourselves (a ``app.fhir.client.Sender``): its Backend Services
    client, or plain requests where FHIR_ALLOW_ANONYMOUS allows (development); None when neither."""
    backend = backend_client(app, client)
    if backend is not None:
        return backend.request
    return app.extensions["cds"].session.request if app.config["FHIR_ALLOW_ANONYMOUS"] else None


def _register_cli(app: Flask) -> None:
    @app.cli.group("keys")
    def keys_cli():
        """Our signing keys (SMART Backend Services assertions; published at /.well-known/jwks.json)."""

    @keys_cli.command("generate")
    @click.option("--if-missing", is_flag=True, help="Only when there is no usable key (for first start).")
    def generate(if_missing: bool):
        """Make new RS384 and ES384 signing keys; the previous ones stay published for 24 hours."""
        store: KeyStore = app.extensions[_KEYS]
        if if_missing and not store.ensure():
            click.echo(f"signing keys present in {store.directory}; nothing generated")
            return
        kids = [r.kid for r in store.records() if r.retire_at is None] if if_missing else store.generate()
        for kid in kids:
            click.echo(f"new signing key {kid}")
        click.echo(f"public keys: {jwks_url(app)}")


def init_app(app: Flask) -> None:
    """Key store in ``KEYS_DIR``, the JWKS route, the ``keys`` CLI, the Backend Services client cache, and
    the SMART app (EHR launch and the explanation page)."""
    if _KEYS in app.extensions:
        return
    app.extensions[_KEYS] = KeyStore(Path(app.config["KEYS_DIR"]))
    app.extensions[_BACKENDS] = {"lock": threading.Lock(), "clients": {}, "session": pooled_session()}
    app.register_blueprint(jwks_bp)
    _register_cli(app)
    # Imported here, not at the top, on purpose: the jobs and retention import ``app.smart.sessions`` and
    # ``app.smart.keys`` (which runs this package first) and need none of the app's routes, pages and templates.
    from app.smart import app_routes

    app_routes.init_app(app)
