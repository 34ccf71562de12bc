"""What every part of the AI layer shares: a prediction, the inference errors, and the model and backend shapes.

Its own module so that the guard, the backends and the models import it without importing ``app.ai``, which
builds guards out of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


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
