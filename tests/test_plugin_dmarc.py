"""dmarc and arc over real SMTP and a real DNS server: alignment, policies, ARC override."""

from __future__ import annotations

import pytest

from mailgate.plugins.dmarc import aligned, organizational_domain, parse_record
from tests.authsupport import (
    ar_clauses,
    arc_seal,
    header_values,
    make_message,
    publish,
    rsa_key,
    sign,
)


def auth_gateway(make_gateway, dns_server, dmarc=None, **policy):
    return make_gateway(
        dns={"nameservers": [dns_server.address], "timeout": "1s"},
        plugins={
            "spf": {},
            "dkim": {},
            "arc": {},
            "dmarc": {"enforce": True} if dmarc is None else dmarc,
        },
        **policy,
    )


def deliver(gw, message, sender):
    """Send one message; return (code, text) of the end of DATA."""
    with gw.client() as client:
        assert client.mail(sender)[0] == 250
        assert client.rcpt("bob@example.com")[0] == 250
        return client.data(message)


def dmarc_clause(upstream):
    [msg] = upstream.messages
    [ar] = header_values(msg.data, "Authentication-Results")
    return ar_clauses(ar)["dmarc"][0]


# ---------------------------------------------------------------- helpers, directly


def test_organizational_domain_uses_the_public_suffix_list():
    assert organizational_domain("mail.example.com") == "example.com"
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert organizational_domain("Example.COM.") == "example.com"
    assert organizational_domain("co.uk") == "co.uk"


@pytest.mark.parametrize(
    ("identifier", "from_domain", "mode", "expected"),
    [
        ("example.com", "example.com", "s", True),
        ("mail.example.com", "example.com", "s", False),
        ("mail.example.com", "example.com", "r", True),
        ("example.com", "news.example.com", "r", True),
        ("a.example.co.uk", "b.example.co.uk", "r", True),
        ("example.co.uk", "other.co.uk", "r", False),
        ("", "example.com", "r", False),
    ],
)
def test_alignment(identifier, from_domain, mode, expected):
    assert aligned(identifier, from_domain, mode) is expected


def test_record_parsing_is_lenient_about_space_and_case():
    tags = parse_record("v=DMARC1;P=reject ; sp = none;pct=50; ")
    assert tags == {"v": "DMARC1", "p": "reject", "sp": "none", "pct": "50"}


# ---------------------------------------------------------------- the alignment matrix

# (aspf/adkim mode, authenticated by, MAIL FROM, DKIM d= or None, From domain, expected)
MATRIX = [
    ("r", "spf", "bounce@example.net", None, "example.net", "pass"),
    ("s", "spf", "bounce@example.net", None, "example.net", "pass"),
    ("r", "spf", "bounce@mail.example.net", None, "example.net", "pass"),
    ("s", "spf", "bounce@mail.example.net", None, "example.net", "fail"),
    ("r", "spf", "bounce@example.net", None, "news.example.net", "pass"),
    ("s", "spf", "bounce@example.net", None, "news.example.net", "fail"),
    ("r", "spf", "bounce@other.example", None, "example.net", "fail"),
    ("r", "dkim", "bounce@esp.example", "example.net", "example.net", "pass"),
    ("s", "dkim", "bounce@esp.example", "example.net", "example.net", "pass"),
    ("r", "dkim", "bounce@esp.example", "mail.example.net", "example.net", "pass"),
    ("s", "dkim", "bounce@esp.example", "mail.example.net", "example.net", "fail"),
    ("r", "dkim", "bounce@esp.example", "example.net", "news.example.net", "pass"),
    ("s", "dkim", "bounce@esp.example", "example.net", "news.example.net", "fail"),
    ("r", "dkim", "bounce@esp.example", "esp.example", "example.net", "fail"),
]


@pytest.mark.parametrize(("mode", "via", "sender", "d", "from_domain", "expected"), MATRIX)
def test_alignment_matrix(
    make_gateway, dns_server, upstream, mode, via, sender, d, from_domain, expected
):
    # SPF passes for the MAIL FROM domain; DKIM (when signed) passes for d=.
    dns_server.add(sender.rpartition("@")[2], "TXT", "v=spf1 ip4:127.0.0.1 -all")
    dns_server.add("_dmarc.example.net", "TXT", f"v=DMARC1; p=none; aspf={mode}; adkim={mode}")
    message = make_message(f"alice@{from_domain}")
    if d:
        publish(dns_server, d, "sel", rsa_key())
        message = sign(message, d)
    gw = auth_gateway(make_gateway, dns_server)
    assert deliver(gw, message, sender)[0] == 250
    clause = dmarc_clause(upstream)
    assert clause.startswith(f"dmarc={expected} ")
    assert clause.endswith(f"header.from={from_domain}")


# ---------------------------------------------------------------- policies


def forged(dns_server, record, from_domain="example.net"):
    """A From in ``from_domain`` with no aligned pass; example.net publishes ``record``."""
    dns_server.add("_dmarc.example.net", "TXT", record)
    return make_message(f"ceo@{from_domain}")


def test_p_reject_enforced_is_550_5_7_1(make_gateway, dns_server, upstream, decisions):
    gw = auth_gateway(make_gateway, dns_server)
    code, text = deliver(gw, forged(dns_server, "v=DMARC1; p=reject"), "x@attacker.example")
    assert (code, text) == (550, b"5.7.1 Email from example.net rejected per its DMARC policy")
    assert upstream.messages == []
    assert "dmarc.reject:reject" in decisions()[0]


def test_p_reject_without_enforce_is_recorded_only(make_gateway, dns_server, upstream, decisions):
    gw = auth_gateway(make_gateway, dns_server, dmarc={})
    assert deliver(gw, forged(dns_server, "v=DMARC1; p=reject"), "x@attacker.example")[0] == 250
    assert dmarc_clause(upstream).startswith("dmarc=fail (p=reject dis=reject)")
    assert "dmarc.fail:tag" in decisions()[0]


def test_p_reject_in_monitor_mode_logs_what_it_would_do(
    make_gateway, dns_server, upstream, decisions
):
    gw = auth_gateway(make_gateway, dns_server, dmarc={"enforce": True, "mode": "monitor"})
    assert deliver(gw, forged(dns_server, "v=DMARC1; p=reject"), "x@attacker.example")[0] == 250
    assert "dmarc.reject:reject(monitor)" in decisions()[0]


def test_p_quarantine_enforced_is_tagged_with_a_score(
    make_gateway, dns_server, upstream, decisions
):
    gw = auth_gateway(make_gateway, dns_server)
    record = "v=DMARC1; p=quarantine"
    assert deliver(gw, forged(dns_server, record), "x@attacker.example")[0] == 250
    [msg] = upstream.messages
    assert header_values(msg.data, "X-Spam-Flag") == ["YES"]
    assert "dmarc.quarantine:tag" in decisions()[0] and "score=5" in decisions()[0]


def test_p_none_is_tagged_only(make_gateway, dns_server, upstream, decisions):
    gw = auth_gateway(make_gateway, dns_server)
    assert deliver(gw, forged(dns_server, "v=DMARC1; p=none"), "x@attacker.example")[0] == 250
    assert dmarc_clause(upstream).startswith("dmarc=fail (p=none dis=none)")
    assert "dmarc.fail:tag" in decisions()[0]


def test_sp_applies_to_subdomains_found_at_the_organizational_domain(
    make_gateway, dns_server, upstream
):
    gw = auth_gateway(make_gateway, dns_server)
    message = forged(dns_server, "v=DMARC1; p=reject; sp=none", "news.example.net")
    assert deliver(gw, message, "x@attacker.example")[0] == 250
    assert dmarc_clause(upstream).startswith("dmarc=fail (p=none dis=none)")
    # the organizational domain itself still gets p=reject
    code, _ = deliver(gw, make_message("ceo@example.net"), "x@attacker.example")
    assert code == 550


def test_a_subdomain_record_takes_precedence(make_gateway, dns_server, upstream):
    dns_server.add("_dmarc.example.net", "TXT", "v=DMARC1; p=reject")
    dns_server.add("_dmarc.news.example.net", "TXT", "v=DMARC1; p=none")
    gw = auth_gateway(make_gateway, dns_server)
    assert deliver(gw, make_message("a@news.example.net"), "x@attacker.example")[0] == 250


def test_pct_zero_downgrades_reject_to_quarantine(make_gateway, dns_server, upstream, decisions):
    gw = auth_gateway(make_gateway, dns_server)
    record = "v=DMARC1; p=reject; pct=0"
    assert deliver(gw, forged(dns_server, record), "x@attacker.example")[0] == 250
    assert dmarc_clause(upstream).startswith("dmarc=fail (p=reject dis=quarantine)")
    assert "dmarc.quarantine:tag" in decisions()[0]


def test_no_record_is_dmarc_none(make_gateway, dns_server, upstream, decisions):
    gw = auth_gateway(make_gateway, dns_server)
    assert deliver(gw, make_message("a@example.net"), "x@attacker.example")[0] == 250
    assert dmarc_clause(upstream) == "dmarc=none header.from=example.net"
    assert "dmarc." not in decisions()[0]


def test_two_records_are_no_policy(make_gateway, dns_server, upstream):
    dns_server.add("_dmarc.example.net", "TXT", "v=DMARC1; p=reject")
    dns_server.add("_dmarc.example.net", "TXT", "v=DMARC1; p=none")
    gw = auth_gateway(make_gateway, dns_server)
    assert deliver(gw, make_message("a@example.net"), "x@attacker.example")[0] == 250
    assert dmarc_clause(upstream).startswith("dmarc=none")


def test_invalid_policy_is_permerror(make_gateway, dns_server, upstream):
    gw = auth_gateway(make_gateway, dns_server)
    assert deliver(gw, forged(dns_server, "v=DMARC1; p=bounce"), "x@attacker.example")[0] == 250
    assert dmarc_clause(upstream).startswith("dmarc=permerror")


def test_lookup_failure_is_temperror_and_may_tempfail(make_gateway, dns_server, upstream):
    dns_server.servfail("_dmarc.example.net")
    gw = auth_gateway(make_gateway, dns_server, dmarc={"enforce": True, "temperror": "tempfail"})
    code, text = deliver(gw, make_message("a@example.net"), "x@attacker.example")
    assert code == 451 and text.startswith(b"4.7.1 ")
    gw = auth_gateway(make_gateway, dns_server)
    assert deliver(gw, make_message("a@example.net"), "x@attacker.example")[0] == 250
    assert dmarc_clause(upstream).startswith("dmarc=temperror")


def test_several_from_headers_are_permerror(make_gateway, dns_server, upstream):
    dns_server.add("_dmarc.example.net", "TXT", "v=DMARC1; p=reject")
    gw = auth_gateway(make_gateway, dns_server)
    message = b"From: a@example.net\r\n" + make_message("b@other.example")
    assert deliver(gw, message, "x@attacker.example")[0] == 250
    assert dmarc_clause(upstream).startswith("dmarc=permerror")


def test_aligned_pass_is_delivered_under_p_reject(make_gateway, dns_server, upstream, decisions):
    dns_server.add("_dmarc.example.net", "TXT", "v=DMARC1; p=reject")
    publish(dns_server, "example.net", "sel", rsa_key())
    gw = auth_gateway(make_gateway, dns_server)
    assert (
        deliver(gw, sign(make_message("a@example.net"), "example.net"), "x@esp.example")[0] == 250
    )
    assert dmarc_clause(upstream).startswith("dmarc=pass (p=reject dis=none)")
    assert "dmarc.pass:tag" in decisions()[0]


def test_trusted_clients_are_not_evaluated(make_gateway, dns_server, upstream):
    gw = auth_gateway(make_gateway, dns_server, trusted_networks=["127.0.0.0/8"])
    assert deliver(gw, forged(dns_server, "v=DMARC1; p=reject"), "x@attacker.example")[0] == 250
    assert header_values(upstream.messages[0].data, "Authentication-Results") == []


# ---------------------------------------------------------------- ARC


def forwarded_by_list(dns_server):
    """example.net (p=reject) mail, re-sent by list.example with a changed body and an ARC seal.

    At the list, DKIM passed; after the list's footer it fails, and SPF for
    example.net does not cover the list's server: DMARC fails on arrival.
    """
    dns_server.add("_dmarc.example.net", "TXT", "v=DMARC1; p=reject")
    dns_server.add("example.net", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    publish(dns_server, "example.net", "sel", rsa_key())
    publish(dns_server, "list.example", "arc", rsa_key(n=1))
    original = sign(make_message("alice@example.net"), "example.net")
    footer = original + b"-- \r\nlist footer\r\n"
    return arc_seal(
        footer,
        "list.example",
        "arc",
        rsa_key(n=1),
        "dkim=pass header.d=example.net; spf=pass smtp.mailfrom=example.net; dmarc=pass",
    )


def test_arc_pass_from_a_trusted_sealer_excuses_a_dmarc_failure(
    make_gateway, dns_server, upstream, decisions
):
    message = forwarded_by_list(dns_server)
    gw = auth_gateway(
        make_gateway, dns_server, dmarc={"enforce": True, "trusted_arc_sealers": ["list.example"]}
    )
    assert deliver(gw, message, "alice@example.net")[0] == 250
    [msg] = upstream.messages
    ours, the_lists = header_values(msg.data, "Authentication-Results")
    assert ours.startswith("mailgate.test;") and the_lists.startswith("list.example;")
    clauses = ar_clauses(ours)
    assert clauses["arc"] == ["arc=pass (i=1) header.as-d=list.example"]
    assert clauses["dmarc"][0].startswith(
        "dmarc=fail (p=reject dis=reject override=trusted ARC sealer list.example)"
    )
    assert clauses["dkim"][0].startswith("dkim=fail (body hash did not verify)")
    assert "arc.pass:tag" in decisions()[0] and "dmarc.arc_override:tag" in decisions()[0]


def test_arc_pass_from_an_untrusted_sealer_does_not(make_gateway, dns_server, upstream):
    message = forwarded_by_list(dns_server)
    gw = auth_gateway(
        make_gateway, dns_server, dmarc={"enforce": True, "trusted_arc_sealers": ["other.example"]}
    )
    assert deliver(gw, message, "alice@example.net")[0] == 550


def test_broken_arc_chain_from_a_trusted_sealer_does_not(make_gateway, dns_server, upstream):
    message = forwarded_by_list(dns_server).replace(b"list footer", b"list f00ter")
    gw = make_gateway(
        dns={"nameservers": [dns_server.address], "timeout": "1s"},
        # no arc plugin: dmarc validates the chain itself
        plugins={
            "spf": {},
            "dkim": {},
            "dmarc": {"enforce": True, "trusted_arc_sealers": ["list.example"]},
        },
    )
    assert deliver(gw, message, "alice@example.net")[0] == 550


def test_dmarc_listed_before_dkim_is_warned_about(make_gateway, dns_server, caplog):
    make_gateway(
        dns={"nameservers": [dns_server.address]},
        plugins={"spf": {}, "dmarc": {}, "dkim": {}},
    )
    warnings = [r.getMessage() for r in caplog.records if r.name == "mailgate.plugins.dmarc"]
    assert warnings == [
        "dmarc runs before dkim: list it after them in the policy, or it will not see their results"
    ]
