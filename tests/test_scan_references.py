"""The message scans made cheaper for issue 17, against their plain references (hypothesis).

``bare_line_endings`` (the smuggling screen, twice per message) and
``hop_count`` (the mail-loop limit) give the answers of the straightforward
code they replaced, for any bytes.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.hops import hop_count
from mailgate.lineendings import bare_line_endings

_PIECES = [
    b"Received", b"received", b"RECEIVED", b"ReCeIvEd", b"received:", b"Received :",
    b" ", b"\t", b":", b"\r\n", b"\n", b"\r", b"x", b"\r\n\r\n", b"Subject: a",
    b"\xc0", b"\xe9", b"\x00",
]  # fmt: skip
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)

messages = st.lists(st.sampled_from(_PIECES), max_size=24).map(b"".join) | st.binary(max_size=64)


def _hops_reference(raw: bytes) -> int:
    if raw.startswith(b"\r\n"):
        return 0
    end = raw.find(b"\r\n\r\n")
    return len(_RECEIVED.findall(raw, 0, len(raw) if end < 0 else end + 2))


def _bare_reference(data: bytes) -> tuple[bool, bool]:
    crlf = data.count(b"\r\n")
    return data.count(b"\n") != crlf, data.count(b"\r") != crlf


@settings(max_examples=3000, deadline=None)
@given(messages)
def test_hop_count_equals_the_pattern_over_the_header_section(raw):
    assert hop_count(raw) == _hops_reference(raw)


@settings(max_examples=3000, deadline=None)
@given(messages)
def test_bare_line_endings_equals_the_counts(data):
    assert bare_line_endings(data) == _bare_reference(data)


def test_known_cases():
    assert hop_count(b"Received: a\r\nreceived\t: b\r\nX-Received: c\r\n\r\nReceived: d\r\n") == 2
    assert hop_count(b"received:x") == 1
    assert bare_line_endings(b"a\r\nb\r\n") == (False, False)
    assert bare_line_endings(b"a\nb\r\n") == (True, False)
    assert bare_line_endings(b"a\rb\r\n") == (False, True)
    assert bare_line_endings(b"a\n\rb") == (True, True)
