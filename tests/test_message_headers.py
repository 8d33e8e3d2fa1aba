"""``Message.headers`` and ``get_all`` give what the ``email`` parser gives, parsed once."""

from __future__ import annotations

import email.parser
import email.policy

from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.context import Message

NAMES = ["From", "from", "DKIM-Signature", "Subject", "X-A", "To"]

_line = st.one_of(
    st.builds(
        lambda name, sep, value: f"{name}{sep}{value}".encode(),
        st.sampled_from([*NAMES, "", "Bad Name", "From ", "X\x7f"]),
        st.sampled_from([":", ": ", ":\t", " :", ""]),
        st.text(alphabet="ab ;=\t:", max_size=12),
    ),
    st.builds(lambda v: b" " + v.encode(), st.text(alphabet="ab ;=\t:", max_size=12)),
    st.builds(lambda v: b"\t" + v.encode(), st.text(alphabet="ab ;=", max_size=8)),
    st.sampled_from([b"", b"From sender Mon", b"caf\xc3\xa9: x", b"X-B: \xe9t\xe9", b"X-C: a\rb"]),
)
_ending = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])


def _reference(raw: bytes) -> list[tuple[str, str]]:
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    parsed = parser.parsebytes(Message(raw).header_bytes)
    return [(name, str(value)) for name, value in parsed.items()]


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(_line, _ending), max_size=10), st.binary(max_size=20))
def test_headers_are_the_email_parsers(lines: list[tuple[bytes, bytes]], body: bytes) -> None:
    raw = b"".join(line + end for line, end in lines) + b"\r\n" + body
    message = Message(raw)
    reference = _reference(raw)
    assert list(message.headers) == reference
    for name in NAMES:
        assert message.get_all(name) == [
            value for field, value in reference if field.lower() == name.lower()
        ]


def test_plain_header_section_is_parsed_without_the_email_parser() -> None:
    raw = (
        b"From: a@example.com\r\nSubject:  folded\r\n\tline\r\nSubject:\r\n next\r\n"
        b"\r\nbody: not a header\r\n"
    )
    message = Message(raw)
    assert message.headers == (
        ("From", "a@example.com"),
        ("Subject", "folded\r\n\tline"),
        ("Subject", "\r\n next"),
    )
    assert message.get_all("subject") == ["folded\r\n\tline", "\r\n next"]
    assert message._parsed is None  # the email parser did not run
    assert message.headers is message.headers  # parsed once


def test_a_message_without_blank_line_or_final_crlf() -> None:
    for raw in (b"From: a\r\nTo: b", b"From: a\r\nTo: b\r\n", b""):
        assert list(Message(raw).headers) == _reference(raw)
