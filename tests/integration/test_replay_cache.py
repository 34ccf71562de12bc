"""The jti replay cache: once only, expiring, shared through Redis, and still working when Redis is not."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

import pytest
import redis

from app.cds.replay import MemoryReplayCache, RedisReplayCache, make_replay_cache

REDIS_URL = "redis://127.0.0.1:6379/0"
CLOSED_PORT_URL = "redis://127.0.0.1:1/0"


def redis_is_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.2):
            return True
    except OSError:
        return False


# Skipped without Redis on a developer's machine; CI starts Redis, so there a missing server fails the run.
needs_redis = pytest.mark.skipif(not redis_is_up() and not os.environ.get("CI"), reason="no Redis on 127.0.0.1:6379")


def fresh_key() -> str:
    return f"test-{uuid.uuid4()}"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_memory_cache_accepts_a_key_once():
    cache = MemoryReplayCache()
    assert cache.first_use("a", 60) is True
    assert cache.first_use("a", 60) is False
    assert cache.first_use("b", 60) is True


def test_memory_cache_forgets_a_key_after_its_ttl():
    clock = FakeClock()
    cache = MemoryReplayCache(clock=clock)
    assert cache.first_use("a", 10)
    clock.now += 9.9
    assert not cache.first_use("a", 10)
    clock.now += 0.2
    assert cache.first_use("a", 10)


def test_memory_cache_purges_expired_keys_so_memory_stays_bounded():
    clock = FakeClock()
    cache = MemoryReplayCache(clock=clock)
    for i in range(1000):
        cache.first_use(f"old-{i}", 5)
    assert len(cache) == 1000
    clock.now += 6
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


def test_redis_cache_on_a_closed_port_falls_back_quickly_and_still_rejects_replays():
    started = time.perf_counter()
    cache = RedisReplayCache(CLOSED_PORT_URL)
    assert time.perf_counter() - started < 1.0
    key = fresh_key()
    timings = []
    for expected in (True, False, False):
        started = time.perf_counter()
        assert cache.first_use(key, 60) is expected
        timings.append(time.perf_counter() - started)
    assert max(timings) < 0.05


def test_redis_cache_retries_redis_after_the_back_off_without_hanging():
    cache = RedisReplayCache(CLOSED_PORT_URL, retry_after_seconds=0.05)
    time.sleep(0.06)
    started = time.perf_counter()
    assert cache.first_use(fresh_key(), 60)  # this call probes the closed port again
    assert time.perf_counter() - started < 0.5


def test_redis_down_is_logged_once_at_warning_not_per_call(caplog):
    with caplog.at_level(logging.WARNING, logger="app.cds.replay"):
        cache = RedisReplayCache(CLOSED_PORT_URL, retry_after_seconds=0.0)
        for _ in range(20):
            cache.first_use(fresh_key(), 60)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Redis" in warnings[0].getMessage()


@needs_redis
def test_redis_failing_mid_run_falls_back_then_comes_back_and_keys_seen_meanwhile_stay_rejected(monkeypatch):
    cache = RedisReplayCache(REDIS_URL, retry_after_seconds=0.05)
    before = fresh_key()
    assert cache.first_use(before, 60)

    def down(*args, **kwargs):
        raise redis.ConnectionError("simulated outage")

    monkeypatch.setattr(cache._redis, "set", down)
    during = fresh_key()
    assert cache.first_use(during, 60) is True
    assert cache.first_use(during, 60) is False
    monkeypatch.undo()

    time.sleep(0.06)
    assert cache.first_use(fresh_key(), 60) is True  # Redis used again
    assert cache.first_use(before, 60) is False
    assert cache.first_use(during, 60) is False
    assert not cache._down


def test_make_replay_cache_is_in_memory_without_a_redis_url():
    assert isinstance(make_replay_cache(None), MemoryReplayCache)
    assert isinstance(make_replay_cache(""), MemoryReplayCache)


def test_make_replay_cache_uses_redis_when_a_url_is_given():
    assert isinstance(make_replay_cache(CLOSED_PORT_URL), RedisReplayCache)
