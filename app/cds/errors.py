"""Exceptions of the CDS Hooks area; the blueprint's error handlers turn them into HTTP answers."""


class CdsError(Exception):
    """Base of every error the CDS Hooks endpoints answer with an OperationOutcome."""

    status = 500
    code = "exception"

    def __init__(self, diagnostics: str, expression: str | None = None):
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        self.expression = expression


class BadHookRequest(CdsError):
    """The request body is malformed; ``expression`` names the offending field (400)."""

    status = 400
    code = "invalid"


class UnknownService(CdsError):
    """No service is registered under the requested id (404)."""

    status = 404
    code = "not-found"


class PrefetchUnavailable(CdsError):
    """Data a service requires could not be obtained; ``expression`` names the prefetch key (412)."""

    status = 412
    code = "incomplete"


class ClientNotTrusted(CdsError):
    """The caller's JWT is missing or fails verification (401, never saying why to the caller)."""

    status = 401
    code = "login"

    def __init__(self, reason: str):
        # The reason is for our audit log only; the HTTP answer carries no detail.
        super().__init__("Client authentication failed")
        self.reason = reason


class ReplayCheckUnavailable(CdsError):
    """Whether a client JWT was used before cannot be told now (the host state file is unusable): the call is
    refused rather than checked against one process's memory (503)."""

    status = 503
    code = "transient"

    def __init__(self, reason: str, retry_after: int | None = None):
        when = f"in {retry_after} s" if retry_after else "shortly"
        super().__init__(f"The service cannot check client tokens for replay now; try again {when}")
        self.reason = reason
        self.retry_after = retry_after
