"""The circuit breaker in front of model calls: decided before the call, told the outcome after it.

pybreaker supplies the states, the listeners and the Redis key layout, but its ``call()`` holds a lock while the
protected call runs, which would serialise every thread; so it is never used. ``allow()`` hands out a Permit
before the call and ``record()`` takes the outcome afterwards. Added here: failure-rate and slow-call windows
with a minimum number of calls, a bounded number of half-open trial calls, outcomes that count as neither
success nor failure (bad input), and state and window shared by the processes calling the same model
(app.ai.breaker_state: through Redis across hosts, through this host's state file without Redis) and kept per
process when neither answers.
"""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import pybreaker

from app.ai.breaker_state import FAILURE, SLOW, View, Window, shared_state
from app.clock import SYSTEM_CLOCK, Clock
from app.host_state import HostState
from app.logs import describe

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
SUCCESS, IGNORED = "success", "ignored"
OUTCOMES = frozenset({SUCCESS, FAILURE, IGNORED})

# `state` (a display: metrics, tests) trusts a shared answer this recent instead of asking again. allow() asks
# the store at every call while closed, so that no process lets a call through after another one tripped it.
SHARED_STATE_MAX_AGE_S = 0.05

# Within one epoch (one opening) the shared state only moves open -> half-open -> closed, and each opening
# starts a larger epoch, so (epoch, rank) orders the answers a store gives.
_RANK = {OPEN: 0, HALF_OPEN: 1, CLOSED: 2}


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave for one model call from `CircuitBreaker.allow`; hand it back to `CircuitBreaker.record`.

    ``state`` is the state it was granted in. A half-open permit carries a trial ``token``. When a shared store
    granted it, ``epoch`` is the opening it belongs to: the store counts its outcome only in that same period.
    ``generation`` ties it to this process's view, so an outcome that arrives after the breaker has moved on is
    not counted in the new state.
    """

    state: str
    generation: int
    token: str | None = None
    epoch: int | None = None


class _QuietListener(pybreaker.CircuitBreakerListener):
    """Passes state changes on; a listener that raises is logged, never allowed to break allow()/record()."""

    def __init__(self, listener: pybreaker.CircuitBreakerListener):
        self.listener = listener

    def state_change(self, cb, old_state, new_state) -> None:
        try:
            self.listener.state_change(cb, old_state, new_state)
        except Exception as exc:
            log.error("circuit breaker %s: a state_change listener failed: %s", cb.name, describe(exc))


class CircuitBreaker:
    """A circuit breaker that decides before a call (`allow`) and learns its outcome after it (`record`).

    Closed: every call is allowed; the last ``window_size`` outcomes are kept, and once there are
    ``minimum_calls`` of them it opens when the failure rate reaches ``failure_rate_threshold`` or the rate of
    successes slower than ``slow_call_seconds`` reaches ``slow_call_rate_threshold``.
    Open: every call is refused for ``open_seconds``; then the next ``allow()`` moves it to half-open.
    Half-open: at most ``half_open_max_calls`` trial calls at a time; ``half_open_successes_to_close``
    successful trials close it, one failed or slow trial opens it again. A trial permit that is never handed
    back is reclaimed after ``open_seconds`` (or ``slow_call_seconds`` if longer).

    With ``redis_url`` (across hosts) or ``host_state`` (across this host's processes; with both, the host file
    takes over while Redis is down) the state, its timing, the closed-state window, the trial permits and the
    half-open successes are shared by every process using the same ``name``: each allow() and each outcome is
    one operation on the store, so ``minimum_calls`` means the same with one process or many, and no process
    lets a call through once another has tripped it. With neither, or while neither answers, everything is per
    process. Transitions go through a pybreaker.CircuitBreaker, so ``listeners`` hear ``state_change`` in every
    process that makes or notices one. ``clock`` (app.clock) times the open period, trial permits, the shared
    answer's age and the host file; call durations come from the caller.
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
        host_state: HostState | None = None,
        listeners: Iterable[pybreaker.CircuitBreakerListener] = (),
        clock: Clock = SYSTEM_CLOCK,
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
        self._rule = Window(window_size, minimum_calls, failure_rate_threshold, slow_call_rate_threshold)
        self._slow_s = slow_call_seconds
        self._open_s = open_seconds
        self._max_trials = half_open_max_calls
        self._successes_to_close = half_open_successes_to_close
        self._trial_ttl_s = max(open_seconds, slow_call_seconds)
        self._clock = clock.monotonic
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
        self._window: deque[str] = deque()  # this process's own outcomes, while no store answers
        self._failures = 0
        self._slow = 0
        self._trials: dict[str, float] = {}  # this process's trial tokens -> expiry
        self._successes = 0
        self._token_prefix = uuid.uuid4().hex[:16]
        self._tokens = itertools.count()
        self._seen: tuple[int, int] | None = None  # (epoch, rank) of the newest shared state adopted
        self._link = 0
        self._checked_at = float("-inf")  # clock.monotonic() of the last shared answer
        limits = [
            max(1, round(open_seconds * 1000)),
            max(1, round(self._trial_ttl_s * 1000)),
            half_open_max_calls,
            half_open_successes_to_close,
            *self._rule,
        ]
        self._shared = shared_state(name, limits, redis_url, host_state, clock)

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open`` (when shared: at most SHARED_STATE_MAX_AGE_S old)."""
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
        token = self._new_token()
        view = self._shared.run("allow", token=token)
        with self._lock:
            if view is None:
                return self._allow_here()
            self._adopt(view)
            if view.granted:
                return Permit(HALF_OPEN, self._generation, token, view.epoch)
            if self._local.state != CLOSED:
                return None
            # An answer overtaken by a newer one was not adopted: the newer state decides, in its epoch.
            epoch, _ = self._seen or (view.epoch, 0)
            return Permit(CLOSED, self._generation, epoch=epoch)

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
            self._record_closed(permit, SLOW if slow else outcome)

    def _record_closed(self, permit: Permit, verdict: str) -> None:
        with self._lock:
            if permit.generation != self._generation or self._local.state != CLOSED:
                return  # admitted before the breaker last changed: it says nothing about the current state
        if permit.epoch is not None and self._shared is not None:
            view = self._shared.run("count", epoch=permit.epoch, verdict=verdict)
            if view is not None:
                with self._lock:
                    self._adopt(view)
                return
            # The store is gone: the outcome counts in this process's own window.
        with self._lock:
            if permit.generation != self._generation or self._local.state != CLOSED:
                return
            self._count(verdict)
            if self._rule.trips(len(self._window), self._failures, self._slow):
                self._enter(OPEN)

    def _record_trial(self, permit: Permit, verdict: str) -> None:
        if permit.epoch is not None and self._shared is not None:
            view = self._shared.run("trial", token=permit.token or "", epoch=permit.epoch, verdict=verdict)
            if view is not None:
                with self._lock:
                    self._adopt(view)
                return
            # The store is gone: its token expires there; the outcome still counts for this process's state.
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
            self._shared is not None and self._shared.up and self._clock() - self._checked_at < SHARED_STATE_MAX_AGE_S
        )

    def _adopt(self, view: View) -> None:
        """Take the shared state from a store's answer (lock held), unless a newer answer was taken already."""
        self._checked_at = self._clock()
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

    def _count(self, verdict: str) -> None:
        if len(self._window) == self._rule.size:
            old = self._window.popleft()
            self._failures -= old == FAILURE
            self._slow -= old == SLOW
        self._window.append(verdict)
        self._failures += verdict == FAILURE
        self._slow += verdict == SLOW

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
