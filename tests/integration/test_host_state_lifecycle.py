"""The host state file's life: deleted or replaced while in use, after a reboot, and the replay cut-off each
start means for the tokens checked before it."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

import app.host_state as host_state_module
from app.cds.auth import ClientAuthenticator
from app.cds.clients import ClientRegistry
from app.cds.errors import ClientNotTrusted, ReplayCheckUnavailable
from app.cds.replay import HostReplayCache, MemoryReplayCache, SharedReplayCache
from app.host_state import HostState
from tests.support.tokens import clients_document

BASE = "http://gateway.test"
PATH = "/cds-services"


def authenticator(signing_key, state: HostState) -> ClientAuthenticator:
    registry = ClientRegistry.from_mapping(clients_document(signing_key, []))
    return ClientAuthenticator(registry, BASE, SharedReplayCache(HostReplayCache(state), None))


# Refused as older than the store's memory: before its start (401), or within the clock leeway after it (503).
TOO_OLD = {"issued_before_replay_memory", "replay_memory_starting"}


def reason(auth: ClientAuthenticator, token: str) -> str:
    with pytest.raises((ClientNotTrusted, ReplayCheckUnavailable)) as refused:
        auth.authenticate(f"Bearer {token}", PATH)
    return refused.value.reason


def test_every_thread_follows_a_file_deleted_while_in_use_with_no_error(tmp_path):
    path = tmp_path / "h.db"
    state = HostState(path)
    cache = HostReplayCache(state)
    cache.first_use("warm", 60)
    path.unlink()  # the -wal and -shm stay, as when an operator removes the file alone

    def use(_):
        return cache.first_use(str(uuid.uuid4()), 60)

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(use, range(32)))
    assert state.read("SELECT count(*) FROM jti") == [(32,)], "all on the new file, which has its tables"


def test_a_token_used_before_the_file_was_replaced_is_refused_by_old_and_new_processes(tmp_path, signing_key):
    path = tmp_path / "h.db"
    old_worker = authenticator(signing_key, HostState(path))
    token = signing_key.token(BASE + PATH, iat=int(time.time()) + 5)  # a client clock 5 s ahead: within leeway
    old_worker.authenticate(f"Bearer {token}", PATH)
    path.unlink()
    new_worker = authenticator(signing_key, HostState(path))  # a worker started after the deletion
    assert reason(new_worker, token) in TOO_OLD
    assert reason(old_worker, token) in {*TOO_OLD, "replayed_jti"}


def test_a_token_used_before_every_state_file_was_deleted_is_refused_after_a_restart(tmp_path, signing_key):
    path = tmp_path / "h.db"
    token = signing_key.token(BASE + PATH, iat=int(time.time()) + 5)
    authenticator(signing_key, HostState(path)).authenticate(f"Bearer {token}", PATH)
    for leftover in tmp_path.glob("h.db*"):  # the service stopped, then `rm h.db*`
        leftover.unlink()
    assert reason(authenticator(signing_key, HostState(path)), token) in TOO_OLD


def test_the_first_file_ever_made_refuses_nothing(tmp_path, signing_key):
    auth = authenticator(signing_key, HostState(tmp_path / "h.db"))
    assert auth.authenticate(f"Bearer {signing_key.token(BASE + PATH)}", PATH)


def test_after_a_reboot_the_file_starts_anew(tmp_path, monkeypatch):
    path = tmp_path / "h.db"
    assert HostState(path).started_at == 0.0
    boot_id = tmp_path / "boot_id"
    boot_id.write_text(str(uuid.uuid4()) + "\n")
    monkeypatch.setattr(host_state_module, "_BOOT_ID_FILE", boot_id)
    rebooted = time.time()
    assert HostState(path).started_at >= rebooted, "committed rows may be lost (synchronous=OFF)"
    assert HostState(path).started_at == HostState(path).started_at, "only the first open after the boot"


def test_a_check_answers_the_start_of_the_file_it_was_recorded_in(tmp_path):
    path = tmp_path / "h.db"
    cache = HostReplayCache(HostState(path))
    assert tuple(cache.check("a", 60)) == (True, 0.0)
    path.unlink()
    replaced = time.time()
    first_use, since = cache.check("a", 60)
    assert first_use and since >= replaced


class _SlowDrip:
    """A JWKS URL that answers 200 and then one byte every 50 ms."""

    def __init__(self):
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}/jwks.json"
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self._socket.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        while not self._stop.wait(0.05):
            try:
                conn.sendall(b" ")
            except OSError:
                break
        conn.close()

    def close(self) -> None:
        self._stop.set()
        self._socket.close()


def test_a_jwks_url_that_drips_bytes_is_given_up_at_the_deadline(signing_key):
    drip = _SlowDrip()
    try:
        document = clients_document(signing_key, [])
        document["clients"][0].pop("jwks")
        document["clients"][0]["jwks_url"] = drip.url
        registry = ClientRegistry.from_mapping(document)
        auth = ClientAuthenticator(registry, BASE, MemoryReplayCache(), http_timeout=(0.5, 0.5))
        began = time.monotonic()
        assert reason(auth, signing_key.token(BASE + PATH)) == "jwks_unavailable"
        assert time.monotonic() - began < 2.5, "the connect and read timeouts bound the whole fetch"
    finally:
        drip.close()
