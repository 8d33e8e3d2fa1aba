"""The one timer handle per connection (issue 17, round 4) still times every wait right.

The SMTP server and the relay keep one lazy timer handle per connection: a
wait moves its deadline, and a handle that fires before the deadline (the
client or the upstream was active since it was set) sets itself again. These
tests make the handle fire early on purpose: a client that keeps talking is
never cut off by the deadline of an earlier wait, and is cut off one idle
timeout after it goes quiet; an upstream reply that is slow after quick ones
times out after the upstream timeout, not at an earlier read's deadline.
"""

from __future__ import annotations

import time

from tests.rawsmtp import RawClient, wait_for
from tests.support import MESSAGE

EHLO = b"EHLO client.example.net"
TIMEOUT = b"4.4.2 mailgate.test Timeout waiting for the client, closing connection"


def test_a_client_that_keeps_talking_outlives_its_first_deadline(make_gateway):
    gw = make_gateway(limits={"idle_timeout": "1s"})
    with RawClient(gw.port) as c:
        started = time.monotonic()
        while time.monotonic() - started < 2.5:  # 2.5 idle timeouts, a command every 0.3 s
            assert c.cmd(EHLO)[0] == 250
            last = time.monotonic()
            time.sleep(0.3)
        assert c.reply() == (421, TIMEOUT)
        waited = time.monotonic() - last
        assert c.closed_by_server()
    assert 0.9 <= waited < 3.0, waited


def test_a_message_that_keeps_coming_is_timed_by_its_last_chunk(make_gateway, upstream):
    gw = make_gateway(limits={"idle_timeout": "1s", "data_timeout": "30s"})
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        c.open_data()
        c.send(b"Subject: slow\r\n\r\n")
        started = time.monotonic()
        while time.monotonic() - started < 2.5:
            c.send(b"x\r\n")
            last = time.monotonic()
            time.sleep(0.3)
        assert c.reply() == (421, TIMEOUT)  # the idle part, not "DATA took too long"
        waited = time.monotonic() - last
    assert 0.9 <= waited < 3.0, waited
    assert upstream.messages == []


def test_a_slow_upstream_reply_after_quick_ones_waits_the_whole_timeout(
    make_gateway, upstream, decisions
):
    gw = make_gateway(upstream={"url": upstream.url, "timeout": "1s"})
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert len(upstream.messages) == 1
    time.sleep(0.5)  # the pooled connection's handle, set at its last read, fires in the next
    upstream.behaviour.data_delay = 3
    with gw.client() as client:
        client.mail("alice@example.net")
        client.rcpt("bob@example.com")
        started = time.monotonic()
        code, text = client.data(MESSAGE)
        waited = time.monotonic() - started
    assert (code, text[:5]) == (451, b"4.4.2")
    assert 0.9 <= waited < 2.5, waited
    assert wait_for(lambda: "outcome=tempfailed stage=data" in decisions()[-1])
