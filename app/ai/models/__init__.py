"""The models shipped with the product."""


def embedded_models() -> list:
    """Every embedded model, instantiated once per backend."""
    from app.ai.models.pce import PooledCohortEquations

    return [PooledCohortEquations()]
