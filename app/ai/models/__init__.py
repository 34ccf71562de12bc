"""The models shipped with the product."""

from app.ai.models.pce import PooledCohortEquations


def embedded_models() -> list:
    """Every embedded model, instantiated once per backend."""
    return [PooledCohortEquations()]
