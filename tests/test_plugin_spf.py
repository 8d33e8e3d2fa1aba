"""spf plugin: every RFC 7208 result through our DNS adapter, and its actions over real SMTP."""

from __future__ import annotations

import asyncio
import smtplib
import time

import pytest

from mailgate.dns import Resolver
from mailgate.dnsadapters import install_spf_lookup
from mailgate.plugins.spf import check_spf
from mailgate.policy import Dns
from tests.authsupport import ar_clauses, header_values, make_message

CLIENT = "192.0.2.10"


@pytest.fixture
def resolver(dns_server):
    install_spf_lookup()
    return Resolver(Dns(nameservers=[dns_server.address], timeout=1.0))


def check(resolver, sender="alice@example.net", ip=CLIENT, helo="mx.example.net"):
    return check_spf(resolver, ip, sender, helo, "mailgate.test", 5.0)


# ---------------------------------------------------------------- results, mechanism by mechanism


@pytest.mark.parametrize(
    ("record", "ip", "expected"),
    [
        ("v=spf1 ip4:192.0.2.0/24 -all", CLIENT, "pass"),
        ("v=spf1 ip4:192.0.2.0/24 -all", "198.51.100.1", "fail"),
        ("v=spf1 ip4:192.0.2.0/24 ~all", "198.51.100.1", "softfail"),
        ("v=spf1 ip4:192.0.2.0/24 ?all", "198.51.100.1", "neutral"),
        ("v=spf1 ip6:2001:db8::/32 -all", "2001:db8::25", "pass"),
        ("v=spf1 ip6:2001:db8::/32 -all", "2001:db9::25", "fail"),
        ("v=spf1 ip6:2001:db8::/32 -all", CLIENT, "fail"),
        ("v=spf1 ip4:192.0.2.0/24 frobnicate:x -all", CLIENT, "permerror"),
        ("v=spf1 ip4:192.0.2.300 -all", CLIENT, "permerror"),
    ],
)
def test_ip_mechanisms_and_all(resolver, dns_server, record, ip, expected):
    dns_server.add("example.net", "TXT", record)
    result = check(resolver, ip=ip)
    assert result.result == expected
    assert (result.identity, result.domain, result.sender) == (
        "mailfrom",
        "example.net",
        "alice@example.net",
    )


def test_no_record_is_none(resolver, dns_server):
    dns_server.add("example.net", "TXT", "google-site-verification=abc")
    assert check(resolver).result == "none"
    assert check(resolver, sender="bob@nowhere.example").result == "none"


def test_a_mechanism(resolver, dns_server):
    dns_server.add("example.net", "TXT", "v=spf1 a:out.example.net -all")
    dns_server.add("out.example.net", "A", CLIENT)
    assert check(resolver).result == "pass"
    assert check(resolver, ip="192.0.2.11").result == "fail"


def test_mx_mechanism(resolver, dns_server):
    dns_server.add("example.net", "TXT", "v=spf1 mx -all")
    dns_server.add("example.net", "MX", (10, "mx1.example.net"))
    dns_server.add("example.net", "MX", (20, "mx2.example.net"))
    dns_server.add("mx1.example.net", "A", "192.0.2.1")
    dns_server.add("mx2.example.net", "A", CLIENT)
    assert check(resolver).result == "pass"
    assert check(resolver, ip="192.0.2.2").result == "fail"


def test_include(resolver, dns_server):
    dns_server.add("example.net", "TXT", "v=spf1 include:_spf.provider.test -all")
    dns_server.add("_spf.provider.test", "TXT", "v=spf1 ip4:203.0.113.0/24 -all")
    assert check(resolver, ip="203.0.113.5").result == "pass"
    assert check(resolver).result == "fail"


def test_include_of_a_domain_without_record_is_permerror(resolver, dns_server):
    dns_server.add("example.net", "TXT", "v=spf1 include:missing.provider.test -all")
    assert check(resolver).result == "permerror"


def test_redirect(resolver, dns_server):
    dns_server.add("example.net", "TXT", "v=spf1 redirect=_spf.example.org")
    dns_server.add("_spf.example.org", "TXT", "v=spf1 ip4:192.0.2.0/28 ~all")
    assert check(resolver).result == "pass"
    assert check(resolver, ip="192.0.2.200").result == "softfail"


def test_exp_explanation_is_expanded_for_a_fail(resolver, dns_server):
    dns_server.add("example.net", "TXT", "v=spf1 ip4:192.0.2.0/24 -all exp=why.example.net")
    dns_server.add("why.example.net", "TXT", "%{i} is not one of %{d}'s mail servers")
    result = check(resolver, ip="198.51.100.7")
    assert result.result == "fail"
    assert result.explanation == "198.51.100.7 is not one of example.net's mail servers"


def test_more_than_ten_dns_lookups_is_permerror(resolver, dns_server):
    includes = " ".join(f"include:i{n}.example.net" for n in range(11))
    dns_server.add("example.net", "TXT", f"v=spf1 {includes} -all")
    for n in range(11):
        dns_server.add(f"i{n}.example.net", "TXT", "v=spf1 ip4:198.51.100.0/24 -all")
    result = check(resolver)
    assert result.result == "permerror"
    # ten are allowed: the same with ten includes fails cleanly instead
    dns_server.add("example.org", "TXT", f"v=spf1 {includes.rsplit(' ', 1)[0]} -all")
    assert check(resolver, sender="alice@example.org").result == "fail"


def test_more_than_two_void_lookups_is_permerror(resolver, dns_server):
    voids = ["a:v1.example.net", "a:v2.example.net", "a:v3.example.net"]
    dns_server.add("example.net", "TXT", f"v=spf1 {' '.join(voids)} -all")
    assert check(resolver).result == "permerror"
    # two are allowed
    dns_server.add("example.org", "TXT", f"v=spf1 {' '.join(voids[:2])} -all")
    assert check(resolver, sender="alice@example.org").result == "fail"


def test_servfail_and_timeout_are_temperror(resolver, dns_server):
    dns_server.servfail("example.net")
    assert check(resolver).result == "temperror"
    dns_server.timeout("slow.example")
    assert check(resolver, sender="alice@slow.example").result == "temperror"


def test_null_sender_checks_postmaster_at_helo(resolver, dns_server):
    dns_server.add("mx.example.net", "TXT", "v=spf1 ip4:192.0.2.10 -all")
    result = check(resolver, sender="")
    assert (result.result, result.identity) == ("pass", "helo")
    assert result.sender == "postmaster@mx.example.net"


def test_lookups_use_absolute_names_and_the_shared_cache(resolver, dns_server):
    dns_server.add("example.net", "TXT", "v=spf1 a:out.example.net -all")
    dns_server.add("out.example.net", "A", CLIENT)
    assert check(resolver).result == "pass"
    assert check(resolver).result == "pass"
    # each name asked once (the second check is answered from the TTL cache), no search suffix
    assert sorted(dns_server.queries) == [("example.net", "TXT"), ("out.example.net", "A")]


def test_the_shared_cache_honours_ttls(resolver, dns_server):
    dns_server.add("ttl.example", "A", "192.0.2.1")  # the test server answers with TTL 300
    before = time.time()
    resolver.query_sync("ttl.example", "A")
    assert asyncio.run(resolver.addresses("ttl.example")) == ["192.0.2.1"]  # async: same cache
    assert dns_server.queries == [("ttl.example", "A")]
    [node] = resolver.cache.data.values()
    assert before + 299 <= node.value.expiration <= time.time() + 300
    node.value.expiration = time.time() - 1  # as if the TTL had run out
    resolver.query_sync("ttl.example", "A")
    assert dns_server.queries == [("ttl.example", "A")] * 2


# ---------------------------------------------------------------- the plugin over real SMTP


def spf_gateway(make_gateway, dns_server, **spf_config):
    return make_gateway(
        dns={"nameservers": [dns_server.address], "timeout": "1s"},
        plugins={"spf": spf_config},
    )


def test_fail_is_only_tagged_by_default(make_gateway, dns_server, upstream, decisions):
    dns_server.add("example.net", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    gw = spf_gateway(make_gateway, dns_server)
    with gw.client() as client:
        assert client.sendmail("alice@example.net", ["bob@example.com"], make_message()) == {}
    [msg] = upstream.messages
    [received_spf] = header_values(msg.data, "Received-SPF")
    assert received_spf.startswith("Fail (mailgate.test: domain of example.net does not designate")
    assert "client-ip=127.0.0.1" in received_spf
    [ar] = header_values(msg.data, "Authentication-Results")
    assert ar_clauses(ar)["spf"] == ["spf=fail smtp.mailfrom=alice@example.net"]
    assert "spf.fail:tag" in decisions()[0]
    assert "score=2" in decisions()[0]


def test_pass_adds_received_spf_and_authentication_results(make_gateway, dns_server, upstream):
    dns_server.add("example.net", "TXT", "v=spf1 ip4:127.0.0.0/8 -all")
    gw = spf_gateway(make_gateway, dns_server, fail="reject")
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], make_message())
    [msg] = upstream.messages
    assert header_values(msg.data, "Received-SPF")[0].startswith("Pass (mailgate.test: domain of")
    [ar] = header_values(msg.data, "Authentication-Results")
    assert ar == "mailgate.test; spf=pass smtp.mailfrom=alice@example.net"


def test_fail_reject_refuses_at_mail_with_5_7_23_and_the_explanation(
    make_gateway, dns_server, upstream, decisions
):
    dns_server.add("example.net", "TXT", "v=spf1 ip4:192.0.2.0/24 -all exp=why.example.net")
    dns_server.add("why.example.net", "TXT", "See https://example.net/spf")
    gw = spf_gateway(make_gateway, dns_server, fail="reject")
    with gw.client() as client:
        code, text = client.mail("alice@example.net")
    assert code == 550
    assert text == b"5.7.23 SPF fail for example.net: See https://example.net/spf"
    assert upstream.mail_commands == 0
    assert "spf.fail:reject" in decisions()[0]


def test_temperror_tempfail_gives_451_4_7_24(make_gateway, dns_server, upstream):
    dns_server.servfail("example.net")
    gw = spf_gateway(make_gateway, dns_server, temperror="tempfail")
    with gw.client() as client:
        code, text = client.mail("alice@example.net")
    assert code == 451
    assert text.startswith(b"4.7.24 ")
    assert upstream.mail_commands == 0


def test_permerror_reject_gives_550_5_7_24(make_gateway, dns_server, upstream):
    dns_server.add("example.net", "TXT", "v=spf1 ip4:127.0.0.1 bogus -all")
    gw = spf_gateway(make_gateway, dns_server, permerror="reject")
    with gw.client() as client:
        code, text = client.mail("alice@example.net")
    assert (code, text) == (550, b"5.7.24 SPF record of example.net is invalid")


def test_softfail_tag_delivers_with_score(make_gateway, dns_server, upstream, decisions):
    dns_server.add("example.net", "TXT", "v=spf1 ip4:192.0.2.0/24 ~all")
    gw = spf_gateway(make_gateway, dns_server, fail="reject", softfail="tag")
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], make_message())
    [msg] = upstream.messages
    assert header_values(msg.data, "Received-SPF")[0].startswith("SoftFail")
    assert "spf.softfail:tag" in decisions()[0] and "score=1" in decisions()[0]


def test_null_sender_is_checked_against_helo(make_gateway, dns_server, upstream):
    dns_server.add("client.example.net", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    gw = spf_gateway(make_gateway, dns_server)
    with gw.client(helo="client.example.net") as client:
        client.sendmail("", ["bob@example.com"], make_message())
    [msg] = upstream.messages
    assert msg.sender == "<>"  # the upstream got MAIL FROM:<>
    [ar] = header_values(msg.data, "Authentication-Results")
    assert ar_clauses(ar)["spf"] == ["spf=pass smtp.helo=client.example.net"]


def test_trusted_networks_are_not_checked(make_gateway, dns_server, upstream):
    dns_server.add("example.net", "TXT", "v=spf1 -all")
    gw = make_gateway(
        dns={"nameservers": [dns_server.address]},
        trusted_networks=["127.0.0.0/8"],
        plugins={"spf": {"fail": "reject"}},
    )
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], make_message())
    [msg] = upstream.messages
    assert header_values(msg.data, "Received-SPF") == []
    assert header_values(msg.data, "Authentication-Results") == []
    assert dns_server.queries == []


def test_monitor_mode_logs_the_reject_and_delivers(make_gateway, dns_server, upstream, decisions):
    dns_server.add("example.net", "TXT", "v=spf1 -all")
    gw = spf_gateway(make_gateway, dns_server, fail="reject", mode="monitor")
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], make_message())
    assert len(upstream.messages) == 1
    assert "spf.fail:reject(monitor)" in decisions()[0]
    # the observation still reaches Authentication-Results
    [ar] = header_values(upstream.messages[0].data, "Authentication-Results")
    assert "spf=fail" in ar


def test_bad_action_is_a_policy_error(make_gateway, dns_server):
    with pytest.raises(Exception, match=r"plugins\.spf\.fail"):
        spf_gateway(make_gateway, dns_server, fail="bounce")


def test_gateway_keeps_serving_after_an_spf_refusal(make_gateway, dns_server, upstream):
    dns_server.add("example.net", "TXT", "v=spf1 -all")
    dns_server.add("example.org", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    gw = spf_gateway(make_gateway, dns_server, fail="reject")
    with gw.client() as client:
        with pytest.raises(smtplib.SMTPSenderRefused):
            client.sendmail("alice@example.net", ["bob@example.com"], make_message())
        client.rset()
        client.sendmail("carol@example.org", ["bob@example.com"], make_message())
    assert [m.sender for m in upstream.messages] == ["carol@example.org"]
