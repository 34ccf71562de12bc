"""The circuit breaker on per-process state: rate windows, half-open trials, late outcomes, listeners, threads."""

from __future__ import annotations

import logging
import threading

import pybreaker
import pytest

from app.ai.breaker import CircuitBreaker, Permit
from tests.support.clock import FakeClock

OPEN_SECONDS = 30.0


class StateChanges(pybreaker.CircuitBreakerListener):
    def __init__(self):
        self.changes: list[tuple[str, str, str]] = []

    def state_change(self, cb, old_state, new_state) -> None:
        self.changes.append((cb.name, old_state.name, new_state.name))


def make(clock: FakeClock | None = None, **settings) -> CircuitBreaker:
    options = {
        "window_size": 10,
        "minimum_calls": 5,
        "open_seconds": OPEN_SECONDS,
        "half_open_max_calls": 2,
        "half_open_successes_to_close": 2,
        "slow_call_seconds": 0.4,
        "clock": clock or FakeClock(),
        **settings,
    }
    return CircuitBreaker("model", **options)


def call(breaker: CircuitBreaker, outcome: str, duration_s: float = 0.01) -> Permit:
    permit = breaker.allow()
    assert permit is not None, "the breaker refused a call it should have allowed"
    breaker.record(permit, outcome, duration_s)
    return permit


def open_breaker(breaker: CircuitBreaker, calls: int = 5) -> None:
    for _ in range(calls):
        call(breaker, "failure")
    assert breaker.state == pybreaker.STATE_OPEN


def half_open_breaker(breaker: CircuitBreaker, clock: FakeClock) -> None:
    open_breaker(breaker)
    clock.advance(OPEN_SECONDS)


def test_failure_rate_opens_it_only_once_minimum_calls_are_recorded():
    breaker = make(minimum_calls=5, failure_rate_threshold=0.5)
    for _ in range(4):
        call(breaker, "failure")
    assert breaker.state == "closed", "4 failures out of 4 must not open it before minimum_calls (5)"
    call(breaker, "failure")
    assert breaker.state == "open"


def test_failure_rate_below_the_threshold_keeps_it_closed_and_old_outcomes_leave_the_window():
    breaker = make(window_size=10, minimum_calls=10, failure_rate_threshold=0.5)
    for outcome in ["success"] * 6 + ["failure"] * 4:
        call(breaker, outcome)
    assert breaker.state == "closed", "4 failures in 10 is below 50 %"
    call(breaker, "failure")  # the oldest success leaves the window: 5 failures in the last 10
    assert breaker.state == "open"


def test_slow_successes_open_it_at_the_slow_call_rate():
    breaker = make(window_size=5, minimum_calls=5, slow_call_rate_threshold=0.8, slow_call_seconds=0.4)
    for _ in range(4):
        call(breaker, "success", duration_s=0.5)
    assert breaker.state == "closed"
    call(breaker, "success", duration_s=0.1)
    assert breaker.state == "open", "4 slow calls in 5 reach the 80 % slow-call rate"


def test_slow_successes_are_not_failures():
    breaker = make(window_size=5, minimum_calls=5, failure_rate_threshold=0.2, slow_call_rate_threshold=1.0)
    for _ in range(4):
        call(breaker, "success", duration_s=0.5)
    call(breaker, "success", duration_s=0.1)
    assert breaker.state == "closed", "a failure rate of 20 % must not be reached by slow successes"


def test_ignored_outcomes_move_nothing():
    breaker = make(minimum_calls=5)
    for _ in range(50):
        call(breaker, "ignored", duration_s=5.0)
    for _ in range(4):
        call(breaker, "failure")
    assert breaker.state == "closed", "ignored calls must not count towards minimum_calls"
    call(breaker, "failure")
    assert breaker.state == "open"


def test_open_refuses_every_call_until_open_seconds_have_passed():
    clock = FakeClock()
    breaker = make(clock)
    open_breaker(breaker)
    clock.advance(OPEN_SECONDS - 0.1)
    assert all(breaker.allow() is None for _ in range(100))
    assert breaker.state == "open"


def test_the_next_call_after_open_seconds_is_a_half_open_trial():
    clock = FakeClock()
    breaker = make(clock)
    open_breaker(breaker)
    clock.advance(OPEN_SECONDS)
    assert breaker.state == "open", "only allow() moves an open breaker to half-open"
    permit = breaker.allow()
    assert permit is not None and permit.state == "half-open" and permit.token
    assert breaker.state == "half-open"


def test_half_open_hands_out_at_most_max_calls_trials_to_racing_threads():
    clock = FakeClock()
    breaker = make(clock, half_open_max_calls=3)
    half_open_breaker(breaker, clock)
    start = threading.Barrier(32)
    permits: list[Permit | None] = []

    def race() -> None:
        start.wait()
        permits.append(breaker.allow())

    threads = [threading.Thread(target=race) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    granted = [p for p in permits if p is not None]
    assert len(granted) == 3
    assert {p.state for p in granted} == {"half-open"}
    assert len({p.token for p in granted}) == 3


def test_a_recorded_trial_gives_its_permit_back():
    clock = FakeClock()
    breaker = make(clock, half_open_max_calls=1)
    half_open_breaker(breaker, clock)
    trial = breaker.allow()
    assert trial is not None and breaker.allow() is None
    breaker.record(trial, "ignored", 0.0)
    assert breaker.state == "half-open", "an ignored trial neither closes nor opens the breaker"
    assert breaker.allow() is not None


def test_successful_trials_close_it_with_a_fresh_window():
    clock = FakeClock()
    breaker = make(clock, half_open_successes_to_close=2, minimum_calls=5)
    half_open_breaker(breaker, clock)
    call(breaker, "success")
    assert breaker.state == "half-open"
    call(breaker, "success")
    assert breaker.state == "closed"
    for _ in range(4):
        call(breaker, "failure")
    assert breaker.state == "closed", "the failures from before the opening must not count again"


@pytest.mark.parametrize(("outcome", "duration_s"), [("failure", 0.01), ("success", 0.5)], ids=["failed", "slow"])
def test_a_failed_or_slow_trial_opens_it_again_for_open_seconds(outcome, duration_s):
    clock = FakeClock()
    breaker = make(clock)
    half_open_breaker(breaker, clock)
    call(breaker, "success")
    call(breaker, outcome, duration_s)
    assert breaker.state == "open"
    clock.advance(OPEN_SECONDS - 0.1)
    assert breaker.allow() is None


def test_a_late_outcome_from_a_closed_permit_does_not_move_a_half_open_breaker():
    clock = FakeClock()
    breaker = make(clock, half_open_successes_to_close=1)
    late_success, late_failure = breaker.allow(), breaker.allow()
    half_open_breaker(breaker, clock)
    trial = breaker.allow()
    assert late_success is not None and late_failure is not None and trial is not None
    breaker.record(late_success, "success", 0.01)
    breaker.record(late_failure, "failure", 0.01)
    assert breaker.state == "half-open", "outcomes of calls admitted while closed say nothing about the trial"
    breaker.record(trial, "success", 0.01)
    assert breaker.state == "closed"


def test_a_late_outcome_from_before_an_opening_does_not_count_after_closing():
    clock = FakeClock()
    breaker = make(clock, minimum_calls=1, window_size=1, half_open_successes_to_close=1)
    late = breaker.allow()
    assert late is not None
    open_breaker(breaker, calls=1)
    clock.advance(OPEN_SECONDS)
    call(breaker, "success")
    assert breaker.state == "closed"
    breaker.record(late, "failure", 0.01)
    assert breaker.state == "closed"


def test_trial_permits_never_handed_back_are_reclaimed_after_open_seconds():
    clock = FakeClock()
    breaker = make(clock, half_open_max_calls=2)
    half_open_breaker(breaker, clock)
    assert breaker.allow() is not None and breaker.allow() is not None  # their workers die: never recorded
    assert breaker.allow() is None
    clock.advance(OPEN_SECONDS - 0.1)
    assert breaker.allow() is None
    clock.advance(0.1)
    assert breaker.allow() is not None
    assert breaker.state == "half-open"


def test_listeners_hear_every_state_change_and_each_is_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="app.ai.breaker")
    clock = FakeClock()
    listener = StateChanges()
    breaker = make(clock, listeners=[listener], half_open_successes_to_close=1)
    half_open_breaker(breaker, clock)
    call(breaker, "failure")
    clock.advance(OPEN_SECONDS)
    call(breaker, "success")
    expected = [
        ("closed", "open"),
        ("open", "half-open"),
        ("half-open", "open"),
        ("open", "half-open"),
        ("half-open", "closed"),
    ]
    assert listener.changes == [("model", old, new) for old, new in expected]
    logged = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert logged == [
        ("WARNING" if new == "open" else "INFO", f"circuit breaker model: {old} -> {new}") for old, new in expected
    ]


def test_a_failing_listener_is_logged_and_does_not_break_the_breaker(caplog):
    class Broken(pybreaker.CircuitBreakerListener):
        def state_change(self, cb, old_state, new_state) -> None:
            raise RuntimeError("listener bug")

    breaker = make(listeners=[Broken()])
    open_breaker(breaker)
    assert breaker.allow() is None
    assert any("listener failed" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def test_permits_do_not_serialise_the_calls_they_admit():
    breaker = make()
    all_admitted = threading.Barrier(16, timeout=10)
    errors: list[BaseException] = []

    def call_in_flight() -> None:
        try:
            permit = breaker.allow()
            assert permit is not None
            # Every thread holds its permit here until all 16 do: if a permit held the breaker's lock while
            # its call runs, the second allow() would block and the barrier would break.
            all_admitted.wait()
            breaker.record(permit, "success", 0.1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call_in_flight) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_allow_and_record_from_16_threads_keep_the_counts_consistent():
    """Concurrent use corrupts no count: 10 % failures keep it closed, and afterwards a window of known outcomes
    opens it exactly at the threshold. (How fast this runs is measured by bench/fallback_timing.py.)"""
    breaker = make(window_size=20, minimum_calls=10)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for i in range(1000):
                permit = breaker.allow()
                assert permit is not None
                breaker.record(permit, "failure" if i % 10 == 0 else "success", 0.01)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert breaker.state == "closed"
    for _ in range(20):
        call(breaker, "success")
    for _ in range(9):
        call(breaker, "failure")
    assert breaker.state == "closed", "9 failures in a window of 20 are under the 50 % threshold"
    call(breaker, "failure")
    assert breaker.state == "open"


def test_an_unknown_outcome_is_a_programming_error():
    breaker = make()
    permit = breaker.allow()
    assert permit is not None
    with pytest.raises(ValueError, match="outcome"):
        breaker.record(permit, "timeout", 0.5)


@pytest.mark.parametrize(
    "settings",
    [
        {"failure_rate_threshold": 0},
        {"slow_call_rate_threshold": 1.5},
        {"minimum_calls": 11, "window_size": 10},
        {"open_seconds": 0},
        {"half_open_max_calls": 0},
        {"half_open_successes_to_close": 0},
    ],
)
def test_settings_that_cannot_work_are_rejected(settings):
    with pytest.raises(ValueError):
        make(**settings)


def test_state_shared_through_the_host_file_follows_the_clock_it_is_given(tmp_path):
    from app.host_state import HostState

    clock = FakeClock()
    host = HostState(tmp_path / "host-state.db")
    first, second = make(clock, host_state=host), make(clock, host_state=host)
    assert second.allow() is not None
    open_breaker(first)
    clock.advance(1)  # older than SHARED_STATE_MAX_AGE_S: the second asks the file again
    assert second.allow() is None, "the opening is shared"
    clock.advance(OPEN_SECONDS - 2)
    assert second.allow() is None, "still within the open period on this clock"
    clock.advance(1)
    permit = second.allow()
    assert permit is not None and permit.state == "half-open"
