"""The jti replay cache: once only, expiring, shared through Redis or this host's state file, and still working
when neither answers."""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import sqlite3
import stat
import threading
import time
import uuid
from pathlib import Path

import jwt
import pytest
import redis

from app.cds.replay import (
    CLOCK_LEEWAY_S,
    HostReplayCache,
    MemoryReplayCache,
    RedisReplayCache,
    SharedReplayCache,
    StoreUnavailable,
    make_replay_cache,
)
from app.host_state import HostState
from tests.support.assertions import wait_for
from tests.support.clock import FakeClock
from tests.support.redis_server import redis_is_up

REDIS_URL = "redis://127.0.0.1:6379/0"
CLOSED_PORT_URL = "redis://127.0.0.1:1/0"


# Skipped without Redis on a developer's machine; CI starts Redis, so there a missing server fails the run.
needs_redis = pytest.mark.skipif(not redis_is_up() and not os.environ.get("CI"), reason="no Redis on 127.0.0.1:6379")


def fresh_key() -> str:
    return f"test-{uuid.uuid4()}"


class RefusingRedis:
    """A port that accepts a connection and closes it at once (Redis down), counting the connections: how often
    the cache probed Redis."""

    def __init__(self):
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.1)
        self.url = f"redis://127.0.0.1:{self._socket.getsockname()[1]}/0"
        self._connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._socket.accept()
            except TimeoutError:
                continue
            self._connections += 1
            conn.close()

    def connections(self) -> int:
        """Connections accepted so far (a refused probe has been answered once the client call returned)."""
        return self._connections

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close()


@pytest.fixture
def refusing_redis():
    server = RefusingRedis()
    yield server
    server.close()


def test_memory_cache_accepts_a_key_once():
    cache = MemoryReplayCache()
    assert cache.first_use("a", 60) is True
    assert cache.first_use("a", 60) is False
    assert cache.first_use("b", 60) is True


def test_memory_cache_forgets_a_key_after_its_ttl():
    clock = FakeClock()
    cache = MemoryReplayCache(clock=clock)
    assert cache.first_use("a", 10)
    clock.advance(9.9)
    assert not cache.first_use("a", 10)
    clock.advance(0.2)
    assert cache.first_use("a", 10)


def test_memory_cache_purges_expired_keys_so_memory_stays_bounded():
    clock = FakeClock()
    cache = MemoryReplayCache(clock=clock)
    for i in range(1000):
        cache.first_use(f"old-{i}", 5)
    assert len(cache) == 1000
    clock.advance(6)
    cache.first_use("new", 5)
    assert len(cache) == 1
    assert len(cache._heap) == 1


def test_memory_cache_lets_exactly_one_of_many_racing_threads_win():
    cache = MemoryReplayCache()
    start = threading.Barrier(32)
    results = []

    def use():
        start.wait()
        results.append(cache.first_use("same-jti", 60))

    threads = [threading.Thread(target=use) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1


@needs_redis
def test_redis_cache_accepts_a_key_once():
    cache = RedisReplayCache(REDIS_URL)
    key = fresh_key()
    assert cache.first_use(key, 60) is True
    assert cache.first_use(key, 60) is False


@needs_redis
def test_redis_cache_is_shared_between_instances_as_between_processes():
    key = fresh_key()
    assert RedisReplayCache(REDIS_URL).first_use(key, 60)
    assert not RedisReplayCache(REDIS_URL).first_use(key, 60)


@needs_redis
def test_redis_cache_sets_the_ttl_on_the_key():
    key = fresh_key()
    RedisReplayCache(REDIS_URL).first_use(key, 42)
    ttl = redis.Redis.from_url(REDIS_URL).ttl(RedisReplayCache.PREFIX + key)
    assert 40 <= ttl <= 42


def shared(
    tmp_path, url: str | None, retry_after_seconds: float = 15.0, clock: FakeClock | None = None
) -> SharedReplayCache:
    """One process's cache: this host's file (``tmp_path``) and, with ``url``, Redis."""
    redis_cache = RedisReplayCache(url) if url else None
    if clock is None:
        return SharedReplayCache(HostReplayCache(HostState(tmp_path / "h.db")), redis_cache, retry_after_seconds)
    host = HostReplayCache(HostState(tmp_path / "h.db"), clock=clock)
    return SharedReplayCache(host, redis_cache, retry_after_seconds, clock=clock)


def test_a_down_redis_is_probed_once_per_back_off_and_replays_are_still_refused(tmp_path, refusing_redis):
    cache = shared(tmp_path, refusing_redis.url, clock=FakeClock(wall=time.time()))
    assert refusing_redis.connections() == 0, "making the cache does not connect"
    key = fresh_key()
    for expected in (True, False, False):
        assert cache.first_use(key, 60) is expected
    assert cache.first_use(fresh_key(), 60) is True
    wait_for(lambda: refusing_redis.connections() >= 1, "Redis never probed")
    assert refusing_redis.connections() == 1, "one probe, no retries, none again within the back-off"


def test_redis_is_tried_again_after_the_back_off(tmp_path, refusing_redis):
    clock = FakeClock(wall=time.time())
    cache = shared(tmp_path, refusing_redis.url, retry_after_seconds=15, clock=clock)
    cache.first_use(fresh_key(), 60)
    clock.advance(14)
    assert cache.first_use(fresh_key(), 60)
    wait_for(lambda: refusing_redis.connections() >= 1, "Redis never probed")
    assert refusing_redis.connections() == 1
    clock.advance(1)
    assert cache.first_use(fresh_key(), 60)  # this call probes Redis again
    wait_for(lambda: refusing_redis.connections() == 2, "Redis not probed again after the back-off")


def test_redis_down_is_logged_once_at_warning_not_per_call(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="app.cds.replay"):
        cache = shared(tmp_path, CLOSED_PORT_URL, retry_after_seconds=0.0)
        for _ in range(20):
            cache.first_use(fresh_key(), 60)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Redis" in warnings[0].getMessage()


@needs_redis
def test_a_worker_that_lost_redis_for_a_moment_still_shares_with_the_other_workers(tmp_path, monkeypatch):
    first, second = shared(tmp_path, REDIS_URL), shared(tmp_path, REDIS_URL)  # two workers of one host

    def timeout(*args, **kwargs):
        raise redis.TimeoutError("one slow answer")

    monkeypatch.setattr(first._redis, "_script", timeout)
    key = fresh_key()
    assert first.first_use(key, 60) is True  # recorded in the host file only
    assert second.first_use(key, 60) is False, "the other worker must see it through the host file"


@needs_redis
def test_a_token_seen_on_another_host_is_refused_here(tmp_path):
    here, elsewhere = shared(tmp_path / "here", REDIS_URL), shared(tmp_path / "elsewhere", REDIS_URL)
    key = fresh_key()
    assert elsewhere.first_use(key, 60) is True
    assert here.first_use(key, 60) is False


@needs_redis
def test_losing_redis_starts_a_new_memory_and_coming_back_needs_none(tmp_path, monkeypatch):
    clock = FakeClock(wall=time.time())
    cache = shared(tmp_path, REDIS_URL, retry_after_seconds=15, clock=clock)
    assert cache.first_use(fresh_key(), 60)
    before = cache.remembers_since
    clock.advance(1)

    def down(*args, **kwargs):
        raise redis.ConnectionError("simulated outage")

    monkeypatch.setattr(cache._redis, "_script", down)
    went_down = clock.now()
    during = fresh_key()
    assert cache.first_use(during, 60) is True
    assert cache.first_use(during, 60) is False
    # Other hosts went on recording in Redis meanwhile: tokens issued before the loss are refused (the leeway the
    # authenticator adds is taken back: fresh tokens of the next seconds still pass, see test_ai_guard).
    assert cache.remembers_since == went_down - CLOCK_LEEWAY_S - 1 > before
    monkeypatch.undo()

    clock.advance(15)
    assert cache.first_use(fresh_key(), 60) is True  # Redis used again
    assert cache.first_use(during, 60) is False, "what this host saw meanwhile is in its file"
    assert not cache._redis_down


def test_an_unusable_host_file_is_an_error_not_a_per_process_memory(tmp_path):
    state = HostState(tmp_path / "h.db")
    cache = shared(tmp_path, None)
    conn = sqlite3.connect(tmp_path / "h.db", timeout=0, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")  # another process holds the write lock for too long
    try:
        with pytest.raises(StoreUnavailable):
            cache.first_use(fresh_key(), 60)
    finally:
        conn.rollback()
    assert HostReplayCache(state).first_use(fresh_key(), 60)


def test_a_full_disk_is_an_error_the_authenticator_turns_into_a_503(tmp_path):
    state = HostState(tmp_path / "h.db")
    cache = HostReplayCache(state)
    with state.write() as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StoreUnavailable):
        for _ in range(2000):
            cache.first_use(fresh_key() * 20, 60)
    with pytest.raises(StoreUnavailable):  # and the connection is usable, not stuck in a transaction
        cache.first_use(fresh_key() * 20, 60)


def test_the_hook_answers_503_when_tokens_cannot_be_checked(make_app, signing_key, tmp_path):
    from tests.conftest import PUBLIC_BASE_URL

    app = make_app()
    client = app.test_client()
    path = tmp_path / "instance" / "host-state.db"
    holder = sqlite3.connect(path, timeout=0, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        token = signing_key.token(PUBLIC_BASE_URL + "/cds-services")
        response = client.get("/cds-services", headers={"Authorization": f"Bearer {token}"})
    finally:
        holder.rollback()
    assert response.status_code == 503
    assert response.get_json()["issue"][0]["code"] == "transient"


@needs_redis
def test_a_redis_that_lost_its_data_remembers_only_from_then_on():
    cache = RedisReplayCache(REDIS_URL)
    cache.first_use(fresh_key(), 60)
    assert cache.remembers_since < time.time()
    redis.Redis.from_url(REDIS_URL).delete(RedisReplayCache.SINCE_KEY)
    restarted = time.time()
    cache.first_use(fresh_key(), 60)
    assert restarted - 1 <= cache.remembers_since <= time.time() + 1


def test_host_cache_accepts_a_key_once_across_instances_on_the_same_file(tmp_path):
    first, second = HostReplayCache(HostState(tmp_path / "h.db")), HostReplayCache(HostState(tmp_path / "h.db"))
    key = fresh_key()
    assert first.first_use(key, 60) is True
    assert second.first_use(key, 60) is False
    assert first.first_use(key, 60) is False
    assert second.first_use(fresh_key(), 60) is True


def test_host_cache_accepts_a_key_again_once_its_time_is_up(tmp_path):
    clock = FakeClock(wall=time.time())
    cache = HostReplayCache(HostState(tmp_path / "h.db"), clock=clock)
    assert cache.first_use("a", 10)
    clock.advance(9)
    assert not cache.first_use("a", 10)
    clock.advance(2)
    assert cache.first_use("a", 10)


def test_host_cache_purges_expired_keys(tmp_path):
    state = HostState(tmp_path / "h.db")
    clock = FakeClock(wall=time.time())
    cache = HostReplayCache(state, clock=clock)
    for i in range(100):
        cache.first_use(f"old-{i}", 5)
    clock.advance(HostReplayCache.PURGE_EVERY_S + 6)
    cache.first_use("new", 5)
    assert state.read("SELECT count(*) FROM jti") == [(1,)]


def _race_for_key(path: str, key: str, start, results) -> None:
    cache = HostReplayCache(HostState(path))
    start.wait()
    results.put(cache.first_use(key, 60))


def test_host_cache_lets_exactly_one_of_many_racing_processes_win(tmp_path):
    spawn = multiprocessing.get_context("spawn")
    path, key = str(tmp_path / "h.db"), fresh_key()
    HostState(path)
    start, results = spawn.Barrier(4), spawn.Queue()
    children = [spawn.Process(target=_race_for_key, args=(path, key, start, results)) for _ in range(4)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(60)
    assert sorted(outcomes) == [False, False, False, True]


def test_a_new_host_file_remembers_only_from_its_creation(tmp_path):
    path = tmp_path / "h.db"
    first = HostState(path)
    assert first.started_at == 0, "the first file ever at a path: nothing was checked there before"
    assert HostState(path).started_at == 0, "an existing file keeps its start"
    deleted = time.time()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    assert deleted <= HostState(path).started_at <= time.time()


def test_a_damaged_host_file_is_set_aside_and_made_anew(tmp_path):
    path = tmp_path / "h.db"
    path.write_bytes(b"this is not a database" * 100)
    state = HostState(path)
    assert HostReplayCache(state).first_use(fresh_key(), 60)
    assert (tmp_path / "h.db.damaged").exists()


def test_the_host_file_is_readable_by_its_owner_only(tmp_path):
    state = HostState(tmp_path / "instance" / "h.db")
    HostReplayCache(state).first_use(fresh_key(), 60)
    assert stat.S_IMODE((tmp_path / "instance").stat().st_mode) == 0o700
    for path in (tmp_path / "instance").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_make_replay_cache_is_in_memory_only_without_a_host_file():
    assert isinstance(make_replay_cache(None, None), MemoryReplayCache)


def test_make_replay_cache_uses_the_host_file_without_redis(tmp_path):
    cache = make_replay_cache(None, HostState(tmp_path / "h.db"))
    assert isinstance(cache, SharedReplayCache) and cache._redis is None


def test_make_replay_cache_uses_the_host_file_and_redis_when_a_url_is_given(tmp_path):
    cache = make_replay_cache(CLOSED_PORT_URL, HostState(tmp_path / "h.db"))
    assert isinstance(cache._redis, RedisReplayCache)
    key = fresh_key()
    assert cache.first_use(key, 60) and not cache.first_use(key, 60)


@pytest.mark.parametrize("snapshot", [False, True], ids=["no-persistence", "from-a-snapshot"])
def test_a_redis_restart_does_not_reopen_the_replay_window(tmp_path, signing_key, own_redis, snapshot):
    from app.cds.auth import ClientAuthenticator
    from app.cds.clients import ClientRegistry
    from app.cds.errors import ClientNotTrusted
    from tests.support.tokens import clients_document

    base = "http://gateway.test"
    registry = ClientRegistry.from_mapping(clients_document(signing_key, []))
    on_this_host = ClientAuthenticator(registry, base, shared(tmp_path / "one", own_redis.url))
    on_another_host = ClientAuthenticator(registry, base, shared(tmp_path / "two", own_redis.url))
    server = redis.Redis.from_url(own_redis.url)
    # This Redis has remembered for a minute already, so tokens signed now are accepted before the restart.
    run_id = server.info("server")["run_id"]
    server.hset(RedisReplayCache.SINCE_KEY, mapping={"since": f"{time.time() - 60:.6f}", "run_id": run_id})
    on_this_host.authenticate(f"Bearer {signing_key.token(base + '/cds-services')}", "/cds-services")
    if snapshot:  # a snapshot taken now holds the memory marker, not the jti used next
        redis.Redis.from_url(own_redis.url).save()
    token = signing_key.token(base + "/cds-services")
    on_this_host.authenticate(f"Bearer {token}", "/cds-services")
    # iat has whole seconds: wait until Redis's own clock (which dates the restart) is past the token's second.
    issued = jwt.decode(token, options={"verify_signature": False})["iat"]
    wait_for(lambda: server.time()[0] > issued, "Redis's clock did not reach the next second", timeout=3)
    own_redis.stop()
    own_redis.start()
    with pytest.raises(ClientNotTrusted) as refused:
        for _ in range(3):  # the first call after the restart may find Redis's connection closed
            on_another_host.authenticate(f"Bearer {token}", "/cds-services")
    assert refused.value.reason == "issued_before_replay_memory"


def eviction_policy_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "app.cds.replay" and "maxmemory-policy" in r.getMessage()]


def test_a_redis_that_may_evict_jtis_is_reported_once_at_the_first_check(own_redis, caplog):
    # As if started with --maxmemory-policy allkeys-lru: an evicted jti would be accepted again.
    redis.Redis.from_url(own_redis.url).config_set("maxmemory-policy", "allkeys-lru")
    cache = RedisReplayCache(own_redis.url)
    with caplog.at_level(logging.INFO, logger="app.cds.replay"):
        assert cache.first_use(fresh_key(), 60) and cache.first_use(fresh_key(), 60)
    (record,) = eviction_policy_records(caplog)
    assert record.levelname == "ERROR"
    assert "allkeys-lru" in record.getMessage() and "set maxmemory-policy noeviction" in record.getMessage()


def test_a_redis_that_never_evicts_is_not_reported(own_redis, caplog):
    with caplog.at_level(logging.INFO, logger="app.cds.replay"):
        assert RedisReplayCache(own_redis.url).first_use(fresh_key(), 60)
    assert eviction_policy_records(caplog) == []


def test_a_redis_that_denies_config_says_the_policy_could_not_be_checked(own_redis, caplog):
    # Managed Redis services rename or deny CONFIG: an ACL user without it stands for them.
    redis.Redis.from_url(own_redis.url).acl_setuser(
        "gateway", enabled=True, passwords=["+secret"], keys=["*"], commands=["+@all", "-config"]
    )
    cache = RedisReplayCache(f"redis://gateway:secret@127.0.0.1:{own_redis.port}/0")
    with caplog.at_level(logging.INFO, logger="app.cds.replay"):
        assert cache.first_use(fresh_key(), 60)
    (record,) = eviction_policy_records(caplog)
    assert record.levelname == "WARNING" and "could not be checked" in record.getMessage()
