"""The webhook destination guard: no delivery to loopback, private or other non-public addresses."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from app.webhooks.addresses import RefusedDestination, check, refusal


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "::1",
        "10.0.0.1",
        "10.255.255.254",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.0.1",
        "169.254.169.254",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "0.0.0.0",
        "::",
        "224.0.0.251",
        "ff02::1",
        "100.64.0.1",
        "240.0.0.1",
        "2002:7f00:1::1",
    ],
)
def test_non_public_addresses_are_refused(address):
    assert refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:2800:220:1:248:1893:25c8:1946"])
def test_public_addresses_are_allowed(address):
    assert refusal(ipaddress.ip_address(address)) is None


@pytest.fixture
def no_dns(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("no DNS lookup expected")

    monkeypatch.setattr(socket, "getaddrinfo", fail)


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hook",
        "https://[::1]:8443/hook",
        "https://10.1.2.3/hook",
        "https://172.16.5.4/hook",
        "https://192.168.1.10/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[fe80::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://0.0.0.0/hook",
    ],
)
def test_ip_literal_urls_to_non_public_addresses_are_refused_without_a_lookup(url, no_dns):
    with pytest.raises(RefusedDestination, match="WEBHOOKS_ALLOW_PRIVATE"):
        check(url, allow_private=False)


def test_a_public_ip_literal_is_allowed_without_a_network_call(no_dns):
    destination = check("https://93.184.216.34/in?x=1", allow_private=False)
    assert destination.addresses == ("93.184.216.34",)
    assert destination.target == "/in?x=1"
    assert destination.host_header == "93.184.216.34"


def test_a_name_resolving_to_loopback_is_refused():
    with pytest.raises(RefusedDestination, match="loopback"):
        check("https://localhost/hook", allow_private=False)


def test_a_name_is_refused_when_any_of_its_addresses_is_private(monkeypatch):
    answers = [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 443)),
    ]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: answers)
    with pytest.raises(RefusedDestination, match="10.0.0.7"):
        check("https://hooks.example.org/in", allow_private=False)


def test_the_destination_keeps_the_checked_addresses_and_the_host_name(monkeypatch):
    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 8443))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: answers)
    destination = check("https://hooks.example.org:8443/in", allow_private=False)
    assert destination.addresses == ("93.184.216.34",)
    assert destination.host_header == "hooks.example.org:8443"


@pytest.mark.parametrize(
    "url", ["ftp://93.184.216.34/x", "file:///etc/passwd", "https://user:pw@93.184.216.34/", "//93.184.216.34/"]
)
def test_only_http_urls_without_user_info_are_accepted(url, no_dns):
    with pytest.raises(RefusedDestination, match="http"):
        check(url, allow_private=True)


def test_plain_http_needs_webhooks_allow_private(no_dns):
    with pytest.raises(RefusedDestination, match="https"):
        check("http://93.184.216.34/in", allow_private=False)
    assert check("http://93.184.216.34/in", allow_private=True).scheme == "http"


def test_allow_private_admits_loopback():
    assert check("http://127.0.0.1:9/hook", allow_private=True).addresses == ("127.0.0.1",)
