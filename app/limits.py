"""The request body limit (MAX_REQUEST_BYTES) for every endpoint, whether or not the body has a Content-Length.

werkzeug enforces ``MAX_CONTENT_LENGTH`` on a chunked body (no Content-Length, ``wsgi.input_terminated`` set, as
gunicorn does) only when something reads past the limit; reading the whole body stops silently at the limit,
so an oversized body reached the endpoints cut off and was answered 400 or even 200 (and a body of exactly the
limit, read in pieces, was refused). Here a body is refused with 413 when it goes on past the limit, and only
then, however it is read.
"""

from __future__ import annotations

from typing import IO

from flask import Request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.utils import cached_property
from werkzeug.wsgi import LimitedStream


class BodyTooLarge(RequestEntityTooLarge):
    """413: the body is larger than MAX_REQUEST_BYTES; the app's error handlers render it (OperationOutcome or
    the SMART app's HTML page)."""

    def __init__(self, limit: int):
        super().__init__(f"The request body is larger than {limit} bytes, the most this service accepts.")


class _BodyUpToLimit(LimitedStream):
    """A body without a length, readable up to ``limit`` bytes; a byte beyond it raises BodyTooLarge."""

    def __init__(self, stream: IO[bytes], limit: int):
        super().__init__(stream, limit, is_max=True)

    def on_exhausted(self) -> None:
        # Called when a read finds the limit reached: the body is too large only if more of it follows.
        if self._stream.read(1):
            raise BodyTooLarge(self.limit)

    def readall(self) -> bytes:
        data = super().readall()  # stops at the limit without looking further
        if self.is_exhausted:
            self.on_exhausted()
        return data


class LimitedRequest(Request):
    """Flask's request, with MAX_REQUEST_BYTES enforced on bodies of unknown length too."""

    @cached_property
    def stream(self) -> IO[bytes]:  # type: ignore[override]
        limit = self.max_content_length
        if limit is not None and self.content_length is not None and self.content_length > limit:
            raise BodyTooLarge(limit)
        stream = super().stream  # werkzeug's own checks and wrapping
        if limit is not None and self.content_length is None and "wsgi.input_terminated" in self.environ:
            return _BodyUpToLimit(self.environ["wsgi.input"], limit)
        return stream


def init_app(app) -> None:
    app.request_class = LimitedRequest
