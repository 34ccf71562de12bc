"""SMART discovery without a real EHR: the cache's bounds (one fetch at a time, failures kept, a budget per
allowlist entry), what an https EHR's configuration must hold, and the sealed pending launch."""

from __future__ import annotations

import threading

import pytest
import requests
import responses
from cryptography.fernet import Fernet

from app.cds.clients import FhirBase
from app.smart.launch import (
    DISCOVERY_MAX_BYTES,
    DiscoveryCache,
    DiscoveryFailed,
    PkceUnsupported,
    SmartConfiguration,
    TooManyDiscoveries,
    fetch_configuration,
)
from app.smart.sessions import PendingLaunchSeal, SessionStore
from tests.support.assertions import wait_for
from tests.support.clock import FakeClock

ISS = "https://ehr.example.org/fhir"
WELL_KNOWN = ISS + "/.well-known/smart-configuration"
BASE = FhirBase(ISS, ISS)
CONFIG = SmartConfiguration("https://ehr.example.org/authorize", "https://ehr.example.org/token", frozenset({"S256"}))


class Fetches:
    """A fetch function that counts its calls and answers ``answer`` (or raises it)."""

    def __init__(self, answer=CONFIG):
        self.calls = 0
        self.answer = answer

    def __call__(self) -> SmartConfiguration:
        self.calls += 1
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


# ---- the cache ------------------------------------------------------------------------------------------------


def test_concurrent_launches_wait_for_the_one_fetch_in_flight():
    cache = DiscoveryCache()
    entered, release = threading.Event(), threading.Event()
    calls = []

    def slow_fetch():
        calls.append(1)
        entered.set()
        assert release.wait(5)
        return CONFIG

    answers: list = []
    threads = [threading.Thread(target=lambda: answers.append(cache.get(BASE, slow_fetch, wait_s=5))) for _ in range(8)]
    threads[0].start()
    assert entered.wait(5)
    for thread in threads[1:]:
        thread.start()
    wait_for(lambda: cache.waiting(BASE) == 7, "the launches are not all waiting for the fetch")
    release.set()
    for thread in threads:
        thread.join(5)
    assert len(calls) == 1 and answers == [CONFIG] * 8


def test_a_configuration_is_kept_for_its_ttl_then_read_again():
    clock = FakeClock()
    cache, fetch = DiscoveryCache(ttl_s=300, clock=clock), Fetches()
    for _ in range(50):
        assert cache.get(BASE, fetch, wait_s=1) == CONFIG
    clock.advance(301)
    cache.get(BASE, fetch, wait_s=1)
    assert fetch.calls == 2


def test_a_failure_is_shown_again_without_asking_until_its_ttl_passes():
    clock = FakeClock()
    cache = DiscoveryCache(failure_ttl_s=30, clock=clock)
    fetch = Fetches(DiscoveryFailed("The EHR's SMART configuration at x answered HTTP 500."))
    for _ in range(50):
        with pytest.raises(DiscoveryFailed, match="answered HTTP 500"):
            cache.get(BASE, fetch, wait_s=1)
    assert fetch.calls == 1
    clock.advance(31)
    fetch.answer = CONFIG
    assert cache.get(BASE, fetch, wait_s=1) == CONFIG
    assert fetch.calls == 2


def test_bases_on_many_ports_of_one_entry_cost_at_most_the_budget_a_minute():
    clock = FakeClock()
    cache, fetch = DiscoveryCache(fetches_per_minute=10, clock=clock), Fetches()
    entry = "http://localhost:*"
    for port in range(1000, 1010):
        cache.get(FhirBase(f"http://localhost:{port}", entry), fetch, wait_s=1)
    with pytest.raises(TooManyDiscoveries, match="not contacted"):
        cache.get(FhirBase("http://localhost:2000", entry), fetch, wait_s=1)
    assert cache.get(FhirBase("http://localhost:1000", entry), fetch, wait_s=1) == CONFIG  # cached: no fetch
    assert cache.get(FhirBase(ISS, ISS), fetch, wait_s=1) == CONFIG  # another entry has its own budget
    assert fetch.calls == 11
    clock.advance(61)
    cache.get(FhirBase("http://localhost:2000", entry), fetch, wait_s=1)
    assert fetch.calls == 12


def test_an_unexpected_error_caches_nothing_and_frees_the_base():
    cache = DiscoveryCache()
    with pytest.raises(RuntimeError):
        cache.get(BASE, Fetches(RuntimeError("bug")), wait_s=1)
    assert cache.get(BASE, Fetches(), wait_s=1) == CONFIG


def test_the_cache_holds_at_most_max_entries():
    cache = DiscoveryCache(max_entries=3, fetches_per_minute=100)
    for port in range(10):
        cache.get(FhirBase(f"http://localhost:{port}", "http://localhost:*"), Fetches(), wait_s=1)
    assert len(cache._entries) == 3


# ---- what an https EHR's configuration must hold -----------------------------------------------------------------


def document(**changes) -> dict:
    body = {
        "issuer": "https://ehr.example.org",
        "authorization_endpoint": "https://ehr.example.org/authorize",
        "token_endpoint": "https://ehr.example.org/token",
        "jwks_uri": "https://ehr.example.org/jwks",
        "code_challenge_methods_supported": ["S256"],
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def fetch() -> SmartConfiguration:
    return fetch_configuration(ISS, requests.Session(), 2.0)


@responses.activate
def test_a_good_configuration_is_read():
    responses.get(WELL_KNOWN, json=document())
    config = fetch()
    assert (config.authorization_endpoint, config.token_endpoint) == (
        "https://ehr.example.org/authorize",
        "https://ehr.example.org/token",
    )


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"token_endpoint": "http://ehr.example.org/token"}, "has no usable token_endpoint (not an https URL)"),
        (
            {"authorization_endpoint": "https://user@ehr.example.org/a"},
            "has no usable authorization_endpoint (not an https",
        ),
        ({"authorization_endpoint": "javascript:alert(1)"}, "has no usable authorization_endpoint (not an https URL)"),
        ({"authorization_endpoint": ["https://ehr.example.org/a"]}, "has no usable authorization_endpoint"),
        ({"jwks_uri": "/jwks"}, "has no usable jwks_uri (not an https URL)"),
        ({"token_endpoint": None}, "has no token_endpoint"),
        ({"authorization_endpoint": None}, "has no authorization_endpoint"),
    ],
)
@responses.activate
def test_each_bad_member_is_named(changes, problem):
    responses.get(WELL_KNOWN, json=document(**changes))
    with pytest.raises(DiscoveryFailed) as failure:
        fetch()
    assert problem in failure.value.message and WELL_KNOWN in failure.value.message
    assert "try again later" not in failure.value.message.lower()


@pytest.mark.parametrize("methods", [None, "S256", ["plain"], {"S256": True}, 256])
@responses.activate
def test_a_configuration_without_s256_in_a_list_is_refused(methods):
    responses.get(WELL_KNOWN, json=document(code_challenge_methods_supported=methods))
    with pytest.raises(PkceUnsupported, match="does not list S256"):
        fetch()


@responses.activate
def test_a_configuration_larger_than_the_cap_is_refused():
    responses.get(WELL_KNOWN, body=b" " * (DISCOVERY_MAX_BYTES + 1), content_type="application/json")
    with pytest.raises(DiscoveryFailed, match="is larger than 256 KB"):
        fetch()


@responses.activate
def test_a_tls_failure_is_named():
    responses.get(WELL_KNOWN, body=requests.exceptions.SSLError("certificate verify failed"))
    with pytest.raises(DiscoveryFailed, match="could not be reached securely"):
        fetch()


# ---- the sealed pending launch ---------------------------------------------------------------------------------

PENDING = {"state": "s" * 43, "code_verifier": "v" * 86, "iss": ISS, "token_endpoint": "https://ehr.example.org/t"}


def test_a_sealed_launch_opens_with_its_key_and_hides_the_verifier():
    seal = PendingLaunchSeal(Fernet(Fernet.generate_key()), ttl_s=600)
    sealed = seal.seal(PENDING)
    assert PENDING["code_verifier"] not in sealed and PENDING["state"] not in sealed
    assert seal.open(sealed) == PENDING


def test_a_sealed_launch_does_not_open_when_changed_old_or_sealed_elsewhere():
    key = Fernet(Fernet.generate_key())
    seal = PendingLaunchSeal(key, ttl_s=600)
    sealed = seal.seal(PENDING, now=10_000)
    assert seal.open(sealed, now=10_600) == PENDING
    assert seal.open(sealed, now=10_601) is None
    assert seal.open(sealed[:-4] + "AAAA", now=10_000) is None
    assert seal.open("ü" + sealed, now=10_000) is None
    assert PendingLaunchSeal(Fernet(Fernet.generate_key()), 600).open(sealed, now=10_000) is None
    session_state = SessionStore(None, key, 60)._seal({"pending": PENDING})  # same key, another purpose
    assert seal.open(session_state) is None
