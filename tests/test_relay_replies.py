"""The upstream reply parser of ``strict_replies`` against its reference (hypothesis).

``strict_replies`` checks every line of a reply and parses it in one pass; the
reference is what it did before: the same checks, then aiosmtplib's own
``_read_response_from_buffer``. Both must give the same response (or raise the
same error) and leave the same bytes in the buffer, for any bytes the upstream sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiosmtplib
import pytest
from aiosmtplib.protocol import SMTPProtocol
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.relay import _REPLY_LINE, MalformedReply, strict_replies

_PIECES = [
    b"250", b"251", b"354", b"550", b"25", b"2500", b"099", b" ", b"-", b"Ok", b"",
    b"\t", b"  x  ", b"2.1.5", b"\xff\xfe", b"\r\n", b"\n", b"\r", b"x" * 8200,
]  # fmt: skip


class _Client:
    """What ``strict_replies`` reads of an ``aiosmtplib.SMTP``: its protocol."""

    def __init__(self, protocol: SMTPProtocol) -> None:
        self.protocol = protocol


def _reference(protocol: SMTPProtocol) -> aiosmtplib.SMTPResponse | None:
    """Every complete line checked, then aiosmtplib's parse (the code before the one pass)."""
    buffer = protocol._buffer
    offset, code = 0, b""
    while (end := buffer.find(b"\n", offset)) >= 0:
        line = bytes(buffer[offset : end + 1])
        if not _REPLY_LINE.fullmatch(line) or (code and line[:3] != code):
            text = line[:80].decode("ascii", "backslashreplace").rstrip()
            raise MalformedReply(-1, f"malformed reply line {text!r}")
        if line[3:4] != b"-":
            break
        offset, code = end + 1, line[:3]
    return protocol._read_response_from_buffer()


def _outcome(parse: Callable[[], aiosmtplib.SMTPResponse | None]) -> tuple[object, ...]:
    try:
        return ("reply", parse())
    except aiosmtplib.SMTPResponseException as exc:
        return (type(exc).__name__, exc.code, exc.message)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=14))
def test_one_pass_parse_equals_checks_then_aiosmtplib(loop, pieces):
    data = b"".join(pieces)
    reference, ours = SMTPProtocol(loop=loop), SMTPProtocol(loop=loop)
    reference._buffer.extend(data)
    ours._buffer.extend(data)
    strict_replies(_Client(ours))  # type: ignore[arg-type]
    assert _outcome(ours._read_response_from_buffer) == _outcome(lambda: _reference(reference))
    assert bytes(ours._buffer) == bytes(reference._buffer)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"250 Ok\r\n", (250, "Ok")),
        (b"250-first\r\n250 second\r\n", (250, "first\nsecond")),
        (b"250-\r\n250 second\r\n", (250, "second")),  # aiosmtplib's: no LF after an empty text
        (b"250\r\n", (250, "")),
        (b"250-more to come\r\n", None),
    ],
)
def test_known_replies(loop, data, expected):
    protocol = SMTPProtocol(loop=loop)
    protocol._buffer.extend(data)
    strict_replies(_Client(protocol))  # type: ignore[arg-type]
    response = protocol._read_response_from_buffer()
    assert (None if response is None else (response.code, response.message)) == expected


def test_a_malformed_line_and_an_overlong_one(loop):
    protocol = SMTPProtocol(loop=loop)
    strict_replies(_Client(protocol))  # type: ignore[arg-type]
    protocol._buffer.extend(b"2500 Ok\r\n")
    with pytest.raises(MalformedReply):
        protocol._read_response_from_buffer()
    del protocol._buffer[:]
    protocol._buffer.extend(b"250 " + b"x" * 9000 + b"\r\n")
    with pytest.raises(aiosmtplib.SMTPResponseException, match="Response too long"):
        protocol._read_response_from_buffer()
