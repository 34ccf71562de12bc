"""AI inference: one entry point, ``infer``, in front of the configured backend and its guard."""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from typing import Any

from flask import current_app

from app.ai.breaker import CircuitBreaker
from app.ai.guard import Guard, LateResults
from app.ai.kserve import KServeBackend
from app.ai.local import LocalBackend
from app.ai.serve import init_cli
from app.ai.types import Backend, InferenceError, InvalidModelInput, Model, ModelUnavailable, Prediction
from app.cds.service import load_services, services
from app.clock import SYSTEM_CLOCK, app_clock

__all__ = [
    "Backend",
    "InferenceError",
    "InvalidModelInput",
    "Model",
    "ModelUnavailable",
    "Prediction",
    "batch_lane",
    "infer",
]


# What a fallback card says about why the AI result is missing, by ModelUnavailable.reason.
REASON_TEXT = {
    "timeout": "timed out",
    "circuit-open": "unavailable",
    "unavailable": "unavailable",
    "bad-response": "unavailable",
    "error": "unavailable",
    "overloaded": "overloaded",
    "unknown-model": "unavailable",
    "invalid-input": "not applicable",
}


def reason_text(reason: str) -> str:
    return REASON_TEXT.get(reason, "unavailable")


_batch_lane: contextvars.ContextVar[bool] = contextvars.ContextVar("ai_batch_lane", default=False)
_lane_lock = threading.Lock()


def infer(model: str, inputs: dict[str, Any]) -> Prediction:
    """Run ``model`` on ``inputs`` through its guard, within the current deadline: a model a service registered
    (``@cds_service(models=...)``) behind its own guard, any other through the configured backend's. Inside
    ``batch_lane()`` the same guard's breaker is used with the batch's own bulkhead."""
    return model_guard(current_app, model).infer(model, inputs)


@contextlib.contextmanager
def batch_lane() -> Iterator[None]:
    """Model calls made inside this block are population work: a bulkhead of ``BATCH_AI_MAX_IN_FLIGHT`` of their
    own, so that a batch never takes model capacity from hooks, and the call timeout as their deadline."""
    token = _batch_lane.set(True)
    try:
        yield
    finally:
        _batch_lane.reset(token)


def model_guard(app, model: str):
    """The guard that ``infer`` uses for ``model`` in ``app`` (in the current lane)."""
    guard = app.extensions.get("ai_models", {}).get(model) or app.extensions["ai_guard"]
    if not _batch_lane.get():
        return guard
    lanes = app.extensions.setdefault("ai_batch_guards", {})
    lane = lanes.get(id(guard))
    if lane is None:
        with _lane_lock:  # one bulkhead per guard, made once even when parts start together
            lane = lanes.setdefault(id(guard), guard.with_bulkhead(app.config["BATCH_AI_MAX_IN_FLIGHT"]))
    return lane


def register_model(app, model: str, guard) -> None:
    """Serve ``model`` through ``guard`` (a Guard in front of its own backend) instead of the configured backend."""
    models = app.extensions.setdefault("ai_models", {})
    if model in models:
        raise ValueError(f"model {model!r} is registered twice")
    models[model] = guard


def _breaker(name: str, config, slow_call_seconds: float, host_state=None, clock=SYSTEM_CLOCK):

    return CircuitBreaker(
        name,
        failure_rate_threshold=config["BREAKER_FAILURE_RATE"],
        slow_call_rate_threshold=config["BREAKER_SLOW_CALL_RATE"],
        slow_call_seconds=slow_call_seconds,
        window_size=config["BREAKER_WINDOW"],
        minimum_calls=config["BREAKER_MIN_CALLS"],
        open_seconds=config["BREAKER_OPEN_SECONDS"],
        half_open_max_calls=config["BREAKER_HALF_OPEN_CALLS"],
        redis_url=config["REDIS_URL"],
        host_state=host_state,
        listeners=[Guard.breaker_listener()],
        clock=clock,
    )


def make_guard(app, backend: Backend, *, endpoint: str, timeout: float):
    """A guard for a model a service brings: its own circuit breaker (named by ``endpoint``, shared across
    processes like the others; slow calls at 80 % of ``timeout``), bulkhead, and ``timeout`` as both its
    default deadline and its call timeout. No late results: such a model is not called against a hook budget."""

    clock = app_clock(app)
    return Guard(
        backend,
        _breaker(endpoint, app.config, timeout * 0.8, app.extensions.get("host_state"), clock),
        max_in_flight=app.config["AI_MAX_IN_FLIGHT"],
        late_results=LateResults(ttl_seconds=0, clock=clock),
        default_timeout=timeout,
        call_timeout=timeout,
    )


def make_backend(config) -> Backend:
    """The backend ``AI_BACKEND`` names: embedded models in process, or a KServe v2 server at ``AI_URL``."""
    if config["AI_BACKEND"] == "kserve":
        return KServeBackend(config["AI_URL"])

    return LocalBackend.with_embedded_models()


def init_app(app) -> None:
    """Install the configured backend behind its guard, and each model a service brings behind its own, once per
    application; register ``flask models``."""

    config = app.config
    backend = make_backend(config)
    # One breaker per model endpoint, shared by every process calling it (through Redis, or this host's file).
    host_state = app.extensions.get("host_state")  # absent in apps built for a unit test: per process
    clock = app_clock(app)
    breaker = _breaker(
        f"ai:{config['AI_BACKEND']}:{config['AI_URL'] or 'in-process'}",
        config,
        config["BREAKER_SLOW_CALL_MS"] / 1000,
        host_state,
        clock,
    )
    app.extensions["ai_guard"] = Guard(
        backend,
        breaker,
        max_in_flight=config["AI_MAX_IN_FLIGHT"],
        late_results=LateResults(ttl_seconds=config["LATE_RESULT_TTL_S"], clock=clock),
        default_timeout=config["HOOK_BUDGET_MS"] / 1000,
        call_timeout=config["AI_CALL_TIMEOUT_MS"] / 1000,
    )
    load_services()
    for service in services():
        for model, factory in service.models.items():
            register_model(app, model, factory(app))
    init_cli(app)
