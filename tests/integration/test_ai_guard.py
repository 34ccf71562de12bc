"""The AI guard against a real, misbehaving model server: every hook answers in budget with a clear card.

For each fault the model server can show (slow, trickling, hung, refusing, resetting, 500, malformed JSON, wrong
tensor shape): the hook answers with a fallback card that names the fault's reason and no 5xx; the breaker opens
once its thresholds are crossed; while open the model server gets no call and the fallback says why; after the
open period a limited number of trial calls go through and enough successes close it again. How long each path
takes is measured by bench/fallback_timing.py, not asserted here.
"""

from __future__ import annotations

import json

import pytest

from app.ai import Prediction
from app.ai.guard import LateResults
from tests.conftest import PUBLIC_BASE_URL
from tests.support.assertions import wait_for
from tests.support.clock import FakeClock
from tests.support.fault_server import FaultModelServer

SERVICE = "/cds-services/cardiovascular-risk"
BUDGET_MS = 300
MIN_CALLS = 4
OPEN_SECONDS = 1.0
HALF_OPEN_CALLS = 2
# Each fault, its settings, and the reason its fallback must carry (the audit record's outcome).
FAULTS = [
    ("slow", {"delay_ms": 2 * BUDGET_MS}, "timeout"),
    ("trickle", {}, "timeout"),
    ("hang", {}, "timeout"),
    ("refuse", {}, "unavailable"),
    ("reset", {}, "unavailable"),
    ("error500", {}, "unavailable"),
    ("malformed", {}, "bad-response"),
    ("wrong-shape", {}, "bad-response"),
]


@pytest.fixture
def model_server():
    with FaultModelServer() as server:
        yield server


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def guarded_app(make_app, model_server):
    """The gateway on the fault server, with small breaker thresholds. Late results are off here: a slow model's
    late answer would otherwise (rightly) be served to a later call of these tests; they have their own test."""
    return make_app(**guarded_settings(model_server))


@pytest.fixture
def clocked_app(make_app, model_server, clock):
    """As ``guarded_app``, on a clock the test moves: the breaker's open period passes without waiting."""
    return make_app(**guarded_settings(model_server), CLOCK=clock)


def guarded_settings(model_server) -> dict:
    return dict(
        LATE_RESULT_TTL_S=0,
        AI_BACKEND="kserve",
        AI_URL=model_server.url,
        HOOK_BUDGET_MS=BUDGET_MS,
        BREAKER_WINDOW=MIN_CALLS,
        BREAKER_MIN_CALLS=MIN_CALLS,
        BREAKER_OPEN_SECONDS=OPEN_SECONDS,
        BREAKER_HALF_OPEN_CALLS=HALF_OPEN_CALLS,
        BREAKER_SLOW_CALL_MS=BUDGET_MS,
    )


@pytest.fixture
def call_hook(signing_key, hook_body):
    def call(app, body=None):
        token = signing_key.token(PUBLIC_BASE_URL + SERVICE)
        return app.test_client().post(
            SERVICE,
            data=json.dumps(body or hook_body),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )

    return call


def last_outcome(audit_records) -> str:
    """How the last hook call came about: ``cards`` or ``fallback:<reason>``."""
    return audit_records("hook")[-1]["outcome"]


def card_of(response) -> dict:
    assert response.status_code == 200
    (card,) = response.get_json()["cards"]
    return card


def test_a_healthy_remote_model_gives_the_risk_card_with_its_version(guarded_app, call_hook):
    card = card_of(call_hook(guarded_app))
    assert card["summary"].startswith("10-year ASCVD risk")
    assert "ascvd-pce 2013.1" in card["source"]["label"]


@pytest.mark.parametrize(("mode", "options", "reason"), FAULTS, ids=[f[0] for f in FAULTS])
def test_each_fault_falls_back_with_its_reason_then_opens_the_breaker(
    guarded_app, model_server, call_hook, audit_records, mode, options, reason
):
    model_server.set_mode(mode, **options)
    breaker = guarded_app.extensions["ai_guard"].breaker
    for _ in range(MIN_CALLS):
        card = card_of(call_hook(guarded_app))
        assert "AI result unavailable" in card["source"]["label"], card
        assert last_outcome(audit_records) == f"fallback:{reason}"
    # A fast failure (refused, reset) is recorded by the call's own thread, and the opening is written to the
    # host state file, a moment after the hook has answered.
    wait_for(lambda: breaker.state == "open", f"{mode}: the breaker did not open")

    calls_before = model_server.calls
    for _ in range(5):
        assert "AI result unavailable" in card_of(call_hook(guarded_app))["source"]["label"]
        assert last_outcome(audit_records) == "fallback:circuit-open"
    assert model_server.calls == calls_before, "an open breaker let a call through"


def test_after_the_open_period_limited_trials_go_through_and_successes_close_it(
    clocked_app, model_server, call_hook, clock
):
    model_server.set_mode("error500")
    breaker = clocked_app.extensions["ai_guard"].breaker
    for _ in range(MIN_CALLS):
        call_hook(clocked_app)
    wait_for(lambda: breaker.state == "open", "the breaker did not open")
    model_server.set_mode("healthy")
    calls_before = model_server.calls
    assert "AI result unavailable" in card_of(call_hook(clocked_app))["source"]["label"]  # still open
    assert model_server.calls == calls_before
    clock.advance(OPEN_SECONDS)
    summaries = [card_of(call_hook(clocked_app))["summary"] for _ in range(HALF_OPEN_CALLS + 3)]
    assert model_server.calls - calls_before >= HALF_OPEN_CALLS
    wait_for(lambda: breaker.state == "closed", "the successful trials did not close the breaker")
    assert summaries[-1].startswith("10-year ASCVD risk")


def test_a_failed_trial_opens_the_breaker_again(clocked_app, model_server, call_hook, clock):
    model_server.set_mode("error500")
    breaker = clocked_app.extensions["ai_guard"].breaker
    for _ in range(MIN_CALLS):
        call_hook(clocked_app)
    wait_for(lambda: breaker.state == "open", "the breaker did not open")
    clock.advance(OPEN_SECONDS)
    calls_before = model_server.calls
    call_hook(clocked_app)
    assert model_server.calls == calls_before + 1  # the trial went through
    wait_for(lambda: breaker.state == "open", "the failed trial did not open the breaker again")


def test_the_late_result_of_a_timed_out_call_is_served_on_the_next_call(make_app, model_server, call_hook):
    app = make_app(AI_BACKEND="kserve", AI_URL=model_server.url, HOOK_BUDGET_MS=BUDGET_MS)
    model_server.set_mode("slow", delay_ms=BUDGET_MS + 100)
    first = card_of(call_hook(app))
    assert "timed out" in first["source"]["label"]
    late_results = app.extensions["ai_guard"].late_results
    wait_for(lambda: len(late_results) == 1, "the model's late answer was not kept")
    calls_before = model_server.calls
    second = card_of(call_hook(app))
    assert second["summary"].startswith("10-year ASCVD risk")
    assert model_server.calls == calls_before, "the late result should have been used, not a new call"


def test_late_results_expire_on_the_clock_they_are_given():
    clock = FakeClock()
    kept = LateResults(ttl_seconds=300, clock=clock)
    prediction = Prediction("ascvd-pce", "2013.1", {"risk": 0.1})
    kept.put("a", prediction)
    kept.put("b", prediction)
    clock.advance(299.9)
    assert kept.take("a") is prediction
    assert kept.take("a") is None, "a late result is handed over once"
    clock.advance(0.1)
    assert kept.take("b") is None
    never = LateResults(ttl_seconds=0, clock=clock)
    never.put("c", prediction)
    assert never.take("c") is None, "a zero TTL keeps nothing, even on a clock that has not moved"


def test_bad_input_never_moves_the_breaker(make_app):
    from app.ai import InvalidModelInput

    app = make_app(BREAKER_WINDOW=MIN_CALLS, BREAKER_MIN_CALLS=MIN_CALLS)
    guard = app.extensions["ai_guard"]
    too_young = {
        "age": 20,
        "sex": "male",
        "race": "white",
        "total_cholesterol": 200,
        "hdl": 50,
        "systolic_bp": 120,
        "treated_hypertension": False,
        "smoker": False,
        "diabetes": False,
    }
    with app.app_context():
        for _ in range(3 * MIN_CALLS):
            with pytest.raises(InvalidModelInput):
                guard.infer("ascvd-pce", too_young)
    assert guard.breaker.state == "closed"


def test_redis_down_at_start_changes_nothing_visible(make_app, model_server, call_hook):
    app = make_app(AI_BACKEND="kserve", AI_URL=model_server.url, REDIS_URL="redis://127.0.0.1:1/0")
    card = card_of(call_hook(app))
    assert card["summary"].startswith("10-year ASCVD risk")


def test_outcomes_and_fallbacks_are_counted_at_metrics(guarded_app, model_server, call_hook):
    model_server.set_mode("error500")
    call_hook(guarded_app)
    text = guarded_app.test_client().get("/metrics").get_data(as_text=True)
    assert 'gateway_ai_calls_total{model="ascvd-pce",outcome="unavailable"}' in text
    assert 'gateway_fallbacks_total{reason="unavailable",service="cardiovascular-risk"}' in text
    assert "gateway_breaker_state" in text
    assert "gateway_hook_seconds_bucket" in text
