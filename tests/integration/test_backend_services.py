"""SMART Backend Services (S-9..S-11) against real local HTTP servers: a token endpoint that verifies our client
assertions with the JWKS our app publishes, and a resource server that checks the bearer token."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jwt
import pytest
from jwt import PyJWK
from werkzeug import Request, Response

from app import smart
from app.cds.clients import PRIVATE_JWK_MEMBERS, TrustedClient
from app.fhir.client import Client, pooled_session
from app.smart import BackendAuthError, BackendAuthTimeout, BackendServicesClient
from tests.support.clock import FakeClock

CLIENT_ID = "gateway-backend"
SCOPE = "system/DocumentReference.c system/Patient.rs"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class TokenEndpoint:
    """A token endpoint double: checks every S-9/S-10 rule of each request against our published JWKS, and
    records what it saw. Problems are collected (a handler thread cannot fail the test) and asserted empty."""

    def __init__(self, url: str, jwks: dict):
        self.url = url
        self.jwks = {jwk["kid"]: jwk for jwk in jwks["keys"]}
        self.expires_in: float | None = 300
        self.answer: tuple[int, str] | None = None  # (status, body): a canned answer instead of a token
        self.hang = threading.Event()  # set: the endpoint waits until released
        self.release = threading.Event()
        self.requests: list[dict] = []
        self.problems: list[str] = []
        self.issued: list[str] = []
        self.jtis: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, request: Request) -> Response:
        if self.hang.is_set():
            self.release.wait(10)
        with self.lock:
            form = request.form.to_dict()
            self.requests.append({"form": form, "headers": dict(request.headers)})
            self.check(request, form)
            if self.answer:
                status, body = self.answer
                return Response(body, status, content_type="application/json")
            token = f"token-{len(self.issued) + 1}"
            self.issued.append(token)
        body = {"access_token": token, "token_type": "Bearer", "scope": "system/DocumentReference.c"}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return Response(json.dumps(body), 200, content_type="application/json")

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def check(self, request: Request, form: dict) -> None:
        if not request.content_type.startswith("application/x-www-form-urlencoded"):
            self.problem(f"content type {request.content_type}")
        if "application/json" not in request.headers.get("Accept", ""):
            self.problem("Accept is not application/json")
        if form.get("grant_type") != "client_credentials":
            self.problem(f"grant_type {form.get('grant_type')!r}")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            self.problem(f"client_assertion_type {form.get('client_assertion_type')!r}")
        if form.get("scope") != SCOPE:
            self.problem(f"scope {form.get('scope')!r}")
        if set(form) != {"grant_type", "scope", "client_assertion_type", "client_assertion"}:
            self.problem(f"form members {sorted(form)}")
        self.check_assertion(form.get("client_assertion", ""))

    def check_assertion(self, assertion: str) -> None:
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError as exc:
            self.problem(f"assertion is not a JWT: {exc}")
            return
        if header.get("typ") != "JWT":
            self.problem(f"typ {header.get('typ')!r}")
        if header.get("alg") not in ("RS384", "ES384"):
            self.problem(f"alg {header.get('alg')!r}")
        jwk = self.jwks.get(header.get("kid"))
        if jwk is None:
            self.problem(f"kid {header.get('kid')!r} is not in the published JWKS")
            return
        if jwk["alg"] != header["alg"]:
            self.problem(f"kid {jwk['kid']} is an {jwk['alg']} key but the assertion says {header['alg']}")
        try:
            claims = jwt.decode(
                assertion,
                PyJWK(jwk).key,
                algorithms=[jwk["alg"]],
                audience=self.url,
                issuer=CLIENT_ID,
                options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"]},
            )
        except jwt.PyJWTError as exc:
            self.problem(f"assertion does not verify: {exc!r}")
            return
        now = time.time()
        if claims["sub"] != CLIENT_ID:
            self.problem(f"sub {claims['sub']!r}")
        if claims["aud"] != self.url:
            self.problem(f"aud {claims['aud']!r} is not exactly the token URL")
        if not now < claims["exp"] <= now + 300:
            self.problem(f"exp is {claims['exp'] - now:.0f} s ahead")
        if claims["jti"] in self.jtis:
            self.problem(f"jti {claims['jti']} reused")
        self.jtis.add(claims["jti"])


class ResourceServer:
    """A FHIR resource server double: 200 for an accepted bearer token, 401 otherwise."""

    def __init__(self, tokens: TokenEndpoint):
        self.tokens = tokens
        self.rejected: set[str] = set()
        self.reject_all = False
        self.seen: list[str] = []

    def __call__(self, request: Request) -> Response:
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ")
        self.seen.append(auth)
        if self.reject_all or token in self.rejected or token not in self.tokens.issued:
            return Response("", 401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return Response(json.dumps({"resourceType": "Patient", "id": "1"}), 200, content_type="application/fhir+json")


@pytest.fixture
def app(make_app):
    app = make_app()
    smart.init_app(app)  # a no-op once create_app calls it
    return app


@pytest.fixture
def keys(app):
    store = app.extensions["smart_keys"]
    store.generate()
    return store


@pytest.fixture
def published_jwks(app, keys) -> dict:
    response = app.test_client().get("/.well-known/jwks.json")
    assert response.status_code == 200
    return response.get_json()


@pytest.fixture
def server(make_httpserver):
    make_httpserver.clear()
    yield make_httpserver
    make_httpserver.clear()


@pytest.fixture
def token_endpoint(server, published_jwks):
    endpoint = TokenEndpoint(server.url_for("/token"), published_jwks)
    server.expect_request("/token", method="POST").respond_with_handler(endpoint)
    yield endpoint
    endpoint.release.set()


@pytest.fixture
def fhir(server, token_endpoint) -> ResourceServer:
    resource = ResourceServer(token_endpoint)
    server.expect_request("/fhir/Patient/1").respond_with_handler(resource)
    return resource


@pytest.fixture
def make_backend(keys, token_endpoint):
    def factory(alg: str = "RS384", timeout: float = 5.0, **kwargs) -> BackendServicesClient:
        return BackendServicesClient(token_endpoint.url, CLIENT_ID, SCOPE, keys, alg=alg, timeout=timeout, **kwargs)

    return factory


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_every_assertion_satisfies_s10_and_verifies_with_our_published_jwks(alg, make_backend, token_endpoint):
    backend = make_backend(alg)
    for _ in range(3):
        backend.invalidate()
        assert backend.access_token().startswith("token-")

    assert token_endpoint.problems == []
    assert len(token_endpoint.requests) == 3
    assert len(token_endpoint.jtis) == 3  # a fresh jti each time
    algs = {jwt.get_unverified_header(r["form"]["client_assertion"])["alg"] for r in token_endpoint.requests}
    assert algs == {alg}
    assert backend.granted_scope == "system/DocumentReference.c"


def test_assertion_lifetime_is_at_most_five_minutes(make_backend):
    claims = jwt.decode(make_backend().assertion(), options={"verify_signature": False})
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert claims["iss"] == claims["sub"] == CLIENT_ID


def test_token_is_reused_until_near_expiry(make_backend, token_endpoint, fhir, server):
    backend = make_backend()
    for _ in range(2):
        assert backend.request("GET", server.url_for("/fhir/Patient/1")).status_code == 200
    assert len(token_endpoint.requests) == 1
    assert fhir.seen == ["Bearer token-1", "Bearer token-1"]


def test_token_expiring_inside_the_margin_is_used_once(make_backend, token_endpoint, fhir, server):
    token_endpoint.expires_in = 20  # less than the 30 s renewal margin
    backend = make_backend()
    for _ in range(2):
        assert backend.request("GET", server.url_for("/fhir/Patient/1")).status_code == 200
    assert len(token_endpoint.requests) == 2
    assert fhir.seen == ["Bearer token-1", "Bearer token-2"]


def test_token_is_renewed_after_it_expires(make_backend, token_endpoint):
    token_endpoint.expires_in = 60
    clock = FakeClock()
    backend = make_backend(refresh_margin=0.0, clock=clock)
    assert backend.access_token() == "token-1"
    clock.advance(53)  # renewed at 90 % of the lifetime: not yet
    assert backend.access_token() == "token-1"
    clock.advance(1)
    assert backend.access_token() == "token-2"


def test_missing_expires_in_means_five_minutes(make_backend, token_endpoint):
    token_endpoint.expires_in = None
    backend = make_backend()
    assert backend.access_token() == backend.access_token()
    assert len(token_endpoint.requests) == 1


def test_concurrent_callers_share_one_token_request(make_backend, token_endpoint):
    backend = make_backend()
    with ThreadPoolExecutor(8) as pool:
        tokens = set(pool.map(lambda _: backend.access_token(), range(16)))
    assert tokens == {"token-1"}
    assert len(token_endpoint.requests) == 1


def test_a_401_gets_exactly_one_new_token_and_one_retry(make_backend, token_endpoint, fhir, server):
    backend = make_backend()
    backend.access_token()
    fhir.rejected.add("token-1")  # e.g. revoked at the EHR before its expiry

    response = backend.request("GET", server.url_for("/fhir/Patient/1"))

    assert response.status_code == 200
    assert len(token_endpoint.requests) == 2
    assert fhir.seen == ["Bearer token-1", "Bearer token-2"]
    assert token_endpoint.problems == []


def test_a_second_401_is_returned_not_looped(make_backend, token_endpoint, fhir, server):
    fhir.reject_all = True
    backend = make_backend()

    response = backend.request("GET", server.url_for("/fhir/Patient/1"))

    assert response.status_code == 401
    assert len(fhir.seen) == 2
    assert len(token_endpoint.requests) == 2


def test_fhir_client_sends_through_the_backend_client(make_backend, fhir, server):
    backend = make_backend()
    client = Client(server.url_for("/fhir"), token=None, session=pooled_session(), send=backend.request)
    assert client.get("Patient/1")["id"] == "1"
    assert fhir.seen == ["Bearer token-1"]


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (400, {"error": "invalid_client", "error_description": "assertion kid abc unknown"}, "invalid_client"),
        (400, {"error": "invalid_scope"}, "invalid_scope"),
        (401, {"error": "invalid_client"}, "invalid_client"),
        (500, "<html>internal error</html>", "unexpected_response"),
        (400, {"error": "line\nbreak"}, "unexpected_response"),
    ],
)
def test_token_endpoint_error_raises_with_the_oauth_error_code(make_backend, token_endpoint, status, body, error):
    token_endpoint.answer = (status, body if isinstance(body, str) else json.dumps(body))
    backend = make_backend()
    with pytest.raises(BackendAuthError) as raised:
        backend.access_token()
    assert raised.value.error == error
    assert raised.value.status == status
    assert "assertion kid" not in str(raised.value)  # the description is not passed on


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"token_type": "Bearer", "expires_in": 300}, "invalid_token_response"),
        ({"access_token": "t", "token_type": "mac", "expires_in": 300}, "unsupported_token_type"),
    ],
)
def test_unusable_token_response_raises(make_backend, token_endpoint, body, error):
    token_endpoint.answer = (200, json.dumps(body))
    with pytest.raises(BackendAuthError) as raised:
        make_backend().access_token()
    assert raised.value.error == error


def test_hung_token_endpoint_times_out_within_the_timeout(make_backend, token_endpoint):
    token_endpoint.hang.set()
    backend = make_backend(timeout=0.5)
    started = time.monotonic()
    with pytest.raises(BackendAuthTimeout):
        backend.access_token()
    # Kept on purpose, generous: the endpoint hangs 10 s and the default timeout is 5 s; ending well before
    # either shows the client gave up at its own 0.5 s deadline, not at the server's pace.
    assert time.monotonic() - started < 3.0


def test_unreachable_token_endpoint_raises(keys):
    from tests.support.processes import free_port

    backend = BackendServicesClient(f"http://127.0.0.1:{free_port()}/token", CLIENT_ID, SCOPE, keys, timeout=1)
    with pytest.raises(BackendAuthError) as raised:
        backend.access_token()
    assert raised.value.error.startswith("unreachable")


def test_repr_never_shows_the_token(make_backend):
    backend = make_backend()
    backend.access_token()
    assert "token-1" not in repr(backend)


# ----- the JWKS route, the CLI and the per-issuer client cache


def test_jwks_endpoint_serves_public_keys_only(app, keys):
    response = app.test_client().get("/.well-known/jwks.json")

    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.headers["Cache-Control"] == "public, max-age=3600"
    document = response.get_json()
    assert {jwk["alg"] for jwk in document["keys"]} == {"RS384", "ES384"}
    for jwk in document["keys"]:
        assert not set(PRIVATE_JWK_MEMBERS) & set(jwk)
        assert jwk["use"] == "sig" and jwk["kid"]


def test_jwks_endpoint_without_keys_is_an_empty_set(app, caplog):
    client = app.test_client()
    with caplog.at_level("WARNING"):
        first = client.get("/.well-known/jwks.json")
        second = client.get("/.well-known/jwks.json")
    assert first.status_code == second.status_code == 200
    assert first.get_json() == {"keys": []}
    assert len([r for r in caplog.records if "keys generate" in r.getMessage()]) == 1  # warned once


def test_cli_generates_and_rotates(app):
    runner = app.test_cli_runner()
    first = runner.invoke(args=["keys", "generate", "--if-missing"])
    assert first.exit_code == 0, first.output
    assert "http://gateway.test/.well-known/jwks.json" in first.output
    kids = {line.split()[-1] for line in first.output.splitlines() if line.startswith("new signing key")}
    assert len(kids) == 2

    again = runner.invoke(args=["keys", "generate", "--if-missing"])
    assert again.exit_code == 0 and "nothing generated" in again.output

    rotated = runner.invoke(args=["keys", "generate"])
    assert rotated.exit_code == 0, rotated.output
    published = {jwk["kid"] for jwk in app.test_client().get("/.well-known/jwks.json").get_json()["keys"]}
    assert kids < published and len(published) == 4  # the old keys stay published


def test_backend_client_is_cached_per_issuer(app, keys):
    config = {"token_url": "https://ehr.test/token", "client_id": CLIENT_ID, "scope": SCOPE}
    ehr = TrustedClient(iss="https://ehr.test", smart_backend=config)
    other = TrustedClient(iss="https://other.test", smart_backend={**config, "alg": "ES384"})

    first = smart.backend_client(app, ehr)
    assert first is smart.backend_client(app, ehr)
    assert first.alg == "RS384" and first.timeout == app.config["FHIR_TIMEOUT_S"]
    assert smart.backend_client(app, other).alg == "ES384"
    assert smart.backend_client(app, other) is not first
    assert smart.backend_client(app, TrustedClient(iss="https://none.test")) is None


def test_the_token_endpoint_double_catches_what_authlib_private_key_jwt_sends(keys, published_jwks):
    """The double is not vacuous: RS256, no kid, an hour's lifetime and a reused jti are each reported."""
    endpoint = TokenEndpoint("http://127.0.0.1:1/token", published_jwks)
    _, key = keys.signing_key("RS384")
    now = int(time.time())
    claims = {"iss": CLIENT_ID, "sub": CLIENT_ID, "aud": endpoint.url, "iat": now, "exp": now + 3600, "jti": "1"}
    endpoint.check_assertion(jwt.encode(claims, key, algorithm="RS256"))
    assert any("kid" in problem for problem in endpoint.problems)

    kid, _ = keys.signing_key("RS384")
    endpoint.problems.clear()
    endpoint.check_assertion(jwt.encode(claims, key, algorithm="RS384", headers={"kid": kid}))
    endpoint.check_assertion(jwt.encode({**claims, "exp": now + 60}, key, algorithm="RS384", headers={"kid": kid}))
    assert any("exp is" in problem for problem in endpoint.problems)
    assert any("reused" in problem for problem in endpoint.problems)
