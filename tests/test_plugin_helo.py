"""The helo plugin: the checker on its own, then HELO/EHLO over real SMTP."""

from __future__ import annotations

import ipaddress

import pytest

from mailgate.plugins.helo import check_helo
from tests.rawsmtp import RawClient
from tests.support import MESSAGE

CLIENT = ipaddress.ip_address("192.0.2.7")
OURS = ipaddress.ip_address("198.51.100.1")


def faults(hostname: str) -> list[str]:
    found = check_helo(
        hostname, client_ip=CLIENT, own_names={"mx.example.com"}, own_addresses={OURS}
    )
    return [f.rule for f in found]


@pytest.mark.parametrize(
    ("hostname", "rules"),
    [
        ("mail.example.net", []),
        ("mail.example.net.", []),
        ("win_host.corp.example", []),
        ("[192.0.2.7]", []),
        ("[IPv6:2001:db8::1]", []),
        ("localhost", ["helo.not_fqdn"]),
        ("host.123", ["helo.not_fqdn"]),
        ("192.0.2.7", ["helo.bare_ip"]),
        ("2001:db8::1", ["helo.bare_ip"]),
        ("MX.Example.COM", ["helo.our_name"]),
        ("[198.51.100.1]", ["helo.our_address"]),
        ("198.51.100.1", ["helo.bare_ip", "helo.our_address"]),
        ("bad..example", ["helo.bad_syntax"]),
        ("-bad.example", ["helo.bad_syntax"]),
        ("bad!.example", ["helo.bad_syntax"]),
        ("[192.0.2.256]", ["helo.bad_syntax"]),
        ("[IPv6:nonsense]", ["helo.bad_syntax"]),
        ("[tag:something]", ["helo.bad_syntax"]),
        ("a" * 64 + ".example", ["helo.bad_syntax"]),
    ],
)
def test_checker(hostname, rules):
    assert faults(hostname) == rules


def test_a_client_may_name_its_own_address_even_if_it_is_ours_too():
    # A client on the gateway's own host connects from and to the same address.
    local = ipaddress.ip_address("127.0.0.1")
    assert check_helo("[127.0.0.1]", client_ip=local, own_names=set(), own_addresses={local}) == []


def test_our_name_is_refused_over_smtp(make_gateway, decisions):
    gw = make_gateway(plugins={"helo": {}})
    with RawClient(gw.port) as c:
        assert c.cmd(b"EHLO mailgate.test") == (550, b"5.7.1 HELO/EHLO claims to be this server")
        assert c.cmd(b"EHLO example.com")[0] == 550  # one of our domains
        assert c.cmd(b"EHLO client.example.net")[0] == 250


def test_our_address_is_refused_but_the_clients_own_literal_is_fine(make_gateway):
    gw = make_gateway(plugins={"helo": {"own_addresses": ["192.0.2.1"]}})
    with RawClient(gw.port) as c:
        assert c.cmd(b"HELO [192.0.2.1]") == (
            550,
            b"5.7.1 HELO/EHLO claims an address of this server",
        )
        assert c.cmd(b"HELO [127.0.0.1]")[0] == 250


def test_the_address_the_client_connected_to_is_ours(make_gateway):
    gw = make_gateway(plugins={"helo": {}})
    with RawClient(gw.port, source="127.0.0.2") as c:
        assert c.cmd(b"HELO [127.0.0.1]")[0] == 550
        assert c.cmd(b"HELO [127.0.0.2]")[0] == 250


def test_bad_syntax_is_refused_and_the_client_may_greet_again(make_gateway, upstream):
    gw = make_gateway(plugins={"helo": {}})
    with RawClient(gw.port) as c:
        assert c.cmd(b"EHLO bad!name") == (501, b"5.5.2 Invalid HELO/EHLO hostname")
        assert c.cmd(b"MAIL FROM:<alice@example.net>")[0] == 503
        assert c.cmd(b"EHLO client.example.net")[0] == 250
        assert c.cmd(b"MAIL FROM:<alice@example.net>")[0] == 250


def test_an_unqualified_name_is_tagged_and_the_score_reaches_the_message(make_gateway, upstream):
    gw = make_gateway(plugins={"helo": {}})
    with gw.client(helo="localhost") as client:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    head = upstream.messages[0].data.split(b"\r\n\r\n")[0]
    assert b"X-Spam-Score: 1\r\n" in head


def test_rules_can_make_a_tag_a_reject(make_gateway):
    gw = make_gateway(plugins={"helo": {"rules": {"helo.not_fqdn": "reject"}}})
    with RawClient(gw.port) as c:
        assert c.cmd(b"HELO localhost") == (504, b"5.5.2 HELO/EHLO hostname is not fully qualified")


def test_trusted_clients_are_not_checked_unless_asked(make_gateway):
    gw = make_gateway(plugins={"helo": {}}, trusted_networks=["127.0.0.0/8"])
    with RawClient(gw.port) as c:
        assert c.cmd(b"HELO mailgate.test")[0] == 250
    gw = make_gateway(plugins={"helo": {"check_trusted": True}}, trusted_networks=["127.0.0.0/8"])
    with RawClient(gw.port) as c:
        assert c.cmd(b"HELO mailgate.test")[0] == 550


def test_own_names_replace_the_defaults(make_gateway):
    gw = make_gateway(plugins={"helo": {"own_names": ["mx1.example.com"]}})
    with RawClient(gw.port) as c:
        assert c.cmd(b"HELO mailgate.test")[0] == 250
        assert c.cmd(b"HELO MX1.example.com.")[0] == 550


def test_a_name_that_cannot_be_an_address_skips_the_address_parser() -> None:
    """check_helo's quick test says "not an address" only where ip_address would raise."""
    import ipaddress
    import random

    rng = random.Random(17)
    alphabet = "0123456789.:abcdefABCDEF%x-[]\u0663\u00b2"
    for _ in range(50_000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        if ":" in name or name.replace(".", "").isdigit():
            continue
        try:
            ipaddress.ip_address(name)
        except ValueError:
            continue
        raise AssertionError(f"{name!r} is an address")
