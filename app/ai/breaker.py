"""The circuit breaker in front of model calls: decided before the call, told the outcome after it.

pybreaker supplies the states, the listeners and the Redis key layout, but its ``call()`` holds a lock while the
protected call runs, which would serialise every thread; so it is never used. ``allow()`` hands out a Permit
before the call and ``record()`` takes the outcome afterwards. Added here: failure-rate and slow-call windows
with a minimum number of calls, a bounded number of half-open trial calls, outcomes that count as neither
success nor failure (bad input), and state shared through Redis when it answers and kept per process when not.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import pybreaker
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.logs import describe

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
SUCCESS, FAILURE, IGNORED = "success", "failure", "ignored"
OUTCOMES = frozenset({SUCCESS, FAILURE, IGNORED})

REDIS_TIMEOUT_S = 0.2  # connect and read; a dead Redis costs the call that finds out at most this, once
RETRY_FIRST_S = 1.0  # after losing Redis, first try again after this, doubling up to RETRY_MAX_S
RETRY_MAX_S = 30.0
# While closed, allow() and `state` trust a Redis answer this recent instead of asking again: a change made by
# another process is seen within this time, and a busy process asks Redis about 20 times a second, not per call.
SHARED_STATE_MAX_AGE_S = 0.05

# Within one epoch (one opening) the shared state only moves open -> half-open -> closed, and each opening
# starts a larger epoch, so (epoch, rank) orders the answers Redis gives.
_RANK = {OPEN: 0, HALF_OPEN: 1, CLOSED: 2}

# KEYS: state, opened_at (pybreaker's keys and formats), period (hash: epoch, opened_ms, successes),
# trials (sorted set: trial token -> expiry). ARGV: op, open_ms, trial_ttl_ms, max_trials, successes_to_close,
# token, epoch, verdict. Time is Redis's clock, so the hosts' clocks need not agree.
_SCRIPT = """
local state_key, opened_at_key, period_key, trials_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op, open_ms, ttl_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local max_trials, to_close = tonumber(ARGV[4]), tonumber(ARGV[5])
local token, permit_epoch, verdict = ARGV[6], tonumber(ARGV[7]), ARGV[8]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local state = redis.call('GET', state_key)
if state ~= 'open' and state ~= 'half-open' then state = 'closed' end
local epoch = tonumber(redis.call('HGET', period_key, 'epoch'))
if not epoch then
  -- a Redis that lost its data starts above every epoch it handed out before
  epoch = now
  redis.call('HSET', period_key, 'epoch', string.format('%d', epoch))
end

local function open_left()
  local opened = tonumber(redis.call('HGET', period_key, 'opened_ms'))
  if not opened then opened = (tonumber(redis.call('GET', opened_at_key)) or 0) * 1000 end
  return math.max(opened + open_ms - now, 0)
end

local function enter(new_state)
  state = new_state
  redis.call('SET', state_key, new_state)
  redis.call('DEL', trials_key)
  redis.call('HSET', period_key, 'successes', 0)
end

local function trip()
  epoch = epoch + 1
  enter('open')
  redis.call('SET', opened_at_key, string.format('%d', math.floor(now / 1000)))
  redis.call('HSET', period_key, 'epoch', string.format('%d', epoch), 'opened_ms', string.format('%d', now))
end

local granted = 0
if op == 'allow' then
  if state == 'open' and open_left() == 0 then enter('half-open') end
  if state == 'half-open' then
    redis.call('ZREMRANGEBYSCORE', trials_key, '-inf', now)
    if redis.call('ZCARD', trials_key) < max_trials then
      redis.call('ZADD', trials_key, now + ttl_ms, token)
      redis.call('PEXPIRE', trials_key, ttl_ms)
      granted = 1
    end
  end
elseif op == 'trip' then
  if state == 'closed' then trip() end
elseif op == 'trial' then
  redis.call('ZREM', trials_key, token)
  if state == 'half-open' and permit_epoch == epoch then
    if verdict == 'failure' then
      trip()
    elseif verdict == 'success' and redis.call('HINCRBY', period_key, 'successes', 1) >= to_close then
      enter('closed')
    end
  end
end

local left = 0
if state == 'open' then left = open_left() end
return {state, epoch, left, granted}
"""


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave for one model call from `CircuitBreaker.allow`; hand it back to `CircuitBreaker.record`.

    ``state`` is the state it was granted in. A half-open permit carries a trial ``token`` and, when Redis
    granted it, the ``epoch`` (opening) it belongs to. ``generation`` ties it to this process's view, so an
    outcome that arrives after the breaker has moved on is not counted in the new state.
    """

    state: str
    generation: int
    token: str | None = None
    epoch: int | None = None


class _View(NamedTuple):
    """One answer of the shared state: its state, epoch, open time left, whether a trial was granted."""

    state: str
    epoch: int
    open_left_s: float
    granted: bool
    link: int


class _QuietListener(pybreaker.CircuitBreakerListener):
    """Passes state changes on; a listener that raises is logged, never allowed to break allow()/record()."""

    def __init__(self, listener: pybreaker.CircuitBreakerListener):
        self.listener = listener

    def state_change(self, cb, old_state, new_state) -> None:
        try:
            self.listener.state_change(cb, old_state, new_state)
        except Exception as exc:
            log.error("circuit breaker %s: a state_change listener failed: %s", cb.name, describe(exc))


class _SharedState:
    """The breaker's state in Redis, in pybreaker's CircuitRedisStorage layout (``<name>:pybreaker:<key>``).

    Each operation is one Lua script run: atomic, one round trip. ``run`` answers None while Redis is
    unreachable (one WARNING per outage); a background thread then tries again with back-off, so no caller
    waits on a dead Redis except the one whose call finds it dead.
    """

    def __init__(self, url: str, name: str, limits: list[int]):
        self.name = name
        self.link = 0  # counts connections: answers from different links cannot be ordered by epoch
        self.up = False
        self._client = redis.Redis.from_url(
            url,
            decode_responses=False,  # CircuitRedisStorage decodes the bytes itself
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),  # no retries: a dead Redis must cost one short timeout, not several
        )
        prefix = f"{name}:{pybreaker.CircuitRedisStorage.BASE_NAMESPACE}:"
        self.keys = [prefix + key for key in ("state", "opened_at", "period", "trials")]
        self._script = self._client.register_script(_SCRIPT)
        self._limits = limits
        self._lock = threading.Lock()
        self._warned = False
        self._probing = False
        self._retry_at = 0.0
        self._retry_after = RETRY_FIRST_S
        self._connect()

    def run(self, op: str, token: str = "", epoch: int = 0, verdict: str = "") -> _View | None:
        if not self.up:
            self._probe_later()
            return None
        link = self.link
        try:
            state, epoch, left_ms, granted = self._script(
                keys=self.keys, args=[op, *self._limits, token, epoch, verdict]
            )
        except redis.RedisError as exc:
            self._down(exc, probe_failed=False)
            return None
        return _View(state.decode(), int(epoch), left_ms / 1000, bool(granted), link)

    def _connect(self) -> None:
        try:
            # pybreaker's storage creates its keys if missing (and raises if Redis does not answer); its
            # getters are not used: they log every Redis error with a traceback and then report "closed".
            pybreaker.CircuitRedisStorage(CLOSED, self._client, namespace=self.name)
            self._script(keys=self.keys, args=["peek", *self._limits, "", 0, ""])
        except redis.RedisError as exc:
            self._down(exc, probe_failed=True)
            return
        with self._lock:
            self.link += 1
            self.up = True
            self._retry_after = RETRY_FIRST_S
            recovered, self._warned = self._warned, False
        if recovered:
            log.info("circuit breaker %s: Redis reachable again, breaker state is shared again", self.name)

    def _down(self, exc: Exception, probe_failed: bool) -> None:
        with self._lock:
            if not (self.up or probe_failed):
                return  # another call already noticed
            self.up = False
            self._retry_at = time.monotonic() + self._retry_after
            if probe_failed:
                self._retry_after = min(self._retry_after * 2, RETRY_MAX_S)
            warn, self._warned = not self._warned, True
        if warn:
            log.warning(
                "circuit breaker %s: Redis unreachable (%s); breaker state is kept per process until it is back",
                self.name,
                type(exc).__name__,
            )

    def _probe_later(self) -> None:
        with self._lock:
            if self._probing or time.monotonic() < self._retry_at:
                return
            self._probing = True
        threading.Thread(target=self._probe, name=f"breaker-{self.name}-redis", daemon=True).start()

    def _probe(self) -> None:
        try:
            self._connect()
        finally:
            with self._lock:
                self._probing = False


class CircuitBreaker:
    """A circuit breaker that decides before a call (`allow`) and learns its outcome after it (`record`).

    Closed: every call is allowed; the last ``window_size`` outcomes recorded by this process are kept, and
    once there are ``minimum_calls`` of them it opens when the failure rate reaches ``failure_rate_threshold``
    or the rate of successes slower than ``slow_call_seconds`` reaches ``slow_call_rate_threshold``.
    Open: every call is refused for ``open_seconds``; then the next ``allow()`` moves it to half-open.
    Half-open: at most ``half_open_max_calls`` trial calls at a time; ``half_open_successes_to_close``
    successful trials close it, one failed or slow trial opens it again. A trial permit that is never handed
    back is reclaimed after ``open_seconds`` (or ``slow_call_seconds`` if longer).

    With ``redis_url`` the state, its timing, the trial permits and the half-open successes are shared by
    every process using the same ``name`` (a closed process notices a change within SHARED_STATE_MAX_AGE_S);
    the closed-state window stays per process. Without Redis, or while it is unreachable, everything is per
    process. Transitions go through a pybreaker.CircuitBreaker, so ``listeners`` hear ``state_change`` in
    every process that makes or notices one.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_rate_threshold: float = 0.5,
        slow_call_rate_threshold: float = 0.8,
        slow_call_seconds: float = 0.4,
        window_size: int = 20,
        minimum_calls: int = 10,
        open_seconds: float = 30.0,
        half_open_max_calls: int = 3,
        half_open_successes_to_close: int = 3,
        redis_url: str | None = None,
        listeners: Iterable[pybreaker.CircuitBreakerListener] = (),
        clock: Callable[[], float] = time.monotonic,
    ):
        _check_settings(
            failure_rate_threshold,
            slow_call_rate_threshold,
            slow_call_seconds,
            window_size,
            minimum_calls,
            open_seconds,
            half_open_max_calls,
            half_open_successes_to_close,
        )
        self.name = name
        self._failure_rate = failure_rate_threshold
        self._slow_rate = slow_call_rate_threshold
        self._slow_s = slow_call_seconds
        self._window_size = window_size
        self._minimum_calls = minimum_calls
        self._open_s = open_seconds
        self._max_trials = half_open_max_calls
        self._successes_to_close = half_open_successes_to_close
        self._trial_ttl_s = max(open_seconds, slow_call_seconds)
        self._clock = clock
        self._lock = threading.RLock()  # re-entrant: a listener may read `state`
        # pybreaker holds this process's state (in memory) and tells the listeners about each change.
        self._local = pybreaker.CircuitMemoryStorage(CLOSED)
        self._breaker = pybreaker.CircuitBreaker(
            name=name,
            state_storage=self._local,
            listeners=[_QuietListener(listener) for listener in listeners],
            reset_timeout=open_seconds,
            success_threshold=half_open_successes_to_close,
        )
        self._generation = 0
        self._opened_at = 0.0
        self._window: deque[tuple[bool, bool]] = deque()
        self._failures = 0
        self._slow = 0
        self._trials: dict[str, float] = {}  # this process's trial tokens -> expiry
        self._successes = 0
        self._token_prefix = uuid.uuid4().hex[:16]
        self._tokens = itertools.count()
        self._seen: tuple[int, int] | None = None  # (epoch, rank) of the newest shared state adopted
        self._link = 0
        self._checked_at = float("-inf")  # time.monotonic() of the last Redis answer
        self._shared = None
        if redis_url:
            limits = [
                max(1, round(open_seconds * 1000)),
                max(1, round(self._trial_ttl_s * 1000)),
                half_open_max_calls,
                half_open_successes_to_close,
            ]
            self._shared = _SharedState(redis_url, name, limits)

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open`` (with Redis: at most SHARED_STATE_MAX_AGE_S old)."""
        with self._lock:
            if self._shared is None or self._open_still() or self._recently_checked():
                return self._local.state
        view = self._shared.run("peek")
        with self._lock:
            if view is not None:
                self._adopt(view)
            return self._local.state

    def allow(self) -> Permit | None:
        """A permit for one call, or None to refuse it now (open, or half-open with no trial permit left)."""
        with self._lock:
            if self._open_still():
                return None
            if self._shared is None:
                return self._allow_here()
            if self._local.state == CLOSED and self._recently_checked():
                return Permit(CLOSED, self._generation)
        token = self._new_token()
        view = self._shared.run("allow", token=token)
        with self._lock:
            if view is None:
                return self._allow_here()
            self._adopt(view)
            if view.granted:
                return Permit(HALF_OPEN, self._generation, token, view.epoch)
            # An answer overtaken by a newer one was not adopted: the newer state decides.
            return Permit(CLOSED, self._generation) if self._local.state == CLOSED else None

    def record(self, permit: Permit, outcome: str, duration_s: float) -> None:
        """Count the outcome of a permitted call: ``success``, ``failure`` or ``ignored`` (bad input: neither).

        A success slower than ``slow_call_seconds`` is a slow call: still a success for the failure rate, a
        failure for a half-open trial. Every permit must be recorded once, whatever happened to the call.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, not {outcome!r}")
        slow = outcome == SUCCESS and duration_s > self._slow_s
        if permit.token is not None:
            verdict = IGNORED if outcome == IGNORED else FAILURE if outcome == FAILURE or slow else SUCCESS
            self._record_trial(permit, verdict)
        elif outcome != IGNORED:
            self._record_closed(permit, outcome == FAILURE, slow)

    def _record_closed(self, permit: Permit, failed: bool, slow: bool) -> None:
        with self._lock:
            if permit.generation != self._generation or self._local.state != CLOSED:
                return  # admitted before the breaker last changed: it says nothing about the current state
            self._count(failed, slow)
            if not self._over_threshold():
                return
            self._clear_window()
            generation = self._generation
            if self._shared is None or not self._shared.up:
                self._enter(OPEN)
                return
        view = self._shared.run("trip")
        with self._lock:
            if view is not None:
                self._adopt(view)
            elif self._generation == generation:
                self._enter(OPEN)

    def _record_trial(self, permit: Permit, verdict: str) -> None:
        if permit.epoch is not None and self._shared is not None:
            view = self._shared.run("trial", token=permit.token or "", epoch=permit.epoch, verdict=verdict)
            if view is not None:
                with self._lock:
                    self._adopt(view)
                return
            # Redis is gone: its token expires there; the outcome still counts for this process's state.
        with self._lock:
            self._trials.pop(permit.token or "", None)
            if verdict == IGNORED or permit.generation != self._generation or self._local.state != HALF_OPEN:
                return
            if verdict == FAILURE:
                self._enter(OPEN)
                return
            self._successes += 1
            if self._successes >= self._successes_to_close:
                self._enter(CLOSED)

    def _allow_here(self) -> Permit | None:
        """allow() on this process's own state (lock held)."""
        now = self._clock()
        if self._local.state == OPEN:
            if now - self._opened_at < self._open_s:
                return None
            self._enter(HALF_OPEN)
        if self._local.state == CLOSED:
            return Permit(CLOSED, self._generation)
        for token, expires in list(self._trials.items()):
            if expires <= now:
                del self._trials[token]  # a trial never handed back (its worker died): reclaim the permit
        if len(self._trials) >= self._max_trials:
            return None
        token = self._new_token()
        self._trials[token] = now + self._trial_ttl_s
        return Permit(HALF_OPEN, self._generation, token)

    def _open_still(self) -> bool:
        return self._local.state == OPEN and self._clock() - self._opened_at < self._open_s

    def _recently_checked(self) -> bool:
        return (
            self._shared is not None
            and self._shared.up
            and time.monotonic() - self._checked_at < SHARED_STATE_MAX_AGE_S
        )

    def _adopt(self, view: _View) -> None:
        """Take the shared state from a Redis answer (lock held), unless a newer answer was taken already."""
        self._checked_at = time.monotonic()
        if view.link != self._link:
            self._link, self._seen = view.link, None
        seen = (view.epoch, _RANK[view.state])
        if self._seen is not None and seen <= self._seen:
            return
        self._seen = seen
        self._enter(view.state, view.open_left_s)

    def _enter(self, state: str, open_left_s: float | None = None) -> None:
        """Start a new period in ``state`` (lock held); listeners and the log hear of a change of state."""
        old = self._local.state
        self._generation += 1
        self._clear_window()
        self._trials.clear()
        self._successes = 0
        if state == OPEN:
            left = self._open_s if open_left_s is None else open_left_s
            self._opened_at = self._clock() - (self._open_s - left)
        if state == old:
            return
        level = logging.WARNING if state == OPEN else logging.INFO
        log.log(level, "circuit breaker %s: %s -> %s", self.name, old, state)
        if state == OPEN:
            self._breaker.open()
        elif state == HALF_OPEN:
            self._breaker.half_open()
        else:
            self._breaker.close()

    def _count(self, failed: bool, slow: bool) -> None:
        if len(self._window) == self._window_size:
            old_failed, old_slow = self._window.popleft()
            self._failures -= old_failed
            self._slow -= old_slow
        self._window.append((failed, slow))
        self._failures += failed
        self._slow += slow

    def _over_threshold(self) -> bool:
        calls = len(self._window)
        if calls < self._minimum_calls:
            return False
        return self._failures / calls >= self._failure_rate or self._slow / calls >= self._slow_rate

    def _clear_window(self) -> None:
        self._window.clear()
        self._failures = self._slow = 0

    def _new_token(self) -> str:
        return f"{self._token_prefix}:{next(self._tokens)}"


def _check_settings(
    failure_rate: float,
    slow_rate: float,
    slow_s: float,
    window_size: int,
    minimum_calls: int,
    open_s: float,
    max_trials: int,
    successes_to_close: int,
) -> None:
    if not (0 < failure_rate <= 1 and 0 < slow_rate <= 1):
        raise ValueError("failure_rate_threshold and slow_call_rate_threshold must be in (0, 1]")
    if slow_s <= 0 or open_s <= 0:
        raise ValueError("slow_call_seconds and open_seconds must be positive")
    if not 1 <= minimum_calls <= window_size:
        raise ValueError("minimum_calls must be between 1 and window_size")
    if max_trials < 1 or successes_to_close < 1:
        raise ValueError("half_open_max_calls and half_open_successes_to_close must be at least 1")
