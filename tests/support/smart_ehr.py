"""An EHR test double for the SMART launch: an authlib authorization server (code flow with real PKCE checks and
refresh tokens), SMART discovery, a consent page, a bearer-protected FHIR proxy to a real FHIR server, and the
EHR's side of a launch (``/ehr/launch``), all on a real loopback port.

    ehr = SmartEhr(fhir_server.base_url).start()
    browser_url = ehr.launch_url("http://gateway/smart/launch", patient="p1", app_context="result-id")
    ...
    ehr.stop()

The FHIR base is ``fhir_path`` on the double's origin (the root by default, like ``https://r4.smarthealthit.org``,
so that a development allowlist entry ``http://127.0.0.1:*`` names it exactly).

Switches (attributes, change them any time): ``consent`` ("ask" shows the page, "allow"/"deny" decide at
once), ``advertise_s256``, ``token_lifetime_s``, ``withhold_scopes`` (granted scope is narrower),
``refuse_refresh``, ``forge_id_token`` (sign the id_token with an unpublished key), ``omit_patient`` (no
``patient`` in the token response), ``discovery_status``, ``discovery_body`` (raw bytes, or a document to send
as JSON instead of the real one), ``hold_discovery`` (discovery answers only once ``release_discovery()`` is
called, or the double stops). Records: ``received`` (method, path) of every request, ``token_requests``
(grant_type, status), ``fhir_requests`` (path, status); ``discovery_count()``.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from html import escape
from typing import Any
from urllib.parse import urlencode

import jwt
import requests
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import OAuth2Error
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7636 import CodeChallenge
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, Response, abort, redirect, request
from jwt.algorithms import RSAAlgorithm
from werkzeug.routing import PathConverter
from werkzeug.serving import make_server

WELL_KNOWN = "/.well-known/smart-configuration"


class _FhirPathConverter(PathConverter):
    """A FHIR REST path: it starts with a resource type, so a root FHIR base leaves /authorize, /token and
    /favicon.ico alone."""

    regex = "[A-Z][^/]*(?:/.*)?"


@dataclass
class _User:
    fhir_user: str

    def get_user_id(self) -> str:
        return self.fhir_user


@dataclass
class _Client:
    client_id: str
    client_secret: str | None
    redirect_uris: tuple[str, ...] | None  # None: any http(s) redirect URI (tests)

    def get_client_id(self):
        return self.client_id

    def get_default_redirect_uri(self):
        return self.redirect_uris[0] if self.redirect_uris else None

    def get_allowed_scope(self, scope):
        return scope

    def check_redirect_uri(self, redirect_uri):
        if self.redirect_uris is None:
            return redirect_uri.startswith(("http://", "https://"))
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret):
        return self.client_secret is not None and secrets.compare_digest(self.client_secret, client_secret)

    def check_endpoint_auth_method(self, method, endpoint):
        if endpoint != "token":
            return True
        return method == ("none" if self.client_secret is None else "client_secret_basic") or (
            self.client_secret is not None and method == "client_secret_post"
        )

    def check_response_type(self, response_type):
        return response_type == "code"

    def check_grant_type(self, grant_type):
        return grant_type in ("authorization_code", "refresh_token")


@dataclass
class _Code:
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    code_challenge: str | None
    code_challenge_method: str | None
    context: dict[str, Any]
    user: _User
    expires_at: float

    def get_redirect_uri(self):
        return self.redirect_uri

    def get_scope(self):
        return self.scope


@dataclass
class _Token:
    client_id: str
    access_token: str
    refresh_token: str | None
    scope: str
    expires_at: float
    context: dict[str, Any]
    user: _User
    revoked: bool = False

    def check_client(self, client):
        return client.get_client_id() == self.client_id

    def get_scope(self):
        return self.scope

    def get_expires_in(self):
        return int(self.expires_at - time.time())

    def is_expired(self):
        return time.time() >= self.expires_at

    def is_revoked(self):
        return self.revoked

    def get_user(self):
        return self.user

    def get_client(self):
        return None


@dataclass
class _Store:
    codes: dict[str, _Code] = field(default_factory=dict)
    tokens: dict[str, _Token] = field(default_factory=dict)  # by access token
    launches: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class SmartEhr:
    """The EHR double; see the module docstring."""

    def __init__(
        self,
        fhir_upstream: str,
        *,
        client_id: str = "clinical-ai-gateway",
        client_secret: str | None = None,
        redirect_uris: tuple[str, ...] | None = None,
        fhir_user: str = "Practitioner/smart-ehr-clinician",
        fhir_path: str = "",
    ):
        self.fhir_upstream = fhir_upstream.rstrip("/")
        self.fhir_path = fhir_path.rstrip("/")
        self.client = _Client(client_id, client_secret, redirect_uris)
        self.user = _User(fhir_user)
        self.consent = "ask"
        self.advertise_s256 = True
        self.token_lifetime_s = 3600
        self.withhold_scopes: set[str] = set()
        self.refuse_refresh = False
        self.forge_id_token = False
        self.omit_patient = False
        self.discovery_status = 200
        self.discovery_body: Any = None
        self.hold_discovery = False
        self._discovery_released = threading.Event()
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.received: list[tuple[str, str]] = []
        self.token_requests: list[tuple[str, int]] = []
        self.fhir_requests: list[tuple[str, int]] = []
        self._store = _Store()
        self._upstream = requests.Session()
        self._upstream.trust_env = False
        self._server = None
        self._thread: threading.Thread | None = None
        self.app = self._build_app()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> SmartEhr:
        self._server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="smart-ehr", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._discovery_released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self._upstream.close()

    def __enter__(self) -> SmartEhr:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("SmartEhr is not running")
        return f"http://127.0.0.1:{self._server.server_port}"

    @property
    def fhir_base(self) -> str:
        """The FHIR base the EHR launches with (``iss``) and that tokens are for (``aud``)."""
        return self.base_url + self.fhir_path

    def release_discovery(self) -> None:
        """Let held discovery requests answer."""
        self._discovery_released.set()

    def discovery_count(self) -> int:
        """How many requests reached the SMART configuration."""
        return sum(1 for _, path in self.received if path.split("?", 1)[0] == self.fhir_path + WELL_KNOWN)

    # -- the EHR side of a launch -----------------------------------------------------------

    def register_launch(
        self,
        patient: str | None,
        app_context: str | None = None,
        *,
        encounter: str | None = None,
        need_patient_banner: bool = True,
    ) -> str:
        """A new launch id carrying this context (what the EHR does when the clinician opens the app)."""
        launch_id = secrets.token_urlsafe(16)
        context = {
            "patient": patient,
            "encounter": encounter,
            "need_patient_banner": need_patient_banner,
            "appContext": app_context,
        }
        with self._store.lock:
            self._store.launches[launch_id] = {k: v for k, v in context.items() if v is not None}
        return launch_id

    def launch_url(self, target: str, patient: str | None, app_context: str | None = None, **context: Any) -> str:
        """The URL a card's smart link leads to in this EHR: it registers a launch and redirects to ``target``."""
        query = {"target": target, "patient": patient or "", "appContext": app_context or ""}
        query.update({k: str(v) for k, v in context.items()})
        return f"{self.base_url}/ehr/launch?{urlencode(query)}"

    def smart_configuration(self) -> dict[str, Any]:
        methods = ["S256"] if self.advertise_s256 else ["plain"]
        return {
            "issuer": self.base_url,
            "authorization_endpoint": self.base_url + "/authorize",
            "token_endpoint": self.base_url + "/token",
            "jwks_uri": self.base_url + "/jwks",
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": methods,
            "scopes_supported": ["launch", "openid", "fhirUser", "patient/*.rs", "offline_access"],
            "response_types_supported": ["code"],
            "capabilities": ["launch-ehr", "client-public", "context-ehr-patient", "permission-v2"],
        }

    def token_count(self, grant_type: str) -> int:
        return sum(1 for kind, _ in self.token_requests if kind == grant_type)

    # -- the Flask app -----------------------------------------------------------------------

    def _build_app(self) -> Flask:
        app = Flask("smart_ehr")
        app.url_map.converters["fhir"] = _FhirPathConverter
        app.config["OAUTH2_REFRESH_TOKEN_GENERATOR"] = True
        server = AuthorizationServer(app, query_client=self._query_client, save_token=self._save_token)
        server.register_token_generator(
            "default",
            BearerTokenGenerator(
                access_token_generator=lambda *a, **k: secrets.token_urlsafe(32),
                refresh_token_generator=lambda *a, **k: secrets.token_urlsafe(32),
                expires_generator=lambda client, grant_type: self.token_lifetime_s,
            ),
        )
        server.register_grant(self._code_grant(), [CodeChallenge(required=True)])
        server.register_grant(self._refresh_grant())
        self.authorization_server = server

        @app.before_request
        def record():
            self.received.append((request.method, request.full_path.rstrip("?")))

        app.add_url_rule(self.fhir_path + WELL_KNOWN, "discovery", self._discovery)
        app.add_url_rule("/authorize", "authorize", self._authorize, methods=["GET", "POST"])
        app.add_url_rule("/token", "token", self._token, methods=["POST"])
        app.add_url_rule("/jwks", "jwks", self._jwks)
        app.add_url_rule(f"{self.fhir_path}/<fhir:path>", "fhir", self._fhir)
        app.add_url_rule("/ehr/launch", "ehr_launch", self._ehr_launch)
        return app

    def _query_client(self, client_id):
        return self.client if client_id == self.client.client_id else None

    def _save_token(self, token: dict, oauth_request) -> None:
        """Keep the token and add the launch context to the response (S-5)."""
        source = getattr(oauth_request, "authorization_code", None) or getattr(oauth_request, "refresh_token", None)
        context = dict(source.context) if source is not None else {}
        record = _Token(
            client_id=self.client.client_id,
            access_token=token["access_token"],
            refresh_token=token.get("refresh_token"),
            scope=token.get("scope", ""),
            expires_at=time.time() + token["expires_in"],
            context=context,
            user=oauth_request.user,
        )
        with self._store.lock:
            self._store.tokens[record.access_token] = record
        if getattr(oauth_request, "authorization_code", None) is not None:
            token.update(context)
            if self.omit_patient:
                token.pop("patient", None)
            if "openid" in record.scope.split():
                token["id_token"] = self._id_token(oauth_request.user)

    def _id_token(self, user: _User) -> str:
        """An OpenID Connect id_token naming the user in ``fhirUser``, signed with this EHR's key (or, with
        ``forge_id_token``, with a key nobody published)."""
        now = int(time.time())
        claims = {
            "iss": self.base_url,
            "sub": user.get_user_id(),
            "aud": self.client.client_id,
            "iat": now,
            "exp": now + 300,
            "fhirUser": user.fhir_user,
        }
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if self.forge_id_token else self._key
        return jwt.encode(claims, key, "RS256", headers={"kid": "ehr-double"})

    def _jwks(self):
        jwk = json.loads(RSAAlgorithm.to_jwk(self._key.public_key()))
        return {"keys": [{**jwk, "kid": "ehr-double", "alg": "RS256", "use": "sig"}]}

    def _code_grant(self):
        ehr = self

        class CodeGrant(grants.AuthorizationCodeGrant):
            TOKEN_ENDPOINT_AUTH_METHODS = ["none", "client_secret_basic", "client_secret_post"]

            def save_authorization_code(self, code, req):
                launch = ehr._store.launches.get(req.payload.data.get("launch", ""), {})
                granted = [s for s in (req.scope or "").split() if s not in ehr.withhold_scopes]
                ehr._store.codes[code] = _Code(
                    code=code,
                    client_id=req.client.client_id,
                    redirect_uri=req.payload.redirect_uri,
                    scope=" ".join(granted),
                    code_challenge=req.payload.data.get("code_challenge"),
                    code_challenge_method=req.payload.data.get("code_challenge_method"),
                    context=dict(launch),
                    user=req.user,
                    expires_at=time.time() + 60,
                )

            def query_authorization_code(self, code, client):
                item = ehr._store.codes.get(code)
                if item and item.client_id == client.client_id and item.expires_at > time.time():
                    return item
                return None

            def delete_authorization_code(self, authorization_code):
                ehr._store.codes.pop(authorization_code.code, None)

            def authenticate_user(self, authorization_code):
                return authorization_code.user

        return CodeGrant

    def _refresh_grant(self):
        ehr = self

        class RefreshGrant(grants.RefreshTokenGrant):
            TOKEN_ENDPOINT_AUTH_METHODS = ["none", "client_secret_basic", "client_secret_post"]
            INCLUDE_NEW_REFRESH_TOKEN = True  # rotation (S-7)

            def authenticate_refresh_token(self, refresh_token):
                if ehr.refuse_refresh:
                    return None
                with ehr._store.lock:
                    for token in ehr._store.tokens.values():
                        if token.refresh_token == refresh_token and not token.revoked:
                            return token
                return None

            def authenticate_user(self, refresh_token):
                return refresh_token.user

            def revoke_old_credential(self, refresh_token):
                refresh_token.revoked = True

        return RefreshGrant

    # -- routes ------------------------------------------------------------------------------

    def _discovery(self):
        if self.hold_discovery:
            self._discovery_released.wait(30)
        body = self.smart_configuration() if self.discovery_body is None else self.discovery_body
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        response = Response(body, self.discovery_status, content_type="application/json")
        if 300 <= self.discovery_status < 400:
            response.headers["Location"] = "https://elsewhere.example/.well-known/smart-configuration"
        return response

    def _ehr_launch(self):
        target = request.args.get("target", "")
        if not target.startswith(("http://", "https://")):
            abort(400)
        launch_id = self.register_launch(
            request.args.get("patient") or None,
            request.args.get("appContext") or None,
            encounter=request.args.get("encounter") or None,
            need_patient_banner=request.args.get("need_patient_banner", "true").lower() != "false",
        )
        separator = "&" if "?" in target else "?"
        return redirect(f"{target}{separator}{urlencode({'iss': self.fhir_base, 'launch': launch_id})}", 302)

    def _authorize(self):
        if request.values.get("aud") != self.fhir_base:
            return Response("aud must be this EHR's FHIR base", 400)
        if request.values.get("launch") not in self._store.launches:
            return Response("unknown launch", 400)
        server = self.authorization_server
        try:
            grant = server.get_consent_grant(end_user=self.user)
        except OAuth2Error as error:
            return Response(f"invalid authorization request: {escape(error.error)}", 400)
        decision = request.form.get("decision") if request.method == "POST" else None
        if decision is None and self.consent != "ask":
            decision = self.consent
        if decision is None:
            return self._consent_page(grant)
        user = self.user if decision == "allow" else None
        return server.create_authorization_response(grant_user=user, grant=grant)

    def _consent_page(self, grant) -> str:
        scopes = "".join(f"<li>{escape(s)}</li>" for s in (grant.request.scope or "").split())
        action = escape(request.full_path)
        return (
            "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Allow access?</title></head><body>"
            f"<h1>Allow {escape(self.client.client_id)} to access this chart?</h1><ul id='scopes'>{scopes}</ul>"
            f"<form method='post' action='{action}'>"
            "<button type='submit' name='decision' value='allow' id='allow'>Allow</button>"
            "<button type='submit' name='decision' value='deny' id='deny'>Deny</button>"
            "</form></body></html>"
        )

    def _token(self):
        grant_type = request.form.get("grant_type", "")
        response = self.authorization_server.create_token_response()
        self.token_requests.append((grant_type, response.status_code))
        return response

    def _fhir(self, path: str):
        token = self._bearer()
        if token is None:
            self.fhir_requests.append((path, 401))
            return Response('{"resourceType":"OperationOutcome"}', 401, {"WWW-Authenticate": "Bearer"})
        resource_type = path.split("/", 1)[0]
        if not _scope_allows(token.scope, resource_type):
            self.fhir_requests.append((path, 403))
            return Response('{"resourceType":"OperationOutcome"}', 403, content_type="application/fhir+json")
        query = request.query_string.decode()
        upstream = self._upstream.get(
            f"{self.fhir_upstream}/{path}" + (f"?{query}" if query else ""),
            headers={"Accept": "application/fhir+json"},
            timeout=10,
        )
        self.fhir_requests.append((path, upstream.status_code))
        return Response(upstream.content, upstream.status_code, content_type="application/fhir+json")

    def _bearer(self) -> _Token | None:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return None
        with self._store.lock:
            token = self._store.tokens.get(header[len("Bearer ") :])
        if token is None or token.revoked or token.is_expired():
            return None
        return token


def _scope_allows(scope: str, resource_type: str) -> bool:
    """A read is allowed by ``patient/<Type>.r…`` or ``patient/*.r…`` (v2) or ``.read`` (v1)."""
    for item in scope.split():
        context, _, rest = item.partition("/")
        kind, _, permissions = rest.partition(".")
        readable = permissions == "read" or "r" in permissions or "s" in permissions
        if context in ("patient", "user") and kind in (resource_type, "*") and readable:
            return True
    return False
