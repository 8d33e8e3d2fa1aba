"""Mail loops: ``limits.hops`` counts ``Received:`` fields and refuses a looping message."""

from __future__ import annotations

import socket

from mailgate.hops import hop_count
from tests.ops_support import wait_until
from tests.support import MESSAGE, envelopes


def _with_received(count: int) -> bytes:
    lines = b"".join(
        b"Received: from hop%d.example by x.example; Mon, 30 Nov 2026\r\n" % i for i in range(count)
    )
    return lines + MESSAGE


def _send(gw, message: bytes) -> tuple[int, bytes]:
    with gw.client() as client:
        client.mail("alice@example.net")
        client.rcpt("bob@example.com")
        return client.data(message)


def test_hop_count_reads_only_the_header_section():
    header = (
        b"Received: a\r\nRECEIVED : b\r\n\tfolded: c\r\nX-Received: d\r\nSubject: Received: e\r\n"
    )
    assert hop_count(header + b"\r\nReceived: in the body\r\n") == 2
    assert hop_count(header) == 2  # no body at all
    assert hop_count(b"\r\nReceived: only a body\r\n") == 0


def test_a_message_at_the_hop_limit_is_refused_permanently(make_gateway, upstream, decisions):
    gw = make_gateway()
    assert _send(gw, _with_received(49))[0] == 250  # with ours, the upstream sees 50
    code, text = _send(gw, _with_received(50))
    assert (code, text) == (554, b"5.4.6 Too many hops (50): a mail loop?")
    assert len(upstream.messages) == 1
    line = decisions()[-1]
    assert "verdicts=limits.hops:reject" in line and "outcome=rejected" in line, line


def test_a_queue_that_delivers_to_its_own_gateway_stops_the_loop(
    make_gateway, queue_policy, spool, decisions
):
    # The upstream is the gateway's own listener (an operator's slip): each pass is
    # spooled, delivered back in and spooled again, one Received: line more each time,
    # until the pass at limits.hops is refused for good and the queue drops it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gw = make_gateway(
        **queue_policy(handoff_timeout=0),
        listen=[{"address": f"127.0.0.1:{port}"}],
        upstream=f"smtp://127.0.0.1:{port}",
        limits={"hops": 4},
    )
    assert _send(gw, MESSAGE)[0] == 250

    def refused() -> list[str]:
        return [line for line in decisions() if "limits.hops:reject" in line]

    assert wait_until(lambda: refused() != [] and envelopes(spool) == [], 30)
    [line] = refused()
    assert 'reply="554 5.4.6 Too many hops (4): a mail loop?"' in line
    # The client's pass and three passes back in were spooled; the fifth pass was refused.
    assert sum("outcome=queued" in line for line in decisions()) == 4
