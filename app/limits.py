"""The request body limit (MAX_REQUEST_BYTES) for every endpoint, whether or not the body has a Content-Length.

werkzeug enforces ``MAX_CONTENT_LENGTH`` on a chunked body (no Content-Length, ``wsgi.input_terminated`` set, as
gunicorn does) only when something reads past the limit; reading the whole body stops silently at the limit,
so an oversized body reached the endpoints cut off and was answered 400 or even 200 (and a body of exactly the
limit, read in pieces, was refused). Here a body is refused with 413 when it goes on past the limit, and only
then, however it is read.

A body whose framing is broken (a chunk size that is not hex, a chunk without its CRLF, a bad chunk extension, the
connection closed mid-body) makes gunicorn raise its own parse errors from the read, which no error handler knows:
they are a 400 here, for every route.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import IO

from flask import Request
from gunicorn.http.errors import NoMoreData, ParseException
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge
from werkzeug.utils import cached_property
from werkzeug.wsgi import LimitedStream


class BodyTooLarge(RequestEntityTooLarge):
    """413: the body is larger than MAX_REQUEST_BYTES; the app's error handlers render it (OperationOutcome or
    the SMART app's HTML page)."""

    def __init__(self, limit: int):
        super().__init__(f"The request body is larger than {limit} bytes, the most this service accepts.")


class MalformedBody(BadRequest):
    """400: the request body's transfer framing is broken, so the body cannot be read at all."""

    def __init__(self):
        super().__init__("The request body is malformed (its chunked transfer encoding is broken); send it again.")


class _FramedBody(io.RawIOBase):
    """The request body as the stream below reads it, with the WSGI server's framing errors made a MalformedBody."""

    def __init__(self, stream: IO[bytes]):
        super().__init__()
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = _framed(self._stream.read, len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return _framed(self._stream.read)


def _framed(read: Callable[..., bytes], *size: int) -> bytes:
    try:
        return read(*size)
    except (ParseException, NoMoreData):  # gunicorn's, raised while it decodes a chunked body
        raise MalformedBody() from None


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
    """Flask's request, with MAX_REQUEST_BYTES enforced on bodies of unknown length too, and a body that cannot be
    decoded answered 400."""

    @cached_property
    def stream(self) -> IO[bytes]:  # type: ignore[override]
        limit = self.max_content_length
        if limit is not None and self.content_length is not None and self.content_length > limit:
            raise BodyTooLarge(limit)
        stream = super().stream  # werkzeug's own checks and wrapping
        if limit is not None and self.content_length is None and "wsgi.input_terminated" in self.environ:
            stream = _BodyUpToLimit(self.environ["wsgi.input"], limit)
        return _FramedBody(stream)


def init_app(app) -> None:
    app.request_class = LimitedRequest
