"""Where a circuit breaker's state is shared: Redis across hosts, or this host's state file across its processes.

Each store answers one operation at a time, atomically (a Lua script in Redis, a transaction in the file):
``peek``, ``allow`` (may move open -> half-open and hand out a trial permit), ``count`` (a closed-state outcome
enters the shared window of the last ``window_size`` outcomes, and the window may trip it: closed -> open) and
``trial`` (a trial's verdict). ``run`` answers a `View`, or None while the store is unreachable, and then the
breaker keeps its state per process (or on the next store of a `Failover`).
"""

from __future__ import annotations

import logging
import threading
from typing import NamedTuple

import pybreaker
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.clock import SYSTEM_CLOCK, Clock
from app.host_state import HostState, HostStateError

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
SUCCESS, FAILURE, SLOW = "success", "failure", "slow"

REDIS_TIMEOUT_S = 0.2  # connect and read; a dead Redis costs the call that finds out at most this, once
RETRY_FIRST_S = 1.0  # after losing a store, first try again after this, doubling up to RETRY_MAX_S
RETRY_MAX_S = 30.0
HOST_LINK = -1  # the host file's answers form one sequence of their own, apart from any Redis connection's

# KEYS: state, opened_at (pybreaker's keys and formats), period (hash: epoch, opened_ms, successes),
# trials (sorted set: trial token -> expiry), window (hash: calls, failure, slow: counts since it was cleared),
# outcomes (hash: slot -> verdict, a ring of the last window_size). ARGV: op, open_ms, trial_ttl_ms, max_trials,
# successes_to_close, window_size, minimum_calls, failure_rate, slow_rate, token, epoch, verdict. Time is
# Redis's clock, so the hosts' clocks need not agree.
_SCRIPT = """
local state_key, opened_at_key, period_key, trials_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local window_key, outcomes_key = KEYS[5], KEYS[6]
local op, open_ms, ttl_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local max_trials, to_close = tonumber(ARGV[4]), tonumber(ARGV[5])
local window, min_calls = tonumber(ARGV[6]), tonumber(ARGV[7])
local failure_rate, slow_rate = tonumber(ARGV[8]), tonumber(ARGV[9])
local token, permit_epoch, verdict = ARGV[10], tonumber(ARGV[11]), ARGV[12]

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
  redis.call('DEL', trials_key, window_key)
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
elseif op == 'count' then
  if state == 'closed' and permit_epoch == epoch then
    -- the outcome takes the slot of the one recorded window_size calls ago, which leaves the window
    local seq = redis.call('HINCRBY', window_key, 'calls', 1)
    local slot = (seq - 1) % window
    if seq > window then
      local old = redis.call('HGET', outcomes_key, slot)
      if old == 'failure' or old == 'slow' then redis.call('HINCRBY', window_key, old, -1) end
    end
    redis.call('HSET', outcomes_key, slot, verdict)
    if verdict == 'failure' or verdict == 'slow' then redis.call('HINCRBY', window_key, verdict, 1) end
    local calls = math.min(seq, window)
    local failures = tonumber(redis.call('HGET', window_key, 'failure')) or 0
    local slow = tonumber(redis.call('HGET', window_key, 'slow')) or 0
    if calls >= min_calls and (failures / calls >= failure_rate or slow / calls >= slow_rate) then trip() end
  end
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


class Window(NamedTuple):
    """The closed-state rule: over the last ``size`` outcomes, once there are ``minimum_calls``, trip at a
    failure rate of ``failure_rate`` or a slow-call rate of ``slow_rate``."""

    size: int
    minimum_calls: int
    failure_rate: float
    slow_rate: float

    def trips(self, calls: int, failures: int, slow: int) -> bool:
        if calls < self.minimum_calls:
            return False
        return failures / calls >= self.failure_rate or slow / calls >= self.slow_rate


class View(NamedTuple):
    """One answer of the shared state: its state, epoch, open time left, whether a trial was granted."""

    state: str
    epoch: int
    open_left_s: float
    granted: bool
    link: int


class RedisState:
    """The breaker's state in Redis, in pybreaker's CircuitRedisStorage layout (``<name>:pybreaker:<key>``).

    Each operation is one Lua script run: atomic, one round trip. ``run`` answers None while Redis is
    unreachable (one WARNING per outage); a background thread then tries again with back-off, so no caller
    waits on a dead Redis except the one whose call finds it dead.
    """

    def __init__(self, url: str, name: str, limits: list, clock: Clock = SYSTEM_CLOCK):
        self.name = name
        self._clock = clock
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
        # The window's keys name its size: processes configured with another size keep a window of their own.
        window = f"window-{limits[4]}"
        self.keys = [prefix + key for key in ("state", "opened_at", "period", "trials", window, f"{window}-outcomes")]
        self._script = self._client.register_script(_SCRIPT)
        self._limits = limits
        self._lock = threading.Lock()
        self._warned = False
        self._probing = False
        self._retry_at = 0.0
        self._retry_after = RETRY_FIRST_S
        self._connect()

    def run(self, op: str, token: str = "", epoch: int = 0, verdict: str = "") -> View | None:
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
        return View(state.decode(), int(epoch), left_ms / 1000, bool(granted), link)

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
            self._retry_at = self._clock.monotonic() + self._retry_after
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
            if self._probing or self._clock.monotonic() < self._retry_at:
                return
            self._probing = True
        threading.Thread(target=self._probe, name=f"breaker-{self.name}-redis", daemon=True).start()

    def _probe(self) -> None:
        try:
            self._connect()
        finally:
            with self._lock:
                self._probing = False


class HostFileState:
    """The breaker's state in this host's state file: the same steps as the Redis script, in one transaction.

    Time is the host's wall clock, which all its processes share. A peek, and an allow that changes nothing
    (closed, or open with time left), only read (WAL readers take no lock). While the file cannot be written
    (disk full, locked too long) ``run`` answers None and the file is tried again after a back-off.
    """

    def __init__(self, state: HostState, name: str, limits: list, clock: Clock = SYSTEM_CLOCK):
        self.name = name
        self._clock = clock
        self.link = HOST_LINK
        self.up = True
        self._state = state
        self.open_ms, self.trial_ttl_ms, self.max_trials, self.to_close = limits[:4]
        self.window = Window(*limits[4:])
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._retry_after = RETRY_FIRST_S

    def run(self, op: str, token: str = "", epoch: int = 0, verdict: str = "") -> View | None:
        if not self.up:
            with self._lock:
                if self._clock.monotonic() < self._retry_at:
                    return None
                self._retry_at = self._clock.monotonic() + self._retry_after  # this caller probes, the others wait
        try:
            view = self._read_only(op)
            if view is None:
                with self._state.write() as conn:
                    view = _Period.load(conn, self.name, self._now_ms()).step(self, op, token, epoch, verdict)
        except HostStateError as exc:
            self._went_down(exc)
            return None
        if not self.up:
            with self._lock:
                self.up, self._retry_after = True, RETRY_FIRST_S
            log.info("circuit breaker %s: the host state file is writable again, state is shared again", self.name)
        return view

    def _read_only(self, op: str) -> View | None:
        """The answer of an operation that would change nothing, or None when it must write."""
        if op not in ("peek", "allow"):
            return None
        rows = self._state.read(_Period.QUERY, (self.name,))
        if not rows:
            return None  # the first operation writes the row, and with it the epoch every answer then shares
        period = _Period(None, self.name, self._now_ms(), rows[0])
        if op == "allow" and not (period.state == CLOSED or period.open_left(self.open_ms) > 0):
            return None
        return period.view(self, granted=False)

    def _now_ms(self) -> int:
        return int(self._clock.now() * 1000)

    def _went_down(self, exc: Exception) -> None:
        with self._lock:
            was_up, self.up = self.up, False
            self._retry_at = self._clock.monotonic() + self._retry_after
            self._retry_after = min(self._retry_after * 2, RETRY_MAX_S)
        if was_up:
            log.warning("circuit breaker %s: host state file unusable (%s); state kept per process", self.name, exc)


class _Period:
    """One breaker's rows in the host state file, changed as the Redis script changes its keys."""

    QUERY = "SELECT state, epoch, opened_ms, successes FROM breaker WHERE name = ?"

    def __init__(self, conn, name: str, now_ms: int, row: tuple | None):
        self.conn, self.name, self.now = conn, name, now_ms
        self.state, self.epoch, self.opened_ms, self.successes = row or (CLOSED, now_ms, 0, 0)

    @classmethod
    def load(cls, conn, name: str, now_ms: int) -> _Period:
        return cls(conn, name, now_ms, conn.execute(cls.QUERY, (name,)).fetchone())

    def step(self, limits: HostFileState, op: str, token: str, permit_epoch: int, verdict: str) -> View:
        granted = False
        if op == "allow":
            if self.state == OPEN and self.open_left(limits.open_ms) == 0:
                self.enter(HALF_OPEN)
            if self.state == HALF_OPEN:
                granted = self.grant_trial(token, limits.trial_ttl_ms, limits.max_trials)
        elif op == "count":
            if self.state == CLOSED and permit_epoch == self.epoch and self.count(limits.window, verdict):
                self.trip()
        elif op == "trial":
            self.conn.execute("DELETE FROM breaker_trial WHERE name = ? AND token = ?", (self.name, token))
            if self.state == HALF_OPEN and permit_epoch == self.epoch:
                if verdict == FAILURE:
                    self.trip()
                elif verdict == SUCCESS:
                    self.successes += 1
                    if self.successes >= limits.to_close:
                        self.enter(CLOSED)
        self.conn.execute(
            "INSERT OR REPLACE INTO breaker (name, state, epoch, opened_ms, successes) VALUES (?, ?, ?, ?, ?)",
            (self.name, self.state, self.epoch, self.opened_ms, self.successes),
        )
        return self.view(limits, granted)

    def view(self, limits: HostFileState, granted: bool) -> View:
        left_ms = self.open_left(limits.open_ms) if self.state == OPEN else 0
        return View(self.state, self.epoch, left_ms / 1000, granted, HOST_LINK)

    def open_left(self, open_ms: int) -> int:
        return max(self.opened_ms + open_ms - self.now, 0)

    def enter(self, state: str) -> None:
        self.state, self.successes = state, 0
        self.conn.execute("DELETE FROM breaker_trial WHERE name = ?", (self.name,))
        self.conn.execute("DELETE FROM breaker_window WHERE name = ?", (self.name,))

    def trip(self) -> None:
        self.epoch += 1
        self.enter(OPEN)
        self.opened_ms = self.now

    def count(self, window: Window, verdict: str) -> bool:
        """Enter a closed-state outcome in the window (in the slot of the one it pushes out); whether the window
        now trips the breaker."""
        key = (self.name, window.size)
        row = self.conn.execute("SELECT calls, failure, slow FROM breaker_window WHERE name = ? AND size = ?", key)
        calls, failures, slow = row.fetchone() or (0, 0, 0)
        slot = (*key, calls % window.size)
        if calls >= window.size:
            (old,) = self.conn.execute(
                "SELECT verdict FROM breaker_outcome WHERE name = ? AND size = ? AND slot = ?", slot
            ).fetchone()
            failures, slow = failures - (old == FAILURE), slow - (old == SLOW)
        self.conn.execute(
            "INSERT OR REPLACE INTO breaker_outcome (name, size, slot, verdict) VALUES (?, ?, ?, ?)", (*slot, verdict)
        )
        calls, failures, slow = calls + 1, failures + (verdict == FAILURE), slow + (verdict == SLOW)
        self.conn.execute(
            "INSERT OR REPLACE INTO breaker_window (name, size, calls, failure, slow) VALUES (?, ?, ?, ?, ?)",
            (*key, calls, failures, slow),
        )
        return window.trips(min(calls, window.size), failures, slow)

    def grant_trial(self, token: str, ttl_ms: int, max_trials: int) -> bool:
        self.conn.execute("DELETE FROM breaker_trial WHERE name = ? AND expires_ms <= ?", (self.name, self.now))
        (held,) = self.conn.execute("SELECT count(*) FROM breaker_trial WHERE name = ?", (self.name,)).fetchone()
        if held >= max_trials:
            return False
        self.conn.execute(
            "INSERT INTO breaker_trial (name, token, expires_ms) VALUES (?, ?, ?)",
            (self.name, token, self.now + ttl_ms),
        )
        return True


class Failover:
    """Redis first and, while it is unreachable, this host's state file: processes of one host keep sharing."""

    def __init__(self, primary: RedisState, fallback: HostFileState):
        self.name = primary.name
        self._primary, self._fallback = primary, fallback

    @property
    def up(self) -> bool:
        return self._primary.up or self._fallback.up

    @property
    def link(self) -> int:
        return self._primary.link if self._primary.up else self._fallback.link

    def run(self, op: str, token: str = "", epoch: int = 0, verdict: str = "") -> View | None:
        view = self._primary.run(op, token, epoch, verdict)
        return view if view is not None else self._fallback.run(op, token, epoch, verdict)


def shared_state(name: str, limits: list, redis_url: str | None, host: HostState | None, clock: Clock = SYSTEM_CLOCK):
    """Where the breaker ``name`` shares its state: Redis, the host file, Redis failing over to the file, or
    nowhere (None: per process). ``clock`` times the retries after an outage and, in the host file, the state."""
    redis_state = RedisState(redis_url, name, limits, clock) if redis_url else None
    host_state = HostFileState(host, name, limits, clock) if host is not None else None
    if redis_state is not None and host_state is not None:
        return Failover(redis_state, host_state)
    return redis_state or host_state
