"""Property tests for the session: after any bytes from one client, mail still relays.

One gateway serves every example (hypothesis reuses the function-scoped
fixtures on purpose). Each example connects, waits for the greeting, sends
random bytes (raw, or made of SMTP-looking commands), hangs up, and then a
well-behaved client delivers a message on a new connection. 200 examples each.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.rawsmtp import RawClient
from tests.support import MESSAGE

EXAMPLES = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_COMMANDS = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"EHLO fuzz.example",
                b"HELO",
                b"MAIL FROM:<a@example.net>",
                b"MAIL FROM:<a@example.net> SIZE=999999999999",
                b"RCPT TO:<bob@example.com>",
                b"RCPT TO:<x@elsewhere.org>",
                b"DATA",
                b".",
                b"RSET",
                b"NOOP",
                b"VRFY bob",
                b"STARTTLS",
                b"AUTH PLAIN AGFhAGI=",
                b"BDAT 10 LAST",
                b"\x00",
                b"MAIL FROM:<\xff@example.net>",
            ]
        ),
        st.binary(max_size=80),
    ),
    max_size=20,
).map(lambda lines: b"\r\n".join(lines))


def _garbage_then_deliver(gw, upstream, garbage: bytes) -> None:
    before = len(upstream.messages)
    with RawClient(gw.port, timeout=30) as c:
        c.send(garbage)
    with gw.client() as client:
        assert client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE) == {}
    assert len(upstream.messages) == before + 1


def test_random_bytes_then_a_valid_transaction_still_relays(make_gateway, upstream):
    gw = make_gateway()

    @EXAMPLES
    @given(st.binary(min_size=1, max_size=600))
    def check(garbage: bytes) -> None:
        _garbage_then_deliver(gw, upstream, garbage)

    check()


def test_random_commands_then_a_valid_transaction_still_relays(make_gateway, upstream):
    gw = make_gateway(plugins={"headers": {}, "helo": {}})

    @EXAMPLES
    @given(_COMMANDS)
    def check(garbage: bytes) -> None:
        _garbage_then_deliver(gw, upstream, garbage)

    check()
