"""SMTP argument parsing and the DATA helpers, against references (hypothesis, 300 examples).

``parse_path`` takes plain ``<local@domain>`` paths with one regular
expression and everything else with Python's RFC 5322 parser, as aiosmtpd
did. The property tests compare its answers with aiosmtpd's own
``SMTP._getaddr`` and ``SMTP._getparams`` (what the listener ran before
``mailgate.smtpserver``), and ``longest_line_over`` and ``unstuff`` with naive
split-based versions. Where parse_path deliberately differs from aiosmtpd
(it refuses RFC 2047 encoded words instead of decoding them), the comparison
skips the input and a test of its own says what it does.
"""

from __future__ import annotations

import re
import string
from email._header_value_parser import TokenList, get_addr_spec, get_angle_addr
from types import SimpleNamespace

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.smtpserver import longest_line_over, unstuff
from mailgate.smtpsyntax import (
    _PLAIN_PATH,
    ParameterError,
    body_type_ok,
    parse_parameters,
    parse_path,
)

EXAMPLES = settings(max_examples=300, deadline=None)

# ------------------------------------------------------------------ references

_AIOSMTPD = SimpleNamespace(local_part_limit=0)  # the attributes SMTP._getaddr reads


def aiosmtpd_path(arg: str) -> tuple[str, str] | None:
    """What aiosmtpd 1.4.6 made of a MAIL/RCPT argument, in ``parse_path``'s terms.

    aiosmtpd crashed on a few inputs (``<``, ``"``, ``a@[\\]``: IndexError or
    AttributeError from the email parser, answered ``500 Error``); they are
    malformed addresses (None) here.
    """
    try:
        address, rest = SMTP._getaddr(_AIOSMTPD, arg)
    except (IndexError, AttributeError):
        return None
    if address is None or rest is None:
        return None
    return address, rest.lstrip()


def aiosmtpd_parameters(words: list[str]) -> dict[str, str | bool] | None:
    """aiosmtpd's ESMTP parameter dict, None when a word does not parse."""
    return SMTP._getparams(_AIOSMTPD, words)


def decodes_an_encoded_word(arg: str) -> bool:
    """True when the RFC 5322 parser decodes an RFC 2047 encoded word in ``arg``'s path.

    aiosmtpd took the decoded address; parse_path refuses the path (tests below).
    """

    def encoded(token: object) -> bool:
        if getattr(token, "token_type", None) == "encoded-word":
            return True
        return isinstance(token, TokenList) and any(encoded(t) for t in token)

    parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
    try:
        token, _ = parse(arg)
    except Exception:
        return False
    return encoded(token)


def parse_path_or_skip(arg: str) -> tuple[str, str] | str | None:
    """``parse_path(arg)``, or ``"skip"`` where it deliberately differs from aiosmtpd."""
    if decodes_an_encoded_word(arg):
        return "skip"
    return parse_path(arg)


def naive_longest_line_over(data: bytes, limit: int) -> bool:
    """A line ends at CRLF and counts it; what follows the last CRLF counts as it is."""
    *lines, tail = data.split(b"\r\n")
    return any(len(line) + 2 > limit for line in lines) or len(tail) > limit


def naive_unstuff(data: bytes) -> bytes:
    """Drop one leading dot from every CRLF-separated line."""
    lines = data.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


# ------------------------------------------------------------------ path strategies

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
ODD = ' ."()<>@,;:\\[]\t\x00\x7f\u00e9\u00a0\u65e5\udcff'  # specials, controls, non-ASCII
LABEL = string.ascii_letters + string.digits + "-"

atoms = st.text(ATEXT, min_size=1, max_size=6)
dot_atoms = st.lists(atoms, min_size=1, max_size=3).map(".".join)
quoted = st.lists(
    st.one_of(st.sampled_from(list(ATEXT[:8] + ' ."@<>()\u00e9')), st.just('\\"'), st.just("\\\\")),
    max_size=6,
).map(lambda parts: '"' + "".join(parts) + '"')
odd_locals = st.text(ATEXT[:6] + ODD, max_size=8)
non_ascii_locals = st.lists(
    st.sampled_from(["a", "b", "\u00e4", "\u00df", "\u65e5", "."]), min_size=1, max_size=6
).map("".join)


def near_misses(base: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``base`` with one odd character added, at either end or inside: a loose regex's misses."""
    odd = st.sampled_from(list('.-_@"\\ ()[]<>,:=?\t\x00\u00e9'))
    inside = st.builds(lambda text, at, c: text[:at] + c + text[at:], base, st.integers(0, 9), odd)
    ends = st.builds(
        lambda text, c, front: c + text if front else text + c, base, odd, st.booleans()
    )
    return st.one_of(inside, ends)


locals_ = st.one_of(
    dot_atoms, dot_atoms, near_misses(dot_atoms), quoted, odd_locals, non_ascii_locals
)

hostnames = st.lists(st.text(LABEL, min_size=1, max_size=6), min_size=1, max_size=3).map(".".join)
literals = st.one_of(
    st.sampled_from(["[192.0.2.1]", "[IPv6:2001:db8::1]", "[]", "[ 192.0.2.1 ]", "[a]b]", "[\\]]"]),
    st.text(string.printable[:90] + "[]\\ \u00e9", max_size=8).map(lambda s: f"[{s}]"),
)
domains = st.one_of(
    hostnames,
    hostnames,
    near_misses(hostnames),
    literals,
    near_misses(literals),
    st.text(LABEL + ODD, max_size=8),
    st.sampled_from(["ex\u00e4mple.com", "xn--exmple-cua.com", ""]),
)
addresses = st.one_of(
    st.builds(lambda lp, d: f"{lp}@{d}", locals_, domains),
    st.builds(lambda lp, d: f"{lp}@{d}", locals_, domains),
    locals_,
    st.builds(lambda lp, d: f"{lp}@{d}@{d}", locals_, domains),
)
routes = st.lists(hostnames.map("@".__add__), min_size=1, max_size=2).map(
    lambda hops: ",".join(hops) + ":"
)
comments = st.text(ATEXT[:6] + " ()\\", max_size=6).map(lambda s: f"({s})")
spaces = st.sampled_from(["", "", " ", "  ", "\t"])
parameters = st.lists(
    st.sampled_from(["SIZE=1000", "BODY=8BITMIME", "SMTPUTF8", "FOO", "x=y", "NOTIFY=NEVER"]),
    max_size=3,
).map(" ".join)
paths = st.one_of(
    st.builds(
        lambda route, addr, end: f"<{route}{addr}{end}",
        st.one_of(st.just(""), st.just(""), routes),
        addresses,
        st.sampled_from([">", ">", ">", "", ">>", " >"]),
    ),
    st.builds(lambda c, addr: f"<{c}{addr}>", comments, addresses),
    addresses,
    st.sampled_from(["<>", "", "<", ">", "< >", "<@>", "<@example.com>"]),
)
rests = st.one_of(
    st.just(""),
    parameters,
    parameters.map(lambda p: " " + p),
    st.builds(lambda s1, c, s2, p: s1 + c + s2 + p, spaces, comments, spaces, parameters),
    st.text(ATEXT[:6] + ODD + "=", max_size=8),
    st.sampled_from([">", " <x@example.org>", "\r\n", " \u00e9=1"]),
)
plain_path_args = st.one_of(
    st.builds(lambda lp, d, r: f"<{lp}@{d}>{r}", dot_atoms, hostnames, rests),
    st.from_regex(_PLAIN_PATH, fullmatch=True),
)
"""Arguments the fast path takes."""
near_plain_args = st.one_of(
    st.builds(lambda lp, d, r: f"<{lp}@{d}>{r}", near_misses(dot_atoms), hostnames, rests),
    st.builds(lambda lp, d, r: f"<{lp}@{d}>{r}", dot_atoms, near_misses(hostnames), rests),
    st.builds(lambda lp, d, r: f"<{lp}@{d}>{r}", dot_atoms, near_misses(literals), rests),
)
"""Plain paths with one thing wrong: most go to the fallback, some fool a loose regex."""
path_args = st.one_of(
    st.builds(lambda s, p, r: s + p + r, spaces, paths, rests),
    near_plain_args,
    plain_path_args,
    st.text(max_size=20),
)

# ------------------------------------------------------------------ parse_path


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("<alice@example.net>", ("alice@example.net", "")),
        (
            "<alice@example.net> SIZE=100 BODY=8BITMIME",
            ("alice@example.net", "SIZE=100 BODY=8BITMIME"),
        ),
        ("<Alice.O'Hara+tag@Example.NET>", ("Alice.O'Hara+tag@Example.NET", "")),
        ("<alice@[192.0.2.1]>", ("alice@[192.0.2.1]", "")),
        ("<alice@example.net> (a comment) SIZE=1", ("alice@example.net", "SIZE=1")),
        ('<"john doe"@example.net>', ('"john doe"@example.net', "")),
        ("<@relay.example,@b.example:alice@example.net>", ("alice@example.net", "")),
        ("<jos\u00e9@example.net> SMTPUTF8", ("jos\u00e9@example.net", "SMTPUTF8")),
        ("alice@example.net SIZE=1", ("alice@example.net", "SIZE=1")),
        ("<>", ("<>", "")),
        ("<> SIZE=10", ("<>", "SIZE=10")),
        ("", ("", "")),
        ("<", None),
        ("<a@b@c>", None),
    ],
)
def test_parse_path_examples(arg, expected):
    assert parse_path(arg) == expected


@EXAMPLES
@given(plain_path_args)
def test_the_fast_path_gives_aiosmtpds_answer(arg):
    assert _PLAIN_PATH.fullmatch(arg) is not None  # this test is about the regex's answers
    got = parse_path_or_skip(arg)
    if got != "skip":
        assert got == aiosmtpd_path(arg)


@EXAMPLES
@given(path_args)
def test_parse_path_gives_aiosmtpds_answer_for_any_argument(arg):
    got = parse_path_or_skip(arg)
    if got != "skip":
        assert got == aiosmtpd_path(arg)


@pytest.mark.parametrize(
    ("plain", "other"),
    [
        # The same path; a trailing comment, or no closing ">", sends it to the fallback.
        ("<=?utf-8?q?bob?=@example.com>", "<=?utf-8?q?bob?=@example.com> (note)"),
        ("<=?utf-8?q?bob?=@example.com>", "<=?utf-8?q?bob?=@example.com"),
    ],
)
def test_an_encoded_word_gets_one_answer_on_either_path(plain, other):
    assert parse_path(plain) == parse_path(other)


@pytest.mark.parametrize(
    "arg",
    [
        "<=?utf-8?q?a=0D=0AX?=@ex_ample.com>",
        "<=?utf-8?q?a=00b?=@example.com> (x)",
        "<=?utf-8?b?YQ1iAA==?=@example.com",
    ],
)
def test_a_parsed_address_never_holds_a_control_character(arg):
    parsed = parse_path(arg)
    assert parsed is None or not re.search(r"[\x00-\x1f\x7f]", parsed[0])


@pytest.mark.parametrize("arg", ['"', '<"', "a@[\\]", "<a@[\\]>", "a@[x\\]"])
def test_malformed_paths_do_not_raise(arg):
    assert parse_path(arg) is None


# ------------------------------------------------------------------ parameters


def test_parse_parameters_examples():
    assert parse_parameters([]) == {}
    assert parse_parameters(["SIZE=100", "BODY=8BITMIME", "SMTPUTF8"]) == {
        "SIZE": "100",
        "BODY": "8BITMIME",
        "SMTPUTF8": True,
    }
    assert parse_parameters(["X=a=b"]) == {"X": "a=b"}
    for bad in (["SIZE="], ["=1"], ["A-B=1"], [""], ["SIZE=1", "B+"]):
        with pytest.raises(ParameterError):
            parse_parameters(bad)


@EXAMPLES
@given(
    st.lists(
        st.text(string.ascii_uppercase[:4] + string.digits[:3] + "=-+ \u00e9\u00b2", max_size=6)
    )
)
def test_parse_parameters_gives_aiosmtpds_answer(words):
    expected = aiosmtpd_parameters(words)
    if expected is None:
        with pytest.raises(ParameterError):
            parse_parameters(words)
    else:
        assert parse_parameters(words) == expected


@pytest.mark.parametrize(
    ("params", "ok"),
    [
        ({}, True),
        ({"SIZE": "10"}, True),
        ({"BODY": "7BIT"}, True),
        ({"BODY": "8BITMIME"}, True),
        ({"BODY": "BINARYMIME"}, False),
        ({"BODY": "8bitmime"}, False),  # the server upper-cases parameters before this
        ({"BODY": True}, False),
        ({"BODY": ""}, False),
    ],
)
def test_body_type_ok(params, ok):
    assert body_type_ok(params) is ok


# ------------------------------------------------------------------ longest_line_over

LIMIT = 10


@pytest.mark.parametrize(
    ("data", "over"),
    [
        (b"", False),
        (b"x" * (LIMIT - 2) + b"\r\n", False),  # exactly at the limit, CRLF counted
        (b"x" * (LIMIT - 1) + b"\r\n", True),  # one over
        (b"ab\r\n" + b"x" * (LIMIT - 2) + b"\r\n", False),  # the last line at the limit
        (b"ab\r\n" + b"x" * (LIMIT - 1) + b"\r\n", True),  # the last line one over
        (b"x" * (LIMIT - 1) + b"\r\nab\r\n", True),  # the first line one over
        (b"ab\r\n" * 20, False),  # many short lines, more data than the limit
        (b"x" * (LIMIT - 3) + b"\n" + b"y\r\n", True),  # a bare LF does not end a line
        (b"x" * (LIMIT - 3) + b"\r" + b"y\r\n", True),  # nor does a bare CR
        (b"x" * LIMIT, False),  # no CRLF at all: the text is one line, counted as it is
        (b"x" * (LIMIT + 1), True),
        (b"ab\r\n" + b"x" * (LIMIT + 1), True),  # an unended last line
        (b"\r\n" * 20, False),
    ],
)
def test_longest_line_over_edges(data, over):
    assert naive_longest_line_over(data, LIMIT) is over  # the reference agrees with the table
    assert longest_line_over(data, LIMIT) is over


line_pieces = st.sampled_from([b"x", b"yy", b".", b"\r", b"\n", b"\r\n", b"\r\n", b"\r\n"])


@EXAMPLES
@given(st.lists(line_pieces, max_size=80).map(b"".join), st.integers(min_value=1, max_value=24))
def test_longest_line_over_matches_a_split_reference(data, limit):
    assert longest_line_over(data, limit) is naive_longest_line_over(data, limit)


@EXAMPLES
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=40))
def test_longest_line_over_matches_a_split_reference_on_random_bytes(data, limit):
    assert longest_line_over(data, limit) is naive_longest_line_over(data, limit)


# ------------------------------------------------------------------ unstuff


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"", b""),
        (b"..x\r\n", b".x\r\n"),
        (b"..\r\n", b".\r\n"),  # a line that is just ".." is a line that is just "."
        (b"a\r\n..\r\n", b"a\r\n.\r\n"),
        (b"a\r\n...\r\n", b"a\r\n..\r\n"),  # one dot, not all of them
        (b"a\r\n.b\r\n.c\r\n", b"a\r\nb\r\nc\r\n"),
        (b"a.b\r\n", b"a.b\r\n"),
        (b"a\n.b\r\n", b"a\n.b\r\n"),  # after a bare LF a dot is content
        (b"a\r.b\r\n", b"a\r.b\r\n"),
    ],
)
def test_unstuff_examples(wire, message):
    assert unstuff(wire) == message


@EXAMPLES
@given(st.lists(line_pieces, max_size=60).map(b"".join))
def test_unstuff_matches_a_per_line_reference(data):
    assert unstuff(data) == naive_unstuff(data)
