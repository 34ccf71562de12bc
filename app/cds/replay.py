"""The client JWT replay cache (R-34): each jti is accepted once, by every process that may receive it.

Every process of a host records each jti in the host state file (shared without Redis); with REDIS_URL it is
recorded in Redis as well, which shares it across hosts. A jti is new only if every store that answered says
so, so a process that lost Redis for a moment still shares everything with the other processes of its host.
When the host file cannot be written, calls are refused (503), never checked against one process's memory.

A store remembers jtis only from some moment on (``remembers_since``): a Redis that restarted (even from a
snapshot, which lacks the last writes), or this process losing Redis (other hosts went on recording there). A
token issued before that moment may have been used already, so the authenticator refuses it. Clients sign a
fresh token per call, so only calls in flight at such a moment are refused, once.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.clock import SYSTEM_CLOCK, Clock
from app.host_state import HostState, HostStateError

log = logging.getLogger(__name__)

# How far a client's clock may run ahead of ours (iat, nbf): the authenticator refuses a token issued before a
# store's start plus this, since such a token may have been used just before the store (re)started.
CLOCK_LEEWAY_S = 5.0


class StoreUnavailable(Exception):
    """The store did not answer."""


class Check(NamedTuple):
    """One check's answer: whether the key was new, and since when (seconds since the epoch) the stores that
    answered it remember: a token issued before then cannot be checked."""

    first_use: bool
    remembers_since: float


class ReplayCache(Protocol):
    """What the authenticator needs: remember a key for a while, atomically, and say since when it remembers."""

    def check(self, key: str, ttl_seconds: int) -> Check:
        """Atomically record ``key`` for ``ttl_seconds`` (new the first time, not while remembered), with the
        memory's start as it was for this very check; raises StoreUnavailable when it cannot tell."""
        ...


class _Checks:
    """``first_use``: a check's first half, for callers that need no start time."""

    def first_use(self, key: str, ttl_seconds: int) -> bool:
        return self.check(key, ttl_seconds).first_use  # type: ignore[attr-defined]


class MemoryReplayCache(_Checks):
    """A per-process replay cache: thread-safe, and expired keys are purged so memory follows live tokens."""

    remembers_since = float("-inf")

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def check(self, key: str, ttl_seconds: int) -> Check:
        with self._lock:
            now = self._clock()
            self._purge(now)
            if key in self._expiry:
                return Check(False, self.remembers_since)
            expires = now + max(ttl_seconds, 1)
            self._expiry[key] = expires
            heapq.heappush(self._heap, (expires, key))
            return Check(True, self.remembers_since)

    def __len__(self) -> int:
        with self._lock:
            self._purge(self._clock())
            return len(self._expiry)

    def _purge(self, now: float) -> None:
        # Each remembered key has exactly one heap entry, so popping the due ones empties the dict as well.
        while self._heap and self._heap[0][0] <= now:
            _, key = heapq.heappop(self._heap)
            del self._expiry[key]


class HostReplayCache(_Checks):
    """The replay cache of this host's processes, in the host state file (one short write per call). The file's
    own start is read in the same transaction, so a file made anew (deleted, or after a reboot) counts at once."""

    PURGE_EVERY_S = 10.0

    def __init__(self, state: HostState, clock: Clock = SYSTEM_CLOCK):
        self._state = state
        self._clock = clock
        self._next_purge = 0.0

    @property
    def remembers_since(self) -> float:
        return self._state.started_at

    def check(self, key: str, ttl_seconds: int) -> Check:
        now = self._clock.now()
        try:
            with self._state.write() as conn:
                # A key whose time is up may be recorded again, as a new key would be.
                recorded = conn.execute(
                    "INSERT INTO jti (key, expires) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET expires = excluded.expires WHERE jti.expires <= ?",
                    (key, now + max(ttl_seconds, 1), now),
                ).rowcount
                if now >= self._next_purge:
                    self._next_purge = now + self.PURGE_EVERY_S
                    conn.execute("DELETE FROM jti WHERE expires <= ?", (now,))
                (since,) = conn.execute("SELECT value FROM meta WHERE name = 'started_at'").fetchone()
        except HostStateError as exc:
            raise StoreUnavailable(str(exc)) from None
        return Check(recorded == 1, float(since))


# KEYS: the jti's key; a hash saying since when this Redis remembers, and for which run of the server (its
# run_id changes at every start, also one that loads a snapshot, which lacks the writes made after it).
# ARGV: ttl in seconds. Returns {1 if recorded, since}. Time is Redis's clock.
_REDIS_SCRIPT = """
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
local since = redis.call('HGET', KEYS[2], 'since')
if not since or redis.call('HGET', KEYS[2], 'run_id') ~= run then
  local t = redis.call('TIME')
  since = string.format('%d.%06d', tonumber(t[1]), tonumber(t[2]))
  redis.call('HSET', KEYS[2], 'since', since, 'run_id', run)
end
local recorded = redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1]))
if recorded then return {1, since} end
return {0, since}
"""


class RedisReplayCache(_Checks):
    """A replay cache shared by every process and host through Redis (SET NX EX), in one script call.

    Raises StoreUnavailable when Redis does not answer. A Redis that restarted remembers only from its restart
    on, and says so in each check's answer (``remembers_since`` keeps the latest, for display). At its first
    answer, the server's maxmemory-policy is checked once: a Redis that may evict keys forgets jtis.
    """

    PREFIX = "cds:jti:"
    SINCE_KEY = "cds:jti-memory"

    def __init__(self, url: str, socket_timeout: float = 0.2):
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),  # no retries: a down Redis must cost one short timeout, not several
        )
        self._script = self._redis.register_script(_REDIS_SCRIPT)
        self.remembers_since = float("inf")  # nothing is known until Redis has answered once
        self._policy_checked = False
        self._policy_lock = threading.Lock()

    def check(self, key: str, ttl_seconds: int) -> Check:
        try:
            recorded, since = self._script(keys=[self.PREFIX + key, self.SINCE_KEY], args=[max(int(ttl_seconds), 1)])
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        self.remembers_since = float(since)
        if not self._policy_checked:
            self._check_eviction_policy()
        return Check(bool(recorded), float(since))

    def _check_eviction_policy(self) -> None:
        """One ERROR if Redis may evict keys: an evicted jti is accepted again (a replay), with no other sign."""
        with self._policy_lock:
            if self._policy_checked:
                return
            self._policy_checked = True
        try:
            policy = self._redis.config_get("maxmemory-policy").get("maxmemory-policy")
        except redis.RedisError as exc:  # CONFIG renamed away or denied by an ACL, as managed services do
            policy, reason = None, type(exc).__name__
        else:
            reason = "CONFIG GET gave no value"
        if policy is None:
            log.warning(
                "Redis maxmemory-policy could not be checked (%s); the jti replay cache needs noeviction", reason
            )
        elif policy != "noeviction":
            log.error(
                "Redis maxmemory-policy is %s: under memory pressure it may evict jti keys, and an evicted jti "
                "is accepted again (a replay); set maxmemory-policy noeviction",
                policy,
            )


class SharedReplayCache(_Checks):
    """The host file, always, and Redis too when configured: a key is new only if every store that answered
    says so. Redis being down costs one short timeout per ``retry_after_seconds`` (one caller probes) and one
    WARNING per outage; the host file being unusable raises StoreUnavailable (the call is refused)."""

    def __init__(
        self,
        host: HostReplayCache,
        redis_cache: RedisReplayCache | None,
        retry_after_seconds: float = 15.0,
        clock: Clock = SYSTEM_CLOCK,
    ):
        self._host = host
        self._clock = clock
        self._redis = redis_cache
        self._retry_after = retry_after_seconds
        self._lock = threading.Lock()
        self._redis_down = False
        self._next_try = 0.0
        self._lost_redis_at = float("-inf")

    @property
    def remembers_since(self) -> float:
        since = max(self._host.remembers_since, self._lost_redis_at)
        if self._redis is not None and not self._redis_down:
            since = max(since, self._redis.remembers_since)
        return since

    def check(self, key: str, ttl_seconds: int) -> Check:
        here = self._host.check(key, ttl_seconds)
        if not here.first_use or self._redis is None or not self._may_try_redis():
            return Check(here.first_use, max(here.remembers_since, self._lost_redis_at))
        try:
            everywhere = self._redis.check(key, ttl_seconds)
        except StoreUnavailable as exc:
            self._went_down(exc)
            return Check(True, max(here.remembers_since, self._lost_redis_at))
        if self._redis_down:
            self._came_back()
        since = max(here.remembers_since, self._lost_redis_at, everywhere.remembers_since)
        return Check(everywhere.first_use, since)

    def _may_try_redis(self) -> bool:
        if not self._redis_down:
            return True
        with self._lock:
            now = self._clock.monotonic()
            if now < self._next_try:
                return False
            self._next_try = now + self._retry_after  # this caller probes; the others keep to the host file
            return True

    def _went_down(self, exc: Exception) -> None:
        with self._lock:
            self._next_try = self._clock.monotonic() + self._retry_after
            if self._redis_down:
                return
            self._redis_down = True
            # Other hosts go on recording in Redis: a token they saw may come here now, unseen by our file. A loss
            # is not a store's restart: tokens issued before it are refused, not the fresh ones of the next seconds
            # too (the authenticator adds the leeway, rounded up to a whole second, to every cut-off; taken back
            # here), or every Redis blip would refuse all calls for the leeway. Replays across hosts during the
            # outage are the documented trade-off.
            self._lost_redis_at = self._clock.now() - CLOCK_LEEWAY_S - 1
        log.warning(
            "Redis unreachable for the jti replay cache (%s); this host's file only, retry every %.0f s",
            exc,
            self._retry_after,
        )

    def _came_back(self) -> None:
        with self._lock:
            if not self._redis_down:
                return
            self._redis_down = False
        log.info("Redis reachable again; the jti replay cache is shared across hosts again")


def make_replay_cache(redis_url: str | None, host_state: HostState | None, clock: Clock = SYSTEM_CLOCK) -> ReplayCache:
    """This host's state file, and Redis as well when REDIS_URL is set; without a host state (apps built for a
    unit test) a per-process memory. ``clock`` is the application's: when remembered keys lapse, when a lost
    Redis is tried again (a token's own exp is checked on wall time by the authenticator, and Redis keeps its
    keys on its own clock)."""
    if host_state is None:
        return MemoryReplayCache(clock=clock.monotonic)
    redis_cache = RedisReplayCache(redis_url) if redis_url else None
    return SharedReplayCache(HostReplayCache(host_state, clock=clock), redis_cache, clock=clock)
