"""The signing key store: files and permissions, public-only JWKS, rotation with a grace period, stable kids."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt import PyJWK

from app.cds.clients import PRIVATE_JWK_MEMBERS
from app.smart.keys import INDEX_FILE, KeyStore, NoSigningKey, public_jwk_members, thumbprint
from tests.support.files import mode

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
PRIVATE_MEMBERS = set(PRIVATE_JWK_MEMBERS) | {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


@pytest.fixture
def store(tmp_path) -> KeyStore:
    return KeyStore(tmp_path / "instance" / "keys")


def published_kids(store: KeyStore, now: datetime) -> set[str]:
    return {jwk["kid"] for jwk in store.jwks(now)["keys"]}


def test_generate_makes_one_rs384_and_one_es384_key(store):
    kids = store.generate(now=T0)

    assert len(kids) == 2
    rs_kid, rs_key = store.signing_key("RS384")
    es_kid, es_key = store.signing_key("ES384")
    assert {rs_kid, es_kid} == set(kids)
    assert isinstance(rs_key, rsa.RSAPrivateKey) and rs_key.key_size == 2048
    assert isinstance(es_key, ec.EllipticCurvePrivateKey) and isinstance(es_key.curve, ec.SECP384R1)


def test_directory_is_0700_and_every_file_0600(store):
    store.generate(now=T0)

    assert mode(store.directory) == 0o700
    files = [p for p in store.directory.iterdir() if p.is_file()]
    assert {p.suffix for p in files} >= {".pem", ".json"}
    for path in files:
        assert mode(path) == 0o600, path.name
    assert not [p for p in files if p.name.startswith(".tmp-")], "a temporary file was left behind"


def test_an_existing_wide_directory_is_narrowed(tmp_path):
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o755)
    KeyStore(directory).generate()
    assert mode(directory) == 0o700


def test_index_records_kid_alg_created_and_retire_times(store):
    store.generate(now=T0)
    index = json.loads((store.directory / INDEX_FILE).read_text())
    assert {entry["alg"] for entry in index["keys"]} == {"RS384", "ES384"}
    for entry in index["keys"]:
        assert set(entry) == {"kid", "alg", "created_at", "retire_at"}
        assert datetime.fromisoformat(entry["created_at"]) == T0
        assert entry["retire_at"] is None


def test_jwks_has_public_members_only(store):
    store.generate(now=T0)
    document = store.jwks(T0)

    assert len(document["keys"]) == 2
    for jwk in document["keys"]:
        assert not PRIVATE_MEMBERS & set(jwk), jwk.keys()
        assert jwk["use"] == "sig"
        if jwk["alg"] == "RS384":
            assert set(jwk) == {"kid", "alg", "use", "kty", "n", "e"} and jwk["kty"] == "RSA"
        else:
            assert set(jwk) == {"kid", "alg", "use", "kty", "crv", "x", "y"}
            assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("EC", "P-384", "ES384")
        PyJWK(jwk)  # loads as a key


def test_jwks_verifies_what_the_signing_key_signs(store):
    store.generate(now=T0)
    for alg in ("RS384", "ES384"):
        kid, key = store.signing_key(alg)
        token = jwt.encode({"sub": "x"}, key, algorithm=alg, headers={"kid": kid})
        jwk = next(k for k in store.jwks(T0)["keys"] if k["kid"] == kid)
        assert jwt.decode(token, PyJWK(jwk).key, algorithms=[alg]) == {"sub": "x"}


def test_kid_is_the_rfc7638_thumbprint(store):
    store.generate(now=T0)
    for alg in ("RS384", "ES384"):
        kid, key = store.signing_key(alg)
        assert kid == thumbprint(public_jwk_members(key))


def test_rfc7638_example_thumbprint():
    """The worked example of RFC 7638 section 3.1."""
    members = {
        "kty": "RSA",
        "e": "AQAB",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCi"
        "FV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d"
        "0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-c"
        "sFCur-kEgU8awapJzKnqDKgw",
    }
    assert thumbprint(members) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_kids_and_keys_are_stable_across_reloads(store):
    store.generate(now=T0)
    again = KeyStore(store.directory)
    for alg in ("RS384", "ES384"):
        kid, key = store.signing_key(alg)
        kid2, key2 = again.signing_key(alg)
        assert kid == kid2
        assert public_jwk_members(key) == public_jwk_members(key2)
    assert again.jwks(T0) == store.jwks(T0)


def test_rotation_keeps_old_keys_published_until_retire_at_then_prunes_them(store):
    old = set(store.generate(now=T0))
    rotated = T0 + timedelta(hours=1)
    new = set(store.generate(now=rotated))

    assert old.isdisjoint(new)
    assert {store.signing_key("RS384")[0], store.signing_key("ES384")[0]} == new  # new keys sign
    retire_at = rotated + timedelta(hours=24)
    assert published_kids(store, rotated) == old | new
    assert published_kids(store, retire_at - timedelta(seconds=1)) == old | new
    assert published_kids(store, retire_at) == new  # no longer published once retire_at is reached

    store.generate(now=retire_at + timedelta(minutes=1))  # the next rotation deletes them
    index = json.loads((store.directory / INDEX_FILE).read_text())
    assert old.isdisjoint(entry["kid"] for entry in index["keys"])
    for kid in old:
        assert not (store.directory / f"{kid}.pem").exists()
    assert len(index["keys"]) == 4  # the second set is retiring, the third is active


def test_retire_time_is_not_extended_by_a_later_rotation(store):
    first = set(store.generate(now=T0))
    store.generate(now=T0 + timedelta(hours=1))
    store.generate(now=T0 + timedelta(hours=2))
    assert first.isdisjoint(published_kids(store, T0 + timedelta(hours=25)))


def test_prune_deletes_expired_keys(store):
    old = set(store.generate(now=T0))
    store.generate(now=T0)
    assert store.prune(now=T0 + timedelta(hours=24)) and not any(
        (store.directory / f"{kid}.pem").exists() for kid in old
    )


def test_a_rotation_by_another_process_is_seen_by_a_running_reader(store):
    store.generate(now=T0)
    reader = KeyStore(store.directory)
    before = reader.signing_key("ES384")[0]
    KeyStore(store.directory).generate()  # as `flask keys generate` in another process
    after = reader.signing_key("ES384")[0]
    assert after != before
    assert before in published_kids(reader, datetime.now(UTC))


def test_ensure_generates_once(store):
    assert store.ensure() is True
    kids = published_kids(store, datetime.now(UTC))
    assert store.ensure() is False
    assert KeyStore(store.directory).ensure() is False
    assert published_kids(store, datetime.now(UTC)) == kids


def test_ensure_replaces_a_set_with_an_unreadable_key(store):
    store.generate()
    kid, _ = store.signing_key("RS384")
    (store.directory / f"{kid}.pem").unlink()
    fresh = KeyStore(store.directory)
    assert fresh.ensure() is True
    assert fresh.signing_key("RS384")[0] != kid


def test_no_keys_yet(store):
    assert store.jwks() == {"keys": []}
    assert not store.directory.exists()  # reading creates nothing
    with pytest.raises(NoSigningKey):
        store.signing_key("RS384")
    with pytest.raises(NoSigningKey):
        KeyStore(store.directory).signing_key("HS256")
