"""Authentication-Results: one header of ours with every result; forged ones never survive."""

from __future__ import annotations

from pathlib import Path

from mailgate.authresults import (
    ArcResult,
    DkimResult,
    DmarcResult,
    SpfResult,
    authserv_id,
    header_value,
)
from mailgate.rewrite import HeaderStrip, strip_headers
from mailgate.runtime import Runtime
from tests.authsupport import ar_clauses, header_values, make_message, publish, rsa_key, sign

FORGED = (
    b"Authentication-Results: mailgate.test; spf=pass smtp.mailfrom=ceo@example.com;\r\n"
    b"\tdkim=pass header.d=example.com; dmarc=pass header.from=example.com\r\n"
    b"authentication-results: (looks legit) MAILGATE.TEST 1; dmarc=pass\r\n"
    b"Authentication-Results : mailgate.test; obsolete syntax, space before the colon\r\n"
    b"Authentication-Results: mx.upstream-isp.example; spf=pass smtp.mailfrom=x@example.org\r\n"
)


def test_forged_headers_claiming_our_id_are_removed_others_kept(make_gateway, upstream, decisions):
    gw = make_gateway()  # no auth plugin at all: forgeries are removed anyway
    message = FORGED + make_message()
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], message)
    [msg] = upstream.messages
    assert header_values(msg.data, "Authentication-Results") == [
        "mx.upstream-isp.example; spf=pass smtp.mailfrom=x@example.org"
    ]
    # everything else arrives byte for byte, after our Received header
    relayed = msg.data.split(b"\r\n", 1)[1].split(b"Authentication-Results: mx.upstream", 1)[1]
    assert relayed.endswith(make_message())
    assert b"ceo@example.com" not in msg.data
    assert "auth_results.forged:tag" in decisions()[0]


def test_our_header_replaces_the_forgery(make_gateway, dns_server, upstream):
    dns_server.add("example.net", "TXT", "v=spf1 -all")
    gw = make_gateway(dns={"nameservers": [dns_server.address]}, plugins={"spf": {}})
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], FORGED + make_message())
    [msg] = upstream.messages
    ours = [v for v in header_values(msg.data, "Authentication-Results") if "mailgate" in v]
    assert ours == ["mailgate.test; spf=fail smtp.mailfrom=alice@example.net"]


def test_one_header_lists_spf_every_dkim_signature_dmarc_and_arc(
    make_gateway, dns_server, upstream
):
    dns_server.add("example.net", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    dns_server.add("_dmarc.example.net", "TXT", "v=DMARC1; p=reject")
    publish(dns_server, "example.net", "sel", rsa_key())
    publish(dns_server, "esp.example", "s2", rsa_key(n=1))
    gw = make_gateway(
        dns={"nameservers": [dns_server.address]},
        plugins={"spf": {}, "dkim": {}, "arc": {}, "dmarc": {"enforce": True}},
    )
    message = sign(sign(make_message(), "example.net"), "esp.example", "s2", rsa_key(n=1))
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], message)
    [msg] = upstream.messages
    [ar] = header_values(msg.data, "Authentication-Results")
    clauses = ar_clauses(ar)
    assert clauses[""] == ["mailgate.test"]
    assert clauses["spf"] == ["spf=pass smtp.mailfrom=alice@example.net"]
    assert [c.split()[0] for c in clauses["dkim"]] == ["dkim=pass", "dkim=pass"]
    assert clauses["dmarc"] == ["dmarc=pass (p=reject dis=none) header.from=example.net"]
    assert clauses["arc"] == ["arc=none"]
    # folded, one clause per line, as it travels
    head = msg.data.split(b"\r\n\r\n")[0]
    assert b"Authentication-Results: mailgate.test;\r\n\tspf=pass" in head
    assert max(len(line) for line in head.split(b"\r\n")) < 200
    # the header sits above the message, below our Received header
    assert msg.data.index(b"Received: ") < msg.data.index(b"Authentication-Results: ")
    assert msg.data.index(b"Authentication-Results: ") < msg.data.index(b"DKIM-Signature: ")


# ---------------------------------------------------------------- the pieces, directly


def test_authserv_id_is_read_leniently():
    assert authserv_id("mailgate.test; spf=pass") == "mailgate.test"
    assert authserv_id("  (comment (nested)) MailGate.Test 1; none") == "mailgate.test"
    assert authserv_id('"mailgate.test"; none') == "mailgate.test"
    assert authserv_id("mailgate.test;spf=pass") == "mailgate.test"
    assert authserv_id("mailgate.test.evil; none") == "mailgate.test.evil"
    assert authserv_id("") == ""


def test_strip_headers_removes_whole_folded_fields_only():
    raw = (
        b"A: 1\r\nX-Drop: yes\r\n\tcontinued\r\nB: 2\r\nx-drop: no\r\n\r\n"
        b"X-Drop: in the body stays\r\n"
    )
    strip = HeaderStrip("X-Drop", lambda value: value.startswith("yes"))
    assert strip_headers(raw, [strip]) == (
        b"A: 1\r\nB: 2\r\nx-drop: no\r\n\r\nX-Drop: in the body stays\r\n"
    )
    assert strip_headers(raw, [HeaderStrip("x-drop")]) == (
        b"A: 1\r\nB: 2\r\n\r\nX-Drop: in the body stays\r\n"
    )
    assert strip_headers(raw, []) is raw
    assert strip_headers(raw, [HeaderStrip("Nope")]) is raw


def test_header_value_renders_every_method():
    value = header_value(
        "mx.example.com",
        {
            "spf": SpfResult(
                "softfail", "helo", "h.example", "postmaster@h.example", "1.2.3.4", "h.example"
            ),
            "dkim": (
                DkimResult(
                    "fail",
                    "example.org",
                    "s1",
                    "rsa-sha256",
                    "body hash did not verify",
                    "AbCdEfGhIj",
                ),
            ),
            "dmarc": DmarcResult("fail", "example.org", "example.org", "quarantine", "quarantine"),
            "arc": ArcResult("temperror", reason="key lookup failed"),
        },
    )
    assert value == (
        "mx.example.com;\r\n\tspf=softfail smtp.helo=h.example;\r\n"
        "\tdkim=fail (body hash did not verify) header.d=example.org header.b=AbCdEfGh "
        "header.s=s1 header.a=rsa-sha256;\r\n"
        "\tdmarc=fail (p=quarantine dis=quarantine) header.from=example.org;\r\n"
        "\tarc=fail (temperror)"
    )
    assert header_value("mx.example.com", {}) is None
    assert header_value("mx.example.com", {"dkim": ()}) == "mx.example.com;\r\n\tdkim=none"


def test_the_example_policy_loads():
    path = Path(__file__).parent.parent / "policies" / "examples" / "authentication.yaml"
    runtime = Runtime.load(str(path))
    assert list(runtime.policy.plugins) == ["spf", "dkim", "arc", "dmarc"]
    assert runtime.plugin_set.call_order("on_data")[-1] == "auth_results"


def test_the_quick_look_for_the_field_name_misses_no_field_header_fields_reads():
    """``_may_hold`` is False only where ``header_fields`` finds no Authentication-Results."""
    import random

    from mailgate.plugins.auth_results import _HEADER_LOWER, _may_hold
    from mailgate.rewrite import header_fields

    rng = random.Random(17)
    pieces = [b"Authentication-Results", b"AUTHENTICATION-results", b"authentication-result",
              b"X-Authentication-Results", b"From", b": v", b"\r\n", b"\r\n ", b"\r\n\r\n",
              b" ", b"\t", b"\n", b"\r", b"\xc3\xa9", b"body"]  # fmt: skip
    for _ in range(3000):
        raw = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        found = any(n.lower() == "authentication-results" for n, _ in header_fields(raw))
        assert _may_hold(raw, _HEADER_LOWER) or not found, raw
