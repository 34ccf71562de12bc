"""AI inference: one entry point, ``infer``, in front of the configured backend and its guard."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from flask import current_app

from app.clock import SYSTEM_CLOCK, app_clock


@dataclass(frozen=True)
class Prediction:
    """A model's answer, with the name and version every card that uses it must show."""

    model: str
    version: str
    outputs: dict[str, Any]


class InferenceError(Exception):
    """Base of inference failures."""


class InvalidModelInput(InferenceError):
    """The inputs are outside what the model accepts; the caller's fault, not the model's."""


class ModelUnavailable(InferenceError):
    """The model could not answer (down, timed out, overloaded, unknown)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Model(Protocol):
    """An embedded model: a name, a version, and a pure ``predict``."""

    name: str
    version: str

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]: ...


class Backend(Protocol):
    def infer(self, model: str, inputs: dict[str, Any], timeout: float | None = None) -> Prediction: ...


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


def infer(model: str, inputs: dict[str, Any]) -> Prediction:
    """Run ``model`` on ``inputs`` through the guard, within the current hook's deadline."""
    return current_app.extensions["ai_guard"].infer(model, inputs)


SUMMARY_MODEL = "discharge-summary"


def summarise(inputs: dict[str, Any]) -> Prediction:
    """Draft a discharge summary from extracted encounter facts, through the summary model's own guard
    (``LLM_URL`` when set, else the embedded deterministic summariser), within ``LLM_TIMEOUT_S``."""
    from app.ai.guard import deadline

    with deadline(time.monotonic() + current_app.config["LLM_TIMEOUT_S"]):
        return current_app.extensions["summary_guard"].infer(SUMMARY_MODEL, inputs)


def summary_model_version(app) -> str:
    """Which summariser drafts now, as ``name@version``: part of a summary job's idempotency key, so a new
    model makes a new draft rather than reusing the old one."""
    config = app.config
    if config["LLM_URL"]:
        return f"llm:{config['LLM_MODEL']}"
    backend = app.extensions["summary_guard"].backend
    return f"{SUMMARY_MODEL}@{backend.model(SUMMARY_MODEL).version}"


def _breaker(name: str, config, slow_call_seconds: float, host_state=None, clock=SYSTEM_CLOCK):
    from app.ai.breaker import CircuitBreaker
    from app.ai.guard import Guard

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


def _summary_guard(config, host_state, clock=SYSTEM_CLOCK):
    """The guard in front of the summariser: a generative endpoint is slow by nature, so its deadline and
    slow-call threshold come from LLM_TIMEOUT_S, not from the hook budget."""
    from app.ai.guard import Guard, LateResults

    timeout = float(config["LLM_TIMEOUT_S"])
    if config["LLM_URL"]:
        from app.ai.openai_compat import ChatCompletionsBackend

        backend = ChatCompletionsBackend(config["LLM_URL"], config["LLM_MODEL"], api_key=config["LLM_API_KEY"])
        name = f"llm:{config['LLM_URL']}"
    else:
        from app.ai.local import LocalBackend
        from app.ai.models.discharge_summary import DischargeSummary

        # Not among the embedded models that `models serve` offers over KServe v2: a nested record and a
        # sectioned text do not fit its flat tensors.
        backend, name = LocalBackend([DischargeSummary()]), "summary:in-process"
    return Guard(
        backend,
        _breaker(name, config, slow_call_seconds=timeout * 0.8, host_state=host_state, clock=clock),
        max_in_flight=config["AI_MAX_IN_FLIGHT"],
        late_results=LateResults(ttl_seconds=0, clock=clock),
        default_timeout=timeout,
        call_timeout=timeout,
    )


def make_backend(config) -> Backend:
    """The backend ``AI_BACKEND`` names: embedded models in process, or a KServe v2 server at ``AI_URL``."""
    if config["AI_BACKEND"] == "kserve":
        from app.ai.kserve import KServeBackend

        return KServeBackend(config["AI_URL"])
    from app.ai.local import LocalBackend

    return LocalBackend.with_embedded_models()


def init_app(app) -> None:
    """Install the configured backend behind its guard, once per application; register ``flask models``."""
    from app.ai.guard import Guard, LateResults
    from app.ai.serve import init_cli

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
    app.extensions["summary_guard"] = _summary_guard(config, host_state, clock)
    init_cli(app)
