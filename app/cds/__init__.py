"""The CDS Hooks area: services, client trust, prefetch, and the endpoints that tie them together."""


def init_app(app) -> None:
    """Register the CDS Hooks endpoints (imported here so that ``app.cds.cards`` & co. stay light to import)."""
    from app.cds.setup import init_app as setup

    setup(app)
