"""The guard every model call goes through: one deadline, a bulkhead, a circuit breaker, and late results.

The call runs on a worker thread and the caller waits on its future for the time left, because socket
timeouts alone do not bound a server that trickles bytes. The breaker decides before the call and learns the
outcome after it (it is never wrapped around the call, which would serialise every thread).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, NoReturn

import orjson
import pybreaker

from app.ai.breaker import CircuitBreaker, Permit
from app.ai.types import Backend, InvalidModelInput, ModelUnavailable, Prediction
from app.clock import SYSTEM_CLOCK, Clock
from app.logs import describe
from app.metrics import AI_CALL_SECONDS, AI_CALLS, BREAKER_STATE, BREAKER_TRANSITIONS

log = logging.getLogger(__name__)

STATE_NUMBER = {pybreaker.STATE_CLOSED: 0, pybreaker.STATE_HALF_OPEN: 1, pybreaker.STATE_OPEN: 2}

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("ai_deadline", default=None)


@contextlib.contextmanager
def deadline(at: float) -> Iterator[None]:
    """Model calls made inside this block must answer before ``at`` (time.monotonic)."""
    token = _deadline.set(at)
    try:
        yield
    finally:
        _deadline.reset(token)


def current_deadline(default_seconds: float) -> float:
    at = _deadline.get()
    return at if at is not None else time.monotonic() + default_seconds


def inputs_key(model: str, inputs: dict[str, Any]) -> str:
    """A stable digest of a model call, so that a late result can be matched to the next identical call."""
    return hashlib.sha256(orjson.dumps([model, inputs], option=orjson.OPT_SORT_KEYS)).hexdigest()


class LateResults:
    """Results that came after their deadline, kept (bounded, expiring on ``clock``) for the next call with the
    same inputs."""

    def __init__(self, max_entries: int = 4096, ttl_seconds: float = 300.0, clock: Clock = SYSTEM_CLOCK):
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, Prediction]] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_entries
        self._ttl = ttl_seconds

    def put(self, key: str, prediction: Prediction) -> None:
        with self._lock:
            self._items[key] = (self._clock.monotonic() + self._ttl, prediction)
            self._items.move_to_end(key)
            while len(self._items) > self._max:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        """How many results are kept (expired ones included until taken or pushed out)."""
        with self._lock:
            return len(self._items)

    def take(self, key: str) -> Prediction | None:
        """The kept result for ``key``, handed over once."""
        with self._lock:
            item = self._items.pop(key, None)
        if item is None or item[0] <= self._clock.monotonic():
            return None
        return item[1]


class _BreakerMetrics(pybreaker.CircuitBreakerListener):
    def state_change(self, cb, old_state, new_state) -> None:
        old = old_state.name if old_state else "none"
        BREAKER_TRANSITIONS.labels(cb.name, old, new_state.name).inc()
        BREAKER_STATE.labels(cb.name).set(STATE_NUMBER.get(new_state.name, 0))


class Guard:
    """Runs ``backend.infer`` within the caller's deadline, behind a bulkhead and a circuit breaker."""

    def __init__(
        self,
        backend: Backend,
        breaker: CircuitBreaker,
        max_in_flight: int = 16,
        late_results: LateResults | None = None,
        default_timeout: float = 0.5,
        call_timeout: float = 2.0,
    ):
        self.backend = backend
        self.breaker = breaker
        self.late_results = late_results if late_results is not None else LateResults()
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._executor = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="ai-call")
        self._default_timeout = default_timeout
        # The caller waits only until its deadline; the call itself may run on (holding its bulkhead slot) up to
        # call_timeout, so that a result that comes late is kept for the next call instead of wasted.
        self._call_timeout = call_timeout

    def with_bulkhead(self, max_in_flight: int) -> Guard:
        """A guard over the same backend and breaker (so it sees the same outage) with a bulkhead of its own, for
        work that must never take capacity from hooks (a population batch); its calls wait up to the call
        timeout, not a hook's budget, and leave no late results."""
        return Guard(
            self.backend,
            self.breaker,
            max_in_flight=max_in_flight,
            late_results=LateResults(ttl_seconds=0),
            default_timeout=self._call_timeout,
            call_timeout=self._call_timeout,
        )

    @staticmethod
    def breaker_listener() -> pybreaker.CircuitBreakerListener:
        """The listener that keeps breaker metrics; pass it to the CircuitBreaker."""
        return _BreakerMetrics()

    def infer(self, model: str, inputs: dict[str, Any]) -> Prediction:
        """The model's answer, or ModelUnavailable(reason) at once: circuit-open, overloaded, timeout, ..."""
        at = current_deadline(self._default_timeout)
        key = inputs_key(model, inputs)
        late = self.late_results.take(key)
        if late is not None:
            AI_CALLS.labels(model, "late-result").inc()
            return late
        permit = self.breaker.allow()
        BREAKER_STATE.labels(self.breaker.name).set(STATE_NUMBER.get(self.breaker.state, 0))
        if permit is None:
            return self._refuse(model, "circuit-open")
        if not self._slots.acquire(blocking=False):
            self.breaker.record(permit, "ignored", 0.0)
            return self._refuse(model, "overloaded")
        remaining = at - time.monotonic()
        if remaining <= 0:
            self._slots.release()
            self.breaker.record(permit, "ignored", 0.0)
            return self._refuse(model, "timeout")
        call = _Call(self, model, key, permit, at)
        future = self._executor.submit(self.backend.infer, model, inputs, max(remaining, self._call_timeout))
        future.add_done_callback(call.finished)
        try:
            return future.result(timeout=remaining)
        except FutureTimeout:
            call.timed_out()
            raise ModelUnavailable("timeout", "no answer within the deadline") from None
        except (InvalidModelInput, ModelUnavailable):
            raise
        except Exception as exc:
            raise ModelUnavailable("error", type(exc).__name__) from None

    @staticmethod
    def _refuse(model: str, reason: str) -> NoReturn:
        AI_CALLS.labels(model, reason).inc()
        raise ModelUnavailable(reason)


class _Call:
    """One call's bookkeeping: its outcome is recorded exactly once, at the deadline or when it ends."""

    def __init__(self, guard: Guard, model: str, key: str, permit: Permit, deadline_at: float):
        self.guard, self.model, self.key, self.permit, self.deadline_at = guard, model, key, permit, deadline_at
        self.started = time.monotonic()
        self._recorded = False
        self._lock = threading.Lock()

    def _record_once(self, outcome: str, metric: str) -> None:
        with self._lock:
            if self._recorded:
                return
            self._recorded = True
        self.guard.breaker.record(self.permit, outcome, time.monotonic() - self.started)
        AI_CALLS.labels(self.model, metric).inc()

    def timed_out(self) -> None:
        self._record_once("failure", "timeout")

    def finished(self, future: Future) -> None:
        self.guard._slots.release()
        AI_CALL_SECONDS.labels(self.model).observe(time.monotonic() - self.started)
        exc = future.exception()
        if exc is None:
            self._record_once("success", "success")
            if time.monotonic() > self.deadline_at:
                self.guard.late_results.put(self.key, future.result())
        elif isinstance(exc, InvalidModelInput):
            self._record_once("ignored", "invalid-input")
        else:
            reason = exc.reason if isinstance(exc, ModelUnavailable) else "error"
            if not isinstance(exc, ModelUnavailable):
                log.error("model %s call failed: %s", self.model, describe(exc))
            self._record_once("failure", reason)
