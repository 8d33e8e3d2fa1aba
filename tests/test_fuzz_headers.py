"""Property tests for the header checker: arbitrary bytes never make it raise or waver.

Two generators: plain random bytes, and header-shaped messages built from
fragments that exercise folding, colons, 8-bit bytes, NULs and the empty
line. A third property checks that the fast path for plain From values agrees
with the full RFC 5322 parser. 300 examples each (see ``settings``).
"""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.plugins.headers import (
    _SIMPLE_MAILBOX,
    HeadersConfig,
    _mailboxes,
    check_headers,
    parse_mailboxes,
    rulebook,
)

CONFIG = HeadersConfig(require=["From", "Date", "Message-ID"], repair=["Date"])
BOOK = rulebook(CONFIG)
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
EXAMPLES = settings(max_examples=300, deadline=None)

_NAMES = st.sampled_from(
    [b"From", b"FROM", b"Date", b"Sender", b"Subject", b"Message-ID", b"X-A", b"", b"Bad Name"]
)
_VALUES = st.one_of(
    st.sampled_from(
        [
            b"Alice <alice@example.net>",
            b"a@x.example, b@x.example",
            b"undisclosed-recipients:;",
            b"Mon, 30 Nov 2026 10:00:00 +0000",
            b"Fri, 30 Nov 2029 10:00:00 +0000",
            b'"unterminated <a@b>',
            b"joe@",
            b"((((((((((comment",
            b"caf\xc3\xa9",
            b"\xff\xfe",
            b"a\x00b",
        ]
    ),
    st.binary(max_size=60),
)
_LINES = st.one_of(
    st.builds(lambda n, v: n + b": " + v, _NAMES, _VALUES),
    st.builds(lambda v: b" " + v, _VALUES),
    st.sampled_from([b"", b" ", b"\t", b"no colon here", b":"]),
    st.binary(max_size=40),
)
HEADERISH = st.builds(
    lambda lines, end: b"\r\n".join(lines) + end,
    st.lists(_LINES, max_size=12),
    st.sampled_from([b"", b"\r\n", b"\r\n\r\nbody\r\n"]),
)


def _judge(raw: bytes, smtputf8: bool) -> list[tuple[str, str]]:
    report = check_headers(raw, CONFIG, smtputf8=smtputf8, now=NOW)
    return [(f.rule, f.text) for f in report.faults]


@EXAMPLES
@given(st.binary(max_size=3000), st.booleans())
def test_arbitrary_bytes_never_raise_and_give_the_same_verdict(raw, smtputf8):
    first = _judge(raw, smtputf8)
    assert first == _judge(raw, smtputf8)
    assert all(rule in BOOK.rules for rule, _ in first)


@EXAMPLES
@given(HEADERISH, st.booleans())
def test_header_shaped_input_never_raises_and_gives_the_same_verdict(raw, smtputf8):
    first = _judge(raw, smtputf8)
    assert first == _judge(raw, smtputf8)
    assert all(rule in BOOK.rules for rule, _ in first)
    verdicts = BOOK.decide(check_headers(raw, CONFIG, smtputf8=smtputf8, now=NOW).faults)
    repaired = {"headers.missing_date"}
    rejecting = any(BOOK.setting(r)[0] == "reject" and r not in repaired for r, _ in first)
    assert any(v.reply() is not None for v in verdicts) == rejecting
    # The enforced rejects come last, so the first of them is the reply.
    replies = [v.reply() is not None for v in verdicts]
    assert replies == sorted(replies)


_ATOMS = st.text(alphabet="ab.-_+'!", min_size=0, max_size=6)
_FROM_VALUES = st.one_of(
    st.text(alphabet='ab.@<> "\t,()\\:;!', max_size=30),
    st.builds(lambda local, domain: f"{local}@{domain}", _ATOMS, _ATOMS),
    st.builds(
        lambda name, local, domain, q: f"{q}{name}{q} <{local}@{domain}>",
        st.text(alphabet='ab ,."', max_size=10),
        _ATOMS,
        _ATOMS,
        st.sampled_from(["", '"']),
    ),
)


@EXAMPLES
@given(_FROM_VALUES)
def test_the_fast_from_path_agrees_with_the_full_parser(value):
    if _SIMPLE_MAILBOX.fullmatch(value):
        assert _mailboxes(value) == parse_mailboxes(value)
