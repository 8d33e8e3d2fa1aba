"""Fuzzing MAIL and RCPT arguments with arbitrary bytes (issue 13).

For every generated pair of arguments, over one raw connection: each command
line gets exactly one reply, no reply is a 451 (which here could only come
from an exception: the plugins are none and the upstream is healthy), no
internal error is logged, and after RSET the session is as new (a plain
MAIL, RCPT and RSET get 250). Arguments mix pure noise with address-shaped
bytes (angle brackets, an ``@``, 8-bit and invalid UTF-8 in the local part
or domain, SMTPUTF8 and other parameters), so the deeper paths are reached too.
"""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.rawsmtp import RawClient

# Any octet but LF (which would end the command line early). CR stays in.
_OCTETS = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))
_TEXT = st.text(max_size=12).map(lambda s: s.replace("\n", "").encode("utf-8", "surrogatepass"))
_PIECE = st.one_of(
    _OCTETS,
    _TEXT,
    st.sampled_from([b"", b"alice", b"\xc3\xa9", b"\xff", b"\xc3", b"b\xf8b", b'"a b"', b"a.b"]),
)
_PARAMS = st.lists(
    st.sampled_from(
        [b"SMTPUTF8", b"BODY=8BITMIME", b"BODY=BINARYMIME", b"SIZE=10", b"SIZE=\xd9\xa1", b"X=\xff"]
    ),
    max_size=3,
).map(lambda words: b"".join(b" " + w for w in words))
_ADDRESS = st.builds(
    lambda local, domain, params: b"<" + local + b"@" + domain + b">" + params,
    _PIECE,
    st.one_of(st.sampled_from([b"example.com", b"ex\xc3\xa4mple.com", b"[127.0.0.1]"]), _PIECE),
    _PARAMS,
)
ARGUMENT = st.one_of(_OCTETS, _ADDRESS)


def _exchange(client: RawClient, line: bytes) -> int:
    code, text = client.cmd(line)
    assert code != 0, f"no reply to {line!r}"
    assert code != 451, (line, text)
    return code


def test_mail_and_rcpt_with_arbitrary_bytes(make_gateway, upstream, caplog):
    gw = make_gateway(limits={"errors": 50})
    caplog.set_level(logging.ERROR, logger="mailgate")
    runs = []

    @settings(
        max_examples=300,
        deadline=2000,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        derandomize=False,
    )
    @given(sender=ARGUMENT, recipient=ARGUMENT, second=ARGUMENT)
    def session(sender: bytes, recipient: bytes, second: bytes) -> None:
        runs.append(sender)
        with RawClient(gw.port) as c:
            assert _exchange(c, b"EHLO client.example.net") == 250
            _exchange(c, b"MAIL FROM:" + sender)
            _exchange(c, b"RCPT TO:" + recipient)
            _exchange(c, b"RCPT TO:" + second)
            assert _exchange(c, b"RSET") == 250
            # The state is as new: no "nested MAIL", no lost transaction.
            assert _exchange(c, b"MAIL FROM:<alice@example.net>") == 250
            assert _exchange(c, b"RCPT TO:<bob@example.com>") == 250
            assert _exchange(c, b"RSET") == 250
            assert _exchange(c, b"QUIT") == 221
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], errors

    session()
    assert len(runs) >= 100  # hypothesis really ran the sessions
    assert upstream.messages == []


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL FROM:<\xff@example.net>",
        b"MAIL FROM:<\xc3\xa9@example.net>",
        b"MAIL FROM:<a@\xff> SMTPUTF8",
        b"MAIL FROM:<a@example.net> SMTPUTF8 X=\xff",
        b"MAIL FROM:\xff",
        b"MAIL FROM:<\xc3@ex\xc3\xa4mple.com> SMTPUTF8",
    ],
)
def test_known_probes_get_a_5xx_and_leave_the_state_consistent(make_gateway, upstream, line):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        assert c.cmd(b"EHLO client.example.net")[0] == 250
        assert 500 <= c.cmd(line)[0] <= 599
        assert c.cmd(b"MAIL FROM:<alice@example.net>")[0] == 250
    assert upstream.connections == 1  # only the good MAIL opened one
