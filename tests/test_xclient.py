"""XCLIENT and XFORWARD to the upstream: against a real Postfix, and a README-faithful server.

The Postfix tests run a private Postfix instance (``tests/postfix.py``) with
``smtpd_authorized_xclient_hosts``; they are skipped only where Postfix is
not installed (``.ci/run`` installs it). The ``XclientUpstream`` tests cover
what a well-configured Postfix never does (refusing an advertised XCLIENT) and
check the exact commands sent.
"""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Callable, Iterator

import pytest

from tests import postfix
from tests.support import MESSAGE, LoopThread, RecordingUpstream
from tests.test_proxy_protocol import ProxiedSMTP, v1
from tests.upstreams import XclientUpstream

MakeXclient = Callable[..., XclientUpstream]


@pytest.fixture
def make_xclient_upstream(loop_thread: LoopThread) -> Iterator[MakeXclient]:
    """Start XCLIENT/XFORWARD-speaking upstreams with the given options."""
    started: list[XclientUpstream] = []

    def make(**options: bool) -> XclientUpstream:
        server = XclientUpstream(loop_thread, **options)
        started.append(server)
        return server

    yield make
    for server in started:
        server.close()


def _send(gw, helo: str = "client.example.net", rcpt: str = "bob@example.com") -> None:
    with gw.client(helo=helo) as client:
        client.sendmail("alice@example.net", [rcpt], MESSAGE)


# ------------------------------------------------------------- README-faithful server


def test_xclient_names_the_real_client_with_a_verified_name(
    make_gateway, make_xclient_upstream, dns_server
):
    dns_server.add("1.0.0.127.in-addr.arpa", "PTR", "client.example.net")
    dns_server.add("client.example.net", "A", "127.0.0.1")
    up = make_xclient_upstream()
    gw = make_gateway(
        upstream={"url": up.url, "client_identity": "xclient"},
        dns={"nameservers": [dns_server.address]},
    )
    _send(gw, helo="helo.example.net")
    [command] = up.commands
    assert command.startswith("XCLIENT NAME=client.example.net HELO=helo.example.net PROTO=ESMTP")
    assert command.split()[-1] == "ADDR=127.0.0.1"  # ADDR last, as XCLIENT_README asks
    assert up.seen[0]["xclient"]["ADDR"] == "127.0.0.1"
    assert len(up.messages) == 1


def test_unverified_reverse_name_is_sent_as_unavailable(
    make_gateway, make_xclient_upstream, dns_server
):
    dns_server.add("1.0.0.127.in-addr.arpa", "PTR", "liar.example.net")  # no A record back
    up = make_xclient_upstream()
    gw = make_gateway(
        upstream={"url": up.url, "client_identity": "xclient"},
        dns={"nameservers": [dns_server.address]},
    )
    _send(gw)
    assert up.seen[0]["xclient"]["NAME"] == "[UNAVAILABLE]"


def test_one_announcement_per_client_and_connections_reused(make_gateway, make_xclient_upstream):
    up = make_xclient_upstream()
    gw = make_gateway(upstream={"url": up.url, "client_identity": "xclient"})
    with gw.client(helo="one.example.net") as client:
        for i in range(3):
            client.sendmail("alice@example.net", [f"u{i}@example.com"], MESSAGE)
    assert len(up.commands) == 1 and up.connections == 1
    # The same client again (same address and HELO): the announced connection is reused.
    _send(gw, helo="one.example.net")
    assert len(up.commands) == 1 and up.connections == 1
    # Another client: the upstream now thinks it talks to "one", so a fresh connection is used.
    _send(gw, helo="two.example.net")
    assert [c.split()[2] for c in up.commands] == ["HELO=one.example.net", "HELO=two.example.net"]
    assert up.connections == 2
    assert [s["xclient"]["HELO"] for s in up.seen] == ["one.example.net"] * 4 + ["two.example.net"]


def test_xforward_when_xclient_is_not_offered(make_gateway, make_xclient_upstream):
    up = make_xclient_upstream(offer_xclient=False)
    gw = make_gateway(upstream={"url": up.url, "client_identity": "xclient"})
    with gw.client() as client:
        client.sendmail("alice@example.net", ["a@example.com"], MESSAGE)
        client.sendmail("alice@example.net", ["b@example.com"], MESSAGE)
    # XFORWARD lasts one transaction: it is sent before each MAIL.
    assert [c.split()[0] for c in up.commands] == ["XFORWARD", "XFORWARD"]
    assert all(s["xforward"]["ADDR"] == "127.0.0.1" for s in up.seen)
    assert all(s["xclient"] == {} for s in up.seen)


def test_xforward_mode_never_sends_xclient(make_gateway, make_xclient_upstream):
    up = make_xclient_upstream()
    gw = make_gateway(upstream={"url": up.url, "client_identity": "xforward"})
    _send(gw)
    assert [c.split()[0] for c in up.commands] == ["XFORWARD"]


def test_identity_off_sends_nothing(make_gateway, make_xclient_upstream):
    up = make_xclient_upstream()
    gw = make_gateway(upstream={"url": up.url})
    _send(gw)
    assert up.commands == [] and len(up.messages) == 1


def test_upstream_without_either_extension_still_gets_the_mail(make_gateway, upstream):
    gw = make_gateway(upstream={"url": upstream.url, "client_identity": "xclient"})
    _send(gw)
    assert len(upstream.messages) == 1


def test_refused_xclient_gives_4xx_and_never_relays_as_the_gateway(
    make_gateway, make_xclient_upstream, caplog
):
    up = make_xclient_upstream(authorize_xclient=False)
    gw = make_gateway(upstream={"url": up.url, "client_identity": "xclient"})
    with gw.client() as client:
        code, text = client.mail("alice@example.net")
    assert (code, text[:5]) == (451, b"4.3.0")
    assert up.mail_commands == 0
    assert re.search(r"refused XCLIENT: server=\S+ error=550 5\.7\.0", caplog.text)


# ------------------------------------------------------------- a real Postfix

needs_postfix = pytest.mark.skipif(postfix.available() is not None, reason=str(postfix.available()))


@pytest.fixture
def make_postfix(upstream: RecordingUpstream) -> Iterator[Callable[..., postfix.PostfixServer]]:
    """Start private Postfix instances that relay into the recording upstream."""
    started: list[postfix.PostfixServer] = []

    def make(refused_clients: tuple[str, ...] = ()) -> postfix.PostfixServer:
        server = postfix.PostfixServer(upstream.port, refused_clients)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def _wait_for(upstream: RecordingUpstream, count: int, server: postfix.PostfixServer) -> None:
    deadline = time.monotonic() + 60
    while len(upstream.messages) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(upstream.messages) >= count, server.log()


def _proxied_send(gw, client_ip: str, helo: str = "client.example.net") -> None:
    with ProxiedSMTP(gw.port, v1(client_ip)) as client:
        client.ehlo(helo)
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)


@needs_postfix
def test_postfix_sees_the_real_client_through_xclient(make_gateway, make_postfix, upstream):
    pf = make_postfix()
    listen = [{"address": "127.0.0.1:0", "proxy_protocol": True, "trusted_proxies": ["127.0.0.1"]}]
    gw = make_gateway(upstream={"url": pf.url, "client_identity": "xclient"}, listen=listen)
    _proxied_send(gw, "198.51.100.7", helo="helo.example.net")
    _wait_for(upstream, 1, pf)
    received = upstream.messages[0].data.split(b"\r\n\r\n")[0]
    # Postfix's own Received header names the client behind the load balancer and the gateway.
    assert b"from helo.example.net (unknown [198.51.100.7])" in received
    assert "client=unknown[198.51.100.7]" in pf.log()


@needs_postfix
def test_postfix_applies_its_access_rules_to_the_real_client(make_gateway, make_postfix, upstream):
    pf = make_postfix(refused_clients=("198.51.100.66",))
    listen = [{"address": "127.0.0.1:0", "proxy_protocol": True, "trusted_proxies": ["127.0.0.1"]}]
    gw = make_gateway(upstream={"url": pf.url, "client_identity": "xclient"}, listen=listen)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        _proxied_send(gw, "198.51.100.66")
    [(code, text)] = refused.value.recipients.values()
    assert code == 554 and b"client refused by Postfix" in text
    # Another client through the same gateway is fine.
    _proxied_send(gw, "198.51.100.7")
    _wait_for(upstream, 1, pf)
    assert b"[198.51.100.7]" in upstream.messages[0].data


@needs_postfix
def test_postfix_logs_the_real_client_through_xforward(make_gateway, make_postfix, upstream):
    pf = make_postfix()
    listen = [{"address": "127.0.0.1:0", "proxy_protocol": True, "trusted_proxies": ["127.0.0.1"]}]
    gw = make_gateway(upstream={"url": pf.url, "client_identity": "xforward"}, listen=listen)
    _proxied_send(gw, "198.51.100.8", helo="fwd.example.net")
    _wait_for(upstream, 1, pf)
    # XFORWARD changes what Postfix logs, not whom it judges or names in Received.
    assert "orig_client=unknown[198.51.100.8]" in pf.log()
    assert b"(unknown [127.0.0.1])" in upstream.messages[0].data
