"""The in-process backend: embedded models called directly, no network."""

from __future__ import annotations

from typing import Any

from app.ai.models import embedded_models
from app.ai.types import Model, ModelUnavailable, Prediction


class LocalBackend:
    """Runs embedded models in this process."""

    def __init__(self, models: list[Model]):
        self._models = {m.name: m for m in models}

    @classmethod
    def with_embedded_models(cls) -> LocalBackend:
        return cls(embedded_models())

    def model(self, name: str) -> Model:
        try:
            return self._models[name]
        except KeyError:
            raise ModelUnavailable("unknown-model", name) from None

    def infer(self, model: str, inputs: dict[str, Any], timeout: float | None = None) -> Prediction:
        """Run an embedded model; ``timeout`` is the guard's to enforce, a pure function cannot stop midway."""
        m = self.model(model)
        return Prediction(model=m.name, version=m.version, outputs=m.predict(inputs))
