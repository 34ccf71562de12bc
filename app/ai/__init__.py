"""AI inference: one entry point, ``infer``, in front of the configured backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from flask import current_app


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
    def infer(self, model: str, inputs: dict[str, Any]) -> Prediction: ...


def infer(model: str, inputs: dict[str, Any]) -> Prediction:
    """Run ``model`` on ``inputs`` through the current application's backend."""
    backend: Backend = current_app.extensions["ai_backend"]
    return backend.infer(model, inputs)


def init_app(app) -> None:
    """Install the configured inference backend once per application."""
    from app.ai.local import LocalBackend

    app.extensions["ai_backend"] = LocalBackend.with_embedded_models()
