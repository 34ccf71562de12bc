"""Client JWT authentication (R-29..R-36): what is accepted, and every way a token must be refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from werkzeug import Response

from app.cds.auth import ClientAuthenticator, Principal
from app.cds.clients import ClientRegistry
from app.cds.errors import ClientNotTrusted, ReplayCheckUnavailable
from app.cds.replay import Check, MemoryReplayCache
from app.clock import SYSTEM_CLOCK, Clock
from tests.support.clock import FakeClock

KEYS = Path(__file__).resolve().parents[2] / "fixtures" / "keys"
BASE = "https://cds.example.org"
DISCOVERY = "/cds-services"
INLINE_ISS = "https://ehr.example.org"
URL_ISS = "https://ehr-remote.example.org"
CLIENT_JWKS = json.loads((KEYS / "test-client.jwks.json").read_text())
FOREIGN_JWKS = json.loads((KEYS / "foreign.jwks.json").read_text())
ES_KID, RS_KID = (next(k["kid"] for k in CLIENT_JWKS["keys"] if k["alg"] == alg) for alg in ("ES384", "RS384"))
FOREIGN_KID = FOREIGN_JWKS["keys"][0]["kid"]


def private_key(name: str):
    return serialization.load_pem_private_key((KEYS / name).read_bytes(), password=None)


ES_KEY = private_key("test-client-es384.pem")
RS_KEY = private_key("test-client-rs384.pem")
FOREIGN_KEY = private_key("foreign-es384.pem")


def jwks_with(*kids: str) -> dict:
    return {"keys": [k for k in CLIENT_JWKS["keys"] if k["kid"] in kids]}


def claims(iss: str = INLINE_ISS, path: str = DISCOVERY, lifetime: int = 300, **overrides) -> dict:
    now = int(time.time())
    payload = {"iss": iss, "aud": BASE + path, "iat": now, "exp": now + lifetime, "jti": str(uuid.uuid4())}
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


def token(key=ES_KEY, alg: str = "ES384", kid: str | None = ES_KID, headers: dict | None = None, **claim_args):
    header = {"typ": "JWT", **({"kid": kid} if kid else {}), **(headers or {})}
    return jwt.encode(claims(**claim_args), key, alg, headers=header)


def token_keeping_nulls(key=ES_KEY, kid: str = ES_KID, iss: str = INLINE_ISS, **overrides) -> str:
    """A signed token whose claims are ``claims()`` with ``overrides`` as given, JSON nulls included."""
    return jwt.encode({**claims(iss=iss), **overrides}, key, "ES384", headers={"typ": "JWT", "kid": kid})


def hand_made(header: dict, payload: dict, sign=lambda signing_input: b"") -> str:
    """A compact JWS built without PyJWT, for the algorithms PyJWT rightly refuses to produce."""

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(payload).encode())
    return (signing_input + b"." + b64(sign(signing_input))).decode()


def bearer(jwt_token: str) -> str:
    return f"Bearer {jwt_token}"


@pytest.fixture
def registry() -> ClientRegistry:
    return ClientRegistry.from_mapping(
        {
            "clients": [
                {"iss": INLINE_ISS, "jwks": CLIENT_JWKS, "tenant": "north"},
                {"iss": "https://other.example.org", "jwks": FOREIGN_JWKS},
            ]
        }
    )


@pytest.fixture
def authenticator(registry) -> ClientAuthenticator:
    return ClientAuthenticator(registry, BASE, MemoryReplayCache())


def rejection(authenticator: ClientAuthenticator, header: str | None, path: str = DISCOVERY) -> str:
    with pytest.raises(ClientNotTrusted) as error:
        authenticator.authenticate(header, path)
    return error.value.reason


class JwksServer:
    """A real local HTTP server publishing a client's JWK Set, which a test can rotate."""

    def __init__(self, httpserver, jwks: dict):
        self.jwks = jwks
        self.url = httpserver.url_for("/jwks.json")
        self._httpserver = httpserver
        httpserver.expect_request("/jwks.json").respond_with_handler(
            lambda request: Response(json.dumps(self.jwks), content_type="application/json")
        )

    @property
    def requests(self) -> int:
        return sum(1 for request, _ in self._httpserver.log if request.path == "/jwks.json")


def remote_authenticator(
    jwks_url: str, floor: float = 60, timeout=(0.5, 0.5), clock: Clock = SYSTEM_CLOCK
) -> ClientAuthenticator:
    registry = ClientRegistry.from_mapping({"clients": [{"iss": URL_ISS, "jwks_url": jwks_url}]})
    return ClientAuthenticator(
        registry, BASE, MemoryReplayCache(), jwks_refetch_floor_seconds=floor, http_timeout=timeout, clock=clock
    )


# Accepted tokens


def test_valid_es384_token_is_accepted(authenticator):
    signed = token()
    principal = authenticator.authenticate(bearer(signed), DISCOVERY)
    assert isinstance(principal, Principal)
    assert principal.iss == INLINE_ISS
    assert principal.client.iss == INLINE_ISS
    assert principal.jti == jwt.decode(signed, options={"verify_signature": False})["jti"]


def test_valid_rs384_token_is_accepted(authenticator):
    principal = authenticator.authenticate(bearer(token(RS_KEY, "RS384", RS_KID)), DISCOVERY)
    assert principal.iss == INLINE_ISS


@pytest.mark.parametrize("path", ["/cds-services", "/cds-services/cardiovascular-risk", "/cds-services/x/feedback"])
def test_token_whose_aud_is_the_invoked_endpoint_is_accepted(authenticator, path):
    assert authenticator.authenticate(bearer(token(path=path)), path).iss == INLINE_ISS


def test_public_base_url_with_a_trailing_slash_still_matches_aud(registry):
    authenticator = ClientAuthenticator(registry, BASE + "/", MemoryReplayCache())
    assert authenticator.authenticate(bearer(token()), DISCOVERY)


def test_aud_array_containing_the_endpoint_is_accepted(authenticator):
    signed = token(aud=["https://elsewhere.example/cds-services", BASE + DISCOVERY])
    assert authenticator.authenticate(bearer(signed), DISCOVERY)


def test_iat_half_a_second_in_the_future_is_accepted(authenticator):
    ahead = time.time() + 0.5
    assert authenticator.authenticate(bearer(token(iat=ahead, exp=int(ahead) + 300)), DISCOVERY)


def test_token_expired_within_the_leeway_is_accepted(authenticator):
    now = int(time.time())
    assert authenticator.authenticate(bearer(token(iat=now - 300, exp=now - 2)), DISCOVERY)


def test_bearer_scheme_is_case_insensitive(authenticator):
    assert authenticator.authenticate(f"bearer  {token()}", DISCOVERY)


def test_typ_is_compared_case_insensitively_and_may_be_absent(authenticator):
    assert authenticator.authenticate(bearer(token(headers={"typ": "jwt"})), DISCOVERY)
    no_typ = jwt.encode(claims(), ES_KEY, "ES384", headers={"kid": ES_KID, "typ": None})
    assert "typ" not in jwt.get_unverified_header(no_typ)
    assert authenticator.authenticate(bearer(no_typ), DISCOVERY)


# Algorithms and keys


def test_alg_none_is_rejected(authenticator):
    unsigned = hand_made({"alg": "none", "typ": "JWT", "kid": ES_KID}, claims())
    assert rejection(authenticator, bearer(unsigned)) == "alg_not_allowed"


@pytest.mark.parametrize(("kid", "alg"), [(RS_KID, "HS256"), (ES_KID, "HS256"), (RS_KID, "HS384")])
def test_hs256_signed_with_public_key_is_rejected(authenticator, kid, alg):
    public = RS_KEY if kid == RS_KID else ES_KEY
    pem = public.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384}[alg]
    forged = hand_made(
        {"alg": alg, "typ": "JWT", "kid": kid}, claims(), lambda data: hmac.new(pem, data, digest).digest()
    )
    assert rejection(authenticator, bearer(forged)) == "alg_not_allowed"


def test_signature_by_a_foreign_key_with_a_trusted_kid_is_rejected(authenticator):
    assert rejection(authenticator, bearer(token(FOREIGN_KEY, "ES384", ES_KID))) == "bad_signature"


def test_es384_token_naming_the_rsa_key_is_not_verified_with_it(authenticator):
    assert rejection(authenticator, bearer(token(FOREIGN_KEY, "ES384", RS_KID))) == "alg_does_not_match_key"


def test_rs256_token_on_a_key_pinned_to_rs384_is_rejected(authenticator):
    assert rejection(authenticator, bearer(token(RS_KEY, "RS256", RS_KID))) == "alg_does_not_match_key"


def test_rsa_key_without_alg_verifies_rs384_and_ps384(authenticator):
    jwk = {k: v for k, v in jwks_with(RS_KID)["keys"][0].items() if k != "alg"}
    registry = ClientRegistry.from_mapping({"clients": [{"iss": INLINE_ISS, "jwks": {"keys": [jwk]}}]})
    lenient = ClientAuthenticator(registry, BASE, MemoryReplayCache())
    assert lenient.authenticate(bearer(token(RS_KEY, "RS384", RS_KID)), DISCOVERY)
    assert lenient.authenticate(bearer(token(RS_KEY, "PS384", RS_KID)), DISCOVERY)
    assert rejection(lenient, bearer(token(FOREIGN_KEY, "ES384", RS_KID))) == "alg_does_not_match_key"


@pytest.mark.parametrize(
    ("alg", "make_key", "to_jwk"),
    [
        ("ES256", lambda: ec.generate_private_key(ec.SECP256R1()), ECAlgorithm.to_jwk),
        ("ES512", lambda: ec.generate_private_key(ec.SECP521R1()), ECAlgorithm.to_jwk),
        ("PS512", lambda: rsa.generate_private_key(65537, 2048), RSAAlgorithm.to_jwk),
        ("EdDSA", ed25519.Ed25519PrivateKey.generate, OKPAlgorithm.to_jwk),
    ],
)
def test_other_asymmetric_algorithms_are_accepted(alg, make_key, to_jwk):
    key = make_key()
    jwk = {**json.loads(to_jwk(key.public_key())), "kid": "k1", "alg": alg}
    registry = ClientRegistry.from_mapping({"clients": [{"iss": INLINE_ISS, "jwks": {"keys": [jwk]}}]})
    authenticator = ClientAuthenticator(registry, BASE, MemoryReplayCache())
    assert authenticator.authenticate(bearer(token(key, alg, "k1")), DISCOVERY)


def test_unknown_kid_is_rejected(authenticator):
    assert rejection(authenticator, bearer(token(kid="no-such-kid"))) == "unknown_kid"


def test_key_of_another_trusted_client_is_not_accepted_for_this_issuer(authenticator):
    borrowed = token(FOREIGN_KEY, "ES384", FOREIGN_KID, iss=INLINE_ISS)
    assert rejection(authenticator, bearer(borrowed)) == "unknown_kid"


def test_missing_kid_is_rejected(authenticator):
    assert rejection(authenticator, bearer(token(kid=None))) == "missing_kid"


def test_typ_other_than_jwt_is_rejected(authenticator):
    assert rejection(authenticator, bearer(token(headers={"typ": "at+jwt"}))) == "bad_typ"


# Claims


def test_wrong_aud_is_rejected(authenticator):
    assert rejection(authenticator, bearer(token(path="/cds-services/other")), DISCOVERY) == "wrong_audience"


def test_aud_on_another_host_is_rejected(authenticator):
    signed = token(aud="https://evil.example/cds-services")
    assert rejection(authenticator, bearer(signed)) == "wrong_audience"


def test_aud_array_without_the_endpoint_is_rejected(authenticator):
    signed = token(aud=[BASE + "/cds-services/x", "https://elsewhere.example/cds-services"])
    assert rejection(authenticator, bearer(signed)) == "wrong_audience"


def test_expired_token_is_rejected(authenticator):
    now = int(time.time())
    assert rejection(authenticator, bearer(token(iat=now - 400, exp=now - 60))) == "expired"


def test_iat_far_in_the_future_is_rejected(authenticator):
    now = int(time.time())
    assert rejection(authenticator, bearer(token(iat=now + 120, exp=now + 400))) == "issued_in_the_future"


NOT_A_NUMERIC_DATE = [
    pytest.param(str, id="numeric-string"),  # PyJWT int()s it: accepted before
    pytest.param(lambda good: True, id="true"),
    pytest.param(lambda good: False, id="false"),
    pytest.param(lambda good: None, id="null"),
    pytest.param(lambda good: {"value": good}, id="object"),
    pytest.param(lambda good: [good], id="array"),
    pytest.param(lambda good: float("nan"), id="NaN"),  # Python's JSON parser accepts NaN
    pytest.param(lambda good: 10**400, id="huge-integer"),  # float() of it failed after verification: a 500
]


@pytest.mark.parametrize("value", NOT_A_NUMERIC_DATE)
@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
def test_time_claim_that_is_not_a_json_number_is_rejected(authenticator, claim, value):
    now = int(time.time())
    good = {"exp": now + 300, "iat": now, "nbf": now - 10}[claim]
    assert rejection(authenticator, bearer(token_keeping_nulls(**{claim: value(good)}))) == f"invalid_{claim}"


def test_string_exp_far_in_the_future_is_rejected_as_not_a_number(authenticator):
    assert rejection(authenticator, bearer(token_keeping_nulls(exp="9999999999"))) == "invalid_exp"


def test_time_claims_with_fractions_of_a_second_are_accepted(authenticator):
    now = time.time()
    assert authenticator.authenticate(bearer(token_keeping_nulls(iat=now, nbf=now - 10.5, exp=now + 299.5)), DISCOVERY)


@pytest.mark.parametrize("claim", ["aud", "exp", "iat", "jti"])
def test_token_missing_a_required_claim_is_rejected(authenticator, claim):
    assert rejection(authenticator, bearer(token(**{claim: None}))) == f"missing_{claim}"


def test_missing_jti_is_rejected(authenticator):
    assert rejection(authenticator, bearer(token(jti=None))) == "missing_jti"


def test_empty_jti_is_rejected(authenticator):
    assert rejection(authenticator, bearer(token(jti=""))) == "invalid_jti"


def test_missing_iss_is_rejected_as_an_unknown_issuer(authenticator):
    assert rejection(authenticator, bearer(token(iss=None))) == "unknown_issuer"


def test_unknown_issuer_is_rejected(authenticator):
    signed = token(FOREIGN_KEY, "ES384", FOREIGN_KID, iss="https://stranger.example")
    assert rejection(authenticator, bearer(signed)) == "unknown_issuer"


def test_token_living_longer_than_an_hour_is_rejected(authenticator):
    assert rejection(authenticator, bearer(token(lifetime=2 * 3600))) == "lifetime_too_long"


def test_replayed_jti_is_rejected(authenticator):
    signed = token()
    authenticator.authenticate(bearer(signed), DISCOVERY)
    assert rejection(authenticator, bearer(signed)) == "replayed_jti"


def test_same_jti_from_two_issuers_is_not_a_replay(authenticator):
    jti = str(uuid.uuid4())
    assert authenticator.authenticate(bearer(token(jti=jti)), DISCOVERY)
    other = token(FOREIGN_KEY, "ES384", FOREIGN_KID, iss="https://other.example.org", jti=jti)
    assert authenticator.authenticate(bearer(other), DISCOVERY)


def test_replay_entry_lives_for_the_remaining_lifetime_plus_leeway(registry):
    recorded = []

    class Recording:
        def check(self, key, ttl_seconds):
            recorded.append(ttl_seconds)
            return Check(True, float("-inf"))

    ClientAuthenticator(registry, BASE, Recording(), leeway_seconds=5).authenticate(
        bearer(token(lifetime=120)), DISCOVERY
    )
    assert 123 <= recorded[0] <= 125


def test_a_token_issued_before_the_replay_store_remembers_is_refused(registry):
    class Restarted(MemoryReplayCache):
        """A store whose memory begins now, as a Redis restarted without its data."""

        remembers_since = time.time() - 10

    authenticator = ClientAuthenticator(registry, BASE, Restarted(), leeway_seconds=5)
    now = int(time.time())
    # The cut-off is ceil(since) + leeway, about now - 5. A token issued before the store began remembering is
    # refused for good; one issued within the leeway after it may have been used just before the restart by a
    # client whose clock runs ahead, or be a fresh call: refused too, as a 503 saying when to come again.
    assert rejection(authenticator, bearer(token(iat=now - 12, exp=now + 240))) == "issued_before_replay_memory"
    with pytest.raises(ReplayCheckUnavailable) as starting:
        authenticator.authenticate(bearer(token(iat=now - 6, exp=now + 240)), DISCOVERY)
    assert starting.value.reason == "replay_memory_starting" and 1 <= starting.value.retry_after <= 2
    assert authenticator.authenticate(bearer(token(iat=now - 4, exp=now + 240)), DISCOVERY)


# Tenant


def test_tenant_comes_from_the_client_configuration(authenticator):
    assert authenticator.authenticate(bearer(token()), DISCOVERY).tenant == "north"
    assert authenticator.authenticate(bearer(token(tenant="north")), DISCOVERY).tenant == "north"


def test_tenant_claim_contradicting_the_configured_tenant_is_rejected(authenticator):
    assert rejection(authenticator, bearer(token(tenant="south"))) == "tenant_mismatch"


def test_tenant_claim_is_used_when_the_client_has_none_configured(authenticator):
    other = token(FOREIGN_KEY, "ES384", FOREIGN_KID, iss="https://other.example.org", tenant="east")
    assert authenticator.authenticate(bearer(other), DISCOVERY).tenant == "east"


@pytest.mark.parametrize(
    "tenant",
    [5, True, {"id": "east"}, ["east"], "", "x" * 201, "east\u0000", "east\n"],
    ids=["number", "true", "object", "array", "empty", "201-chars", "nul", "newline"],
)
def test_tenant_claim_that_is_not_a_short_printable_string_is_rejected(authenticator, tenant):
    other = token_keeping_nulls(FOREIGN_KEY, FOREIGN_KID, iss="https://other.example.org", tenant=tenant)
    assert rejection(authenticator, bearer(other)) == "invalid_tenant"


def test_null_tenant_claim_counts_as_absent(authenticator):
    other = token_keeping_nulls(FOREIGN_KEY, FOREIGN_KID, iss="https://other.example.org", tenant=None)
    assert authenticator.authenticate(bearer(other), DISCOVERY).tenant is None


# The Authorization header


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc.def.ghi", "Bearer a b", "BearerX abc"],
)
def test_missing_or_non_bearer_authorization_header_is_rejected(authenticator, header):
    assert rejection(authenticator, header) in ("missing_authorization", "not_bearer")


@pytest.mark.parametrize("value", ["not-a-jwt", "a.b", "a.b.c", "!!!.!!!.!!!", "W10.e30.c2ln", "e30.W10.c2ln"])
def test_malformed_bearer_token_is_rejected(authenticator, value):
    assert rejection(authenticator, bearer(value)) == "malformed_token"


def test_oversized_token_is_rejected_before_parsing(authenticator):
    assert rejection(authenticator, bearer("a" * 20_000)) == "token_too_large"


def test_rejection_is_logged_with_reason_and_iss_but_never_the_token(authenticator, caplog):
    signed = token(path="/cds-services/other")
    with caplog.at_level(logging.DEBUG, logger="app.cds"):
        rejection(authenticator, bearer(signed))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "wrong_audience" in warnings[0].getMessage() and INLINE_ISS in warnings[0].getMessage()
    for part in signed.split("."):
        assert part not in caplog.text


# Keys from a jwks_url (served by a real local HTTP server)


def test_jwks_url_keys_are_fetched_once_and_cached(httpserver):
    server = JwksServer(httpserver, CLIENT_JWKS)
    authenticator = remote_authenticator(server.url)
    for _ in range(3):
        assert authenticator.authenticate(bearer(token(iss=URL_ISS)), DISCOVERY).iss == URL_ISS
    assert server.requests == 1


def test_key_rotation_is_picked_up_by_refetching_the_jwks(httpserver):
    server = JwksServer(httpserver, jwks_with(ES_KID))
    authenticator = remote_authenticator(server.url, floor=0)
    assert authenticator.authenticate(bearer(token(iss=URL_ISS)), DISCOVERY)
    server.jwks = jwks_with(ES_KID, RS_KID)
    assert authenticator.authenticate(bearer(token(RS_KEY, "RS384", RS_KID, iss=URL_ISS)), DISCOVERY)
    assert server.requests == 2


def test_unknown_kids_do_not_refetch_the_jwks_more_often_than_the_floor(httpserver):
    server = JwksServer(httpserver, jwks_with(ES_KID))
    authenticator = remote_authenticator(server.url, floor=60)
    assert authenticator.authenticate(bearer(token(iss=URL_ISS)), DISCOVERY)
    for _ in range(5):
        assert rejection(authenticator, bearer(token(kid=f"unknown-{uuid.uuid4()}", iss=URL_ISS))) == "unknown_kid"
    assert server.requests == 1


def test_unknown_kid_refetches_again_once_the_floor_has_passed(httpserver):
    server = JwksServer(httpserver, jwks_with(ES_KID))
    clock = FakeClock()
    authenticator = remote_authenticator(server.url, floor=60, clock=clock)
    assert authenticator.authenticate(bearer(token(iss=URL_ISS)), DISCOVERY)
    server.jwks = jwks_with(ES_KID, RS_KID)
    rotated = token(RS_KEY, "RS384", RS_KID, iss=URL_ISS)
    assert rejection(authenticator, bearer(rotated)) == "unknown_kid"
    clock.advance(59.9)
    assert rejection(authenticator, bearer(token(RS_KEY, "RS384", RS_KID, iss=URL_ISS))) == "unknown_kid"
    assert server.requests == 1
    clock.advance(0.1)
    assert authenticator.authenticate(bearer(token(RS_KEY, "RS384", RS_KID, iss=URL_ISS)), DISCOVERY)
    assert server.requests == 2


def test_cached_jwks_is_fetched_again_once_an_hour_old(httpserver):
    server = JwksServer(httpserver, jwks_with(ES_KID))
    clock = FakeClock()
    authenticator = remote_authenticator(server.url, floor=60, clock=clock)
    assert authenticator.authenticate(bearer(token(iss=URL_ISS)), DISCOVERY)
    clock.advance(3599)
    assert authenticator.authenticate(bearer(token(iss=URL_ISS)), DISCOVERY)
    assert server.requests == 1
    server.jwks = jwks_with(RS_KID)  # the client retired its ES key meanwhile
    clock.advance(1)
    assert rejection(authenticator, bearer(token(iss=URL_ISS))) == "unknown_kid"
    assert server.requests == 2


def test_jku_equal_to_the_configured_jwks_url_is_accepted(httpserver):
    server = JwksServer(httpserver, CLIENT_JWKS)
    signed = token(iss=URL_ISS, headers={"jku": server.url})
    assert remote_authenticator(server.url).authenticate(bearer(signed), DISCOVERY)


def test_jku_mismatch_is_rejected_without_fetching_it(httpserver):
    server = JwksServer(httpserver, CLIENT_JWKS)
    attacker = httpserver.url_for("/attacker/jwks.json")
    signed = token(FOREIGN_KEY, "ES384", FOREIGN_KID, iss=URL_ISS, headers={"jku": attacker})
    assert rejection(remote_authenticator(server.url), bearer(signed)) == "jku_mismatch"
    assert len(httpserver.log) == 0


def test_jku_is_ignored_for_a_client_with_inline_jwks(httpserver, authenticator):
    attacker = JwksServer(httpserver, FOREIGN_JWKS)
    forged = token(FOREIGN_KEY, "ES384", FOREIGN_KID, headers={"jku": attacker.url})
    assert rejection(authenticator, bearer(forged)) == "unknown_kid"
    genuine = token(headers={"jku": attacker.url})
    assert authenticator.authenticate(bearer(genuine), DISCOVERY)
    assert attacker.requests == 0


def test_jwks_url_down_gives_client_not_trusted():
    authenticator = remote_authenticator("http://127.0.0.1:1/jwks.json")
    assert rejection(authenticator, bearer(token(iss=URL_ISS))) == "jwks_unavailable"


@pytest.mark.parametrize(
    "answer",
    [
        Response("oops", status=500),
        Response("<html>login</html>", content_type="text/html"),
        Response(json.dumps({"keys": "none"}), content_type="application/json"),
        Response(json.dumps([1, 2]), content_type="application/json"),
        Response("", status=302, headers={"Location": "/elsewhere.json"}),
        Response("[" * 100_000 + "]" * 100_000, content_type="application/json"),
    ],
    ids=["500", "html", "keys-not-a-list", "array", "redirect", "deeply-nested"],
)
def test_jwks_url_answering_garbage_gives_client_not_trusted(httpserver, answer):
    httpserver.expect_request("/jwks.json").respond_with_response(answer)
    httpserver.expect_request("/elsewhere.json").respond_with_json(CLIENT_JWKS)
    authenticator = remote_authenticator(httpserver.url_for("/jwks.json"))
    assert rejection(authenticator, bearer(token(iss=URL_ISS))) == "jwks_unavailable"


def test_oversized_jwks_gives_client_not_trusted(httpserver):
    huge = {"keys": CLIENT_JWKS["keys"], "padding": "x" * 400_000}
    httpserver.expect_request("/jwks.json").respond_with_json(huge)
    authenticator = remote_authenticator(httpserver.url_for("/jwks.json"))
    assert rejection(authenticator, bearer(token(iss=URL_ISS))) == "jwks_unavailable"


def test_slow_jwks_url_gives_client_not_trusted_within_the_timeout(httpserver):
    release, answered = threading.Event(), threading.Event()

    def slow(request):
        release.wait(10)  # answers only once the test has its verdict
        answered.set()
        return Response(json.dumps(CLIENT_JWKS), content_type="application/json")

    httpserver.expect_request("/jwks.json").respond_with_handler(slow)
    authenticator = remote_authenticator(httpserver.url_for("/jwks.json"), timeout=(0.5, 0.2))
    assert rejection(authenticator, bearer(token(iss=URL_ISS))) == "jwks_unavailable"
    assert not answered.is_set(), "the fetch waited for the slow server instead of its read timeout"
    release.set()
    answered.wait(2)  # let the server finish before the next test uses it


def test_failed_jwks_fetch_is_not_retried_before_the_floor(httpserver):
    httpserver.expect_request("/jwks.json").respond_with_data("down", status=503)
    authenticator = remote_authenticator(httpserver.url_for("/jwks.json"), floor=60)
    for _ in range(3):
        assert rejection(authenticator, bearer(token(iss=URL_ISS))) == "jwks_unavailable"
    assert len(httpserver.log) == 1


def test_known_kid_still_verifies_when_a_refetch_for_another_kid_fails(httpserver):
    server = JwksServer(httpserver, jwks_with(ES_KID))
    authenticator = remote_authenticator(server.url, floor=0)
    assert authenticator.authenticate(bearer(token(iss=URL_ISS)), DISCOVERY)
    httpserver.clear_all_handlers()
    httpserver.expect_request("/jwks.json").respond_with_data("down", status=503)
    assert rejection(authenticator, bearer(token(kid="rotated", iss=URL_ISS))) == "unknown_kid"
    assert authenticator.authenticate(bearer(token(iss=URL_ISS)), DISCOVERY)
