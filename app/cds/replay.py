"""The client JWT replay cache (R-34): each jti is accepted once; shared through Redis when it is there."""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)


class ReplayCache(Protocol):
    """What the authenticator needs: remember a key for a while, atomically."""

    def first_use(self, key: str, ttl_seconds: int) -> bool:
        """Atomically record ``key`` for ``ttl_seconds``: True the first time, False while remembered."""
        ...


class MemoryReplayCache:
    """A per-process replay cache: thread-safe, and expired keys are purged so memory follows live tokens."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def first_use(self, key: str, ttl_seconds: int) -> bool:
        with self._lock:
            now = self._clock()
            self._purge(now)
            if key in self._expiry:
                return False
            expires = now + max(ttl_seconds, 1)
            self._expiry[key] = expires
            heapq.heappush(self._heap, (expires, key))
            return True

    def __contains__(self, key: object) -> bool:
        with self._lock:
            expires = self._expiry.get(key)  # type: ignore[call-overload]
            return expires is not None and expires > self._clock()

    def __len__(self) -> int:
        with self._lock:
            self._purge(self._clock())
            return len(self._expiry)

    def _purge(self, now: float) -> None:
        # Each remembered key has exactly one heap entry, so popping the due ones empties the dict as well.
        while self._heap and self._heap[0][0] <= now:
            _, key = heapq.heappop(self._heap)
            del self._expiry[key]


class RedisReplayCache:
    """A replay cache shared by all processes through Redis (SET NX EX); Redis being down never fails a call.

    While Redis is unreachable, keys go to an in-process cache (one WARNING per outage) and one caller
    retries Redis every ``retry_after_seconds``; keys seen during an outage stay rejected after it.
    """

    PREFIX = "cds:jti:"

    def __init__(self, url: str, socket_timeout: float = 0.2, retry_after_seconds: float = 15.0):
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),  # no retries: a down Redis must cost one short timeout, not several
        )
        self._fallback = MemoryReplayCache()
        self._retry_after = retry_after_seconds
        self._lock = threading.Lock()
        self._down = False
        self._next_try = 0.0
        try:
            self._redis.ping()
        except redis.RedisError as exc:
            self._went_down(exc)

    def first_use(self, key: str, ttl_seconds: int) -> bool:
        if not self._may_try_redis():
            return self._fallback.first_use(key, ttl_seconds)
        try:
            recorded = self._redis.set(self.PREFIX + key, b"1", nx=True, ex=max(int(ttl_seconds), 1))
        except redis.RedisError as exc:
            self._went_down(exc)
            return self._fallback.first_use(key, ttl_seconds)
        if self._down:
            self._came_back()
        return bool(recorded) and key not in self._fallback

    def _may_try_redis(self) -> bool:
        if not self._down:
            return True
        with self._lock:
            now = time.monotonic()
            if now < self._next_try:
                return False
            self._next_try = now + self._retry_after  # this caller probes; the others keep the fallback
            return True

    def _went_down(self, exc: Exception) -> None:
        with self._lock:
            self._next_try = time.monotonic() + self._retry_after
            if self._down:
                return
            self._down = True
        log.warning(
            "Redis unreachable for the jti replay cache (%s); using a per-process cache, retry every %.0f s",
            type(exc).__name__,
            self._retry_after,
        )

    def _came_back(self) -> None:
        with self._lock:
            if not self._down:
                return
            self._down = False
        log.info("Redis reachable again; the jti replay cache is shared again")


def make_replay_cache(redis_url: str | None) -> ReplayCache:
    """The shared Redis cache when REDIS_URL is set, else a per-process one."""
    return RedisReplayCache(redis_url) if redis_url else MemoryReplayCache()
