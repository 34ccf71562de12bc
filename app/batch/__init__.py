"""Population runs over FHIR Bulk Data: export client, parts, checkpoints, outputs, report."""


def init_app(app) -> None:
    """Register the batch job kinds, admin API and commands (imported here so that ``app.batch.scoring``, which
    every service declaration imports, stays light to import)."""
    from app.batch.setup import init_app as setup

    setup(app)
