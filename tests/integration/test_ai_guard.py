"""The AI guard against a real, misbehaving model server: every hook answers in budget with a clear card.

For each fault the model server can show (slow, trickling, hung, refusing, resetting, 500, malformed JSON, wrong
tensor shape): the hook answers within budget + 50 ms with a fallback card and no 5xx; the breaker opens once
its thresholds are crossed; while open the model server gets no call and the fallback path is cheap; after the
open period a limited number of trial calls go through and enough successes close it again.
"""

from __future__ import annotations

import json
import statistics
import time

import pytest

from tests.conftest import PUBLIC_BASE_URL
from tests.support.assertions import wait_for
from tests.support.fault_server import FaultModelServer

SERVICE = "/cds-services/cardiovascular-risk"
BUDGET_MS = 300
MIN_CALLS = 4
OPEN_SECONDS = 1.0
HALF_OPEN_CALLS = 2
FAULTS = [
    ("slow", {"delay_ms": 2 * BUDGET_MS}),
    ("trickle", {}),
    ("hang", {}),
    ("refuse", {}),
    ("reset", {}),
    ("error500", {}),
    ("malformed", {}),
    ("wrong-shape", {}),
]


@pytest.fixture
def model_server():
    with FaultModelServer() as server:
        yield server


@pytest.fixture
def guarded_app(make_app, model_server):
    """The gateway on the fault server, with small breaker thresholds. Late results are off here: a slow model's
    late answer would otherwise (rightly) be served to a later call of these tests; they have their own test."""
    return make_app(
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
        started = time.monotonic()
        response = app.test_client().post(
            SERVICE,
            data=json.dumps(body or hook_body),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        return response, time.monotonic() - started

    return call


def card_of(response) -> dict:
    assert response.status_code == 200
    (card,) = response.get_json()["cards"]
    return card


def test_a_healthy_remote_model_gives_the_risk_card_with_its_version(guarded_app, call_hook):
    card = card_of(call_hook(guarded_app)[0])
    assert card["summary"].startswith("10-year ASCVD risk")
    assert "ascvd-pce 2013.1" in card["source"]["label"]


@pytest.mark.parametrize(("mode", "options"), FAULTS, ids=[f[0] for f in FAULTS])
def test_each_fault_falls_back_in_budget_then_opens_the_breaker(guarded_app, model_server, call_hook, mode, options):
    model_server.set_mode(mode, **options)
    breaker = guarded_app.extensions["ai_guard"].breaker
    for _ in range(MIN_CALLS):
        response, elapsed = call_hook(guarded_app)
        card = card_of(response)
        assert "AI result unavailable" in card["source"]["label"], card
        assert elapsed < (BUDGET_MS + 50) / 1000, f"{mode}: {elapsed * 1000:.0f} ms"
    # A fast failure (refused, reset) is recorded by the call's own thread, and the opening is written to the
    # host state file, a moment after the hook has answered.
    wait_for(lambda: breaker.state == "open", f"{mode}: the breaker did not open")

    calls_before = model_server.calls
    durations = []
    for _ in range(20):
        response, elapsed = call_hook(guarded_app)
        assert "AI result unavailable" in card_of(response)["source"]["label"]
        durations.append(elapsed)
    assert model_server.calls == calls_before, "an open breaker let a call through"
    # Not a benchmark (bench/ai_guard.py is): a bound far below any wait for the model (budget 500 ms) that
    # a whole hook through the test client (JWT, prefetch, card, stored explanation) meets on a loaded machine.
    assert statistics.median(durations) < 0.015, (
        f"open-breaker fallback median {statistics.median(durations) * 1000:.1f} ms"
    )


def test_after_the_open_period_limited_trials_go_through_and_successes_close_it(guarded_app, model_server, call_hook):
    model_server.set_mode("error500")
    breaker = guarded_app.extensions["ai_guard"].breaker
    for _ in range(MIN_CALLS):
        call_hook(guarded_app)
    wait_for(lambda: breaker.state == "open", "the breaker did not open")
    model_server.set_mode("healthy")
    time.sleep(OPEN_SECONDS + 0.1)
    calls_before = model_server.calls
    summaries = [card_of(call_hook(guarded_app)[0])["summary"] for _ in range(HALF_OPEN_CALLS + 3)]
    assert model_server.calls - calls_before >= HALF_OPEN_CALLS
    wait_for(lambda: breaker.state == "closed", "the successful trials did not close the breaker")
    assert summaries[-1].startswith("10-year ASCVD risk")


def test_a_failed_trial_opens_the_breaker_again(guarded_app, model_server, call_hook):
    model_server.set_mode("error500")
    breaker = guarded_app.extensions["ai_guard"].breaker
    for _ in range(MIN_CALLS):
        call_hook(guarded_app)
    wait_for(lambda: breaker.state == "open", "the breaker did not open")
    time.sleep(OPEN_SECONDS + 0.1)
    call_hook(guarded_app)
    wait_for(lambda: breaker.state == "open", "the failed trial did not open the breaker again")


def test_the_late_result_of_a_timed_out_call_is_served_on_the_next_call(make_app, model_server, call_hook):
    app = make_app(AI_BACKEND="kserve", AI_URL=model_server.url, HOOK_BUDGET_MS=BUDGET_MS)
    model_server.set_mode("slow", delay_ms=BUDGET_MS + 100)
    first = card_of(call_hook(app)[0])
    assert "timed out" in first["source"]["label"]
    time.sleep(0.3)  # the model answers while nobody waits
    calls_before = model_server.calls
    second = card_of(call_hook(app)[0])
    assert second["summary"].startswith("10-year ASCVD risk")
    assert model_server.calls == calls_before, "the late result should have been used, not a new call"


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
    card = card_of(call_hook(app)[0])
    assert card["summary"].startswith("10-year ASCVD risk")


def test_outcomes_and_fallbacks_are_counted_at_metrics(guarded_app, model_server, call_hook):
    model_server.set_mode("error500")
    call_hook(guarded_app)
    text = guarded_app.test_client().get("/metrics").get_data(as_text=True)
    assert 'gateway_ai_calls_total{model="ascvd-pce",outcome="unavailable"}' in text
    assert 'gateway_fallbacks_total{reason="unavailable",service="cardiovascular-risk"}' in text
    assert "gateway_breaker_state" in text
    assert "gateway_hook_seconds_bucket" in text
