"""A body without a length is read up to MAX_REQUEST_BYTES; one byte more is a 413, however it is read."""

from __future__ import annotations

import io

import pytest
from werkzeug.exceptions import RequestEntityTooLarge

from app.limits import _BodyUpToLimit

LIMIT = 1000


def read_in_pieces(stream, size: int) -> bytes:
    """As a streaming parser reads: fixed-size pieces until an empty read."""
    out = bytearray()
    while piece := stream.read(size):
        out += piece
    return bytes(out)


READS = [
    pytest.param(lambda s: s.read(), id="read-all"),
    pytest.param(lambda s: read_in_pieces(s, 64), id="small-pieces"),
    pytest.param(lambda s: read_in_pieces(s, LIMIT), id="limit-sized-pieces"),
]


@pytest.mark.parametrize("read", READS)
def test_a_body_exactly_at_the_limit_is_read_whole(read):
    assert read(_BodyUpToLimit(io.BytesIO(b"x" * LIMIT), LIMIT)) == b"x" * LIMIT


@pytest.mark.parametrize("read", READS)
def test_a_body_one_byte_over_the_limit_is_413_never_cut_off(read):
    with pytest.raises(RequestEntityTooLarge) as raised:
        read(_BodyUpToLimit(io.BytesIO(b"x" * (LIMIT + 1)), LIMIT))
    assert str(LIMIT) in raised.value.description
