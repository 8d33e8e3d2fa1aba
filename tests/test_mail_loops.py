"""Mail loops: ``limits.hops`` counts ``Received:`` fields and refuses a looping message."""

from __future__ import annotations

import smtplib
import socket

import pytest

from mailgate.hops import hop_count
from mailgate.policy import parse_policy, relay_loops
from mailgate.runtime import Runtime
from mailgate.yamlsource import SourceError, load
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
    assert _send(gw, _with_received(99))[0] == 250  # with ours, the upstream sees 100
    code, text = _send(gw, _with_received(100))
    assert (code, text) == (554, b"5.4.6 Too many hops (100): a mail loop?")
    assert len(upstream.messages) == 1
    line = decisions()[-1]
    assert "verdicts=limits.hops:reject" in line and "outcome=rejected" in line, line


def _free_ports(count: int) -> list[int]:
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def test_two_gateways_that_relay_to_each_other_stop_the_loop(
    make_gateway, queue_policy, tmp_path, decisions
):
    # A relays to B and B to A (a routing slip no single policy shows): each pass is
    # spooled and delivered on, one Received: line more each time, until the pass at
    # limits.hops is refused for good and the queue that tried it drops the message.
    ports = _free_ports(2)
    for mine, other in (ports, ports[::-1]):
        make_gateway(
            **queue_policy(directory=str(tmp_path / f"spool{mine}"), handoff_timeout=0),
            listen=[{"address": f"127.0.0.1:{mine}"}],
            upstream=f"smtp://127.0.0.1:{other}",
            limits={"hops": 4},
        )
    with smtplib.SMTP("127.0.0.1", ports[0], timeout=10) as client:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)

    def refused() -> list[str]:
        return [line for line in decisions() if "limits.hops:reject" in line]

    spools = [tmp_path / f"spool{port}" for port in ports]
    assert wait_until(lambda: refused() != [] and all(envelopes(s) == [] for s in spools), 30)
    [line] = refused()
    assert 'reply="554 5.4.6 Too many hops (4): a mail loop?"' in line
    # The client's pass and three passes on were spooled; the fifth pass was refused.
    assert sum("outcome=queued" in line for line in decisions()) == 4


def test_a_policy_whose_upstream_is_its_own_listener_is_refused(tmp_path):
    policy = tmp_path / "loop.yaml"
    policy.write_text(
        "listen:\n  - address: 0.0.0.0:2525\n"
        "upstream: smtp://localhost:2525\n"
        "delivery: queue\n"
        "routes:\n  Example.COM: {url: 'smtp://10.0.0.1:25', failover: ['smtp://127.0.0.1:2525']}\n"
    )
    with pytest.raises(SourceError) as refused:
        Runtime.load(str(policy))
    assert refused.value.messages == [
        f"{policy}:3:1: upstream: smtp://localhost:2525 is this gateway's own listener"
        " 0.0.0.0:2525: mail would loop",
        f"{policy}:6:3: routes.Example.COM: smtp://127.0.0.1:2525 is this gateway's own"
        " listener 0.0.0.0:2525: mail would loop",
    ]


@pytest.mark.parametrize(
    ("listen", "upstream"),
    [
        ("127.0.0.1:2525", "smtp://127.0.0.2:2525"),  # another loopback address
        ("127.0.0.1:2525", "smtp://127.0.0.1:25"),  # another port
        ("127.0.0.1:0", "smtp://127.0.0.1:0"),  # port 0 is no port
        ("192.0.2.1:2525", "smtp://localhost:2525"),
    ],
)
def test_an_upstream_on_another_socket_is_no_loop(tmp_path, listen, upstream):
    policy = tmp_path / "ok.yaml"
    policy.write_text(f"listen:\n  - address: {listen}\nupstream: {upstream}\n")
    assert relay_loops(parse_policy(load(policy.read_text(), str(policy))), load("{}", "x")) == []
