"""dnsbl: postscreen-style sites, weights and filters, through a DNS server on loopback."""

from __future__ import annotations

import ipaddress
import smtplib

import pytest

from mailgate.plugins.dnsbl import Site, query_name
from mailgate.yamlsource import SourceError
from tests.support import MESSAGE

CLIENT = "1.0.0.127"  # 127.0.0.1 reversed, as DNS lists are asked


def policy(dns_server, **dnsbl: object) -> dict:
    return {"dns": {"nameservers": [dns_server.address], "timeout": "1s"},
            "plugins": {"dnsbl": dnsbl}}  # fmt: skip


def rcpt_reply(gw, rcpt: str = "bob@example.com") -> tuple[int, bytes]:
    with gw.client() as client:
        assert client.mail("alice@example.net")[0] == 250
        return client.rcpt(rcpt)


def test_site_syntax_filters_and_weights():
    site = Site.parse("zen.example=127.0.0.[2..4;10]*3")
    assert (site.zone, site.weight) == ("zen.example", 3)
    assert site.matches(["127.0.0.2", "127.0.0.5", "127.0.0.10", "127.255.255.254"]) == [
        "127.0.0.2",
        "127.0.0.10",
    ]
    assert Site.parse("wl.example*-2").weight == -2
    assert Site.parse("bl.example").matches(["127.0.0.9"]) == ["127.0.0.9"]
    for bad in ("zen", "zen.example=127.0.0", "zen.example=127.0.0.[4..2]", "zen.example*x"):
        with pytest.raises(ValueError):
            Site.parse(bad)


def test_query_names_for_ipv4_and_ipv6():
    assert query_name(ipaddress.ip_address("192.0.2.7"), "zen.example") == "7.2.0.192.zen.example"
    name = query_name(ipaddress.ip_address("2001:db8::1"), "bl.example")
    assert name == "1." + "0." * 23 + "8.b.d.0.1.0.0.2.bl.example"


def test_listed_client_is_refused_at_rcpt_naming_the_list(
    make_gateway, dns_server, upstream, decisions
):
    dns_server.add(f"{CLIENT}.zen.example", "A", "127.0.0.2")
    gw = make_gateway(**policy(dns_server, sites=["zen.example=127.0.0.[2..11]*2"], threshold=2))
    assert rcpt_reply(gw) == (
        550,
        b"5.7.1 Service unavailable; client [127.0.0.1] blocked using zen.example",
    )
    assert upstream.messages == []
    assert "verdicts=dnsbl.listed:reject" in decisions()[-1]


def test_exempt_recipients_still_get_mail(make_gateway, dns_server, upstream):
    dns_server.add(f"{CLIENT}.zen.example", "A", "127.0.0.2")
    gw = make_gateway(
        **policy(dns_server, sites=["zen.example"], exempt_recipients=["postmaster@example.com"])
    )
    assert rcpt_reply(gw, "postmaster@example.com")[0] == 250
    assert rcpt_reply(gw, "bob@example.com")[0] == 550


def test_replies_outside_the_filter_and_allow_lists_do_not_count(make_gateway, dns_server):
    dns_server.add(f"{CLIENT}.zen.example", "A", "127.255.255.254")  # "query refused"
    dns_server.add(f"{CLIENT}.bl.example", "A", "127.0.0.2")
    dns_server.add(f"{CLIENT}.wl.example", "A", "127.0.10.1")
    filtered = make_gateway(**policy(dns_server, sites=["zen.example=127.0.0.[2..11]*5"]))
    assert rcpt_reply(filtered)[0] == 250
    offset = make_gateway(
        **policy(dns_server, sites=["bl.example*2", "wl.example=127.0.[0..15].[0..255]*-1"],
                 threshold=2)
    )  # fmt: skip
    assert rcpt_reply(offset)[0] == 250
    listed = make_gateway(**policy(dns_server, sites=["bl.example*2"], threshold=2))
    assert rcpt_reply(listed)[0] == 550


def test_stage_connect_refuses_before_the_banner(make_gateway, dns_server):
    dns_server.add(f"{CLIENT}.bl.example", "A", "127.0.0.2")
    gw = make_gateway(**policy(dns_server, sites=["bl.example"], stage="connect"))
    with pytest.raises(smtplib.SMTPConnectError) as err:
        gw.client()
    assert err.value.smtp_code == 554


def test_action_score_adds_to_the_message_score(make_gateway, dns_server, upstream):
    dns_server.add(f"{CLIENT}.bl.example", "A", "127.0.0.2")
    gw = make_gateway(
        scoring={"tag": 3, "reject": 15},
        **policy(dns_server, sites=["bl.example*2"], action="score", score_factor=2.0),
    )
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com", "carol@example.com"], MESSAGE)
    data = upstream.messages[0].data
    assert b"X-Spam-Score: 4\r\n" in data  # once per message, not per recipient
    assert b"X-Spam-Flag: YES\r\n" in data
    refuse = make_gateway(
        scoring={"reject": 4}, **policy(dns_server, sites=["bl.example*2"], action="score",
                                        score_factor=2.0)
    )  # fmt: skip
    with refuse.client() as client:
        client.mail("alice@example.net")
        client.rcpt("bob@example.com")
        assert client.data(MESSAGE) == (550, b"5.7.1 Message refused as spam")


def test_a_zone_that_does_not_answer_counts_as_not_listed(make_gateway, dns_server, caplog):
    dns_server.timeout(f"{CLIENT}.slow.example")
    dns_server.servfail(f"{CLIENT}.broken.example")
    dns_server.add(f"{CLIENT}.bl.example", "A", "127.0.0.2")
    gw = make_gateway(
        **policy(dns_server, sites=["slow.example*5", "broken.example*5", "bl.example"],
                 threshold=2)
    )  # fmt: skip
    assert rcpt_reply(gw)[0] == 250
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "dnsbl zone not answered: txn=" in logged
    assert "zone=slow.example" in logged and "zone=broken.example" in logged


def test_answers_are_cached_and_trusted_clients_are_not_looked_up(make_gateway, dns_server):
    dns_server.add(f"{CLIENT}.bl.example", "A", "127.0.0.2")
    gw = make_gateway(**policy(dns_server, sites=["bl.example=127.0.0.3", "bl.example*-1"]))
    for _ in range(3):
        assert rcpt_reply(gw)[0] == 250
    asked = [q for q in dns_server.queries if q[0].endswith("bl.example")]
    assert asked == [(f"{CLIENT}.bl.example", "A")]  # one zone, one query, three connections
    dns_server.queries.clear()
    trusted = make_gateway(
        trusted_networks=["127.0.0.0/8"], **policy(dns_server, sites=["x.example"])
    )
    assert rcpt_reply(trusted)[0] == 250
    assert dns_server.queries == []


def test_bad_sites_are_policy_errors_with_positions(make_gateway, dns_server):
    with pytest.raises(SourceError) as err:
        make_gateway(**policy(dns_server, sites=["zen.example=127.0.0.[2..300]"]))
    assert "plugins.dnsbl.sites: bad range '2..300' (0..255, low to high)" in err.value.messages[0]
    with pytest.raises(SourceError) as err:
        make_gateway(**policy(dns_server, sites=["bl.example"], action="score", stage="rcpt"))
    assert "action: score adds to the message once" in err.value.messages[0]
