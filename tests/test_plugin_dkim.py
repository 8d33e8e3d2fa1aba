"""dkim plugin over real SMTP and a real DNS server: every result, rejects, and signing."""

from __future__ import annotations

import dkim
import pytest

from tests.authsupport import (
    ar_clauses,
    ed25519_key,
    header_values,
    make_message,
    publish,
    rsa_key,
    sign,
)


def dkim_gateway(make_gateway, dns_server, **config):
    return make_gateway(
        dns={"nameservers": [dns_server.address], "timeout": "1s"},
        plugins={"dkim": config},
    )


def send(gw, message, sender="alice@example.net"):
    with gw.client() as client:
        return client.sendmail(sender, ["bob@example.com"], message)


def dkim_clauses(upstream):
    [msg] = upstream.messages
    [ar] = header_values(msg.data, "Authentication-Results")
    return ar_clauses(ar).get("dkim", [])


def test_valid_rsa_signature_passes(make_gateway, dns_server, upstream, decisions):
    publish(dns_server, "example.net", "sel", rsa_key())
    gw = dkim_gateway(make_gateway, dns_server)
    send(gw, sign(make_message(), "example.net"))
    [clause] = dkim_clauses(upstream)
    assert clause.startswith("dkim=pass header.d=example.net header.b=")
    assert "header.s=sel header.a=rsa-sha256" in clause
    assert "dkim.pass:tag" in decisions()[0]


def test_valid_ed25519_signature_passes(make_gateway, dns_server, upstream):
    publish(dns_server, "example.net", "ed", ed25519_key())
    gw = dkim_gateway(make_gateway, dns_server)
    send(gw, sign(make_message(), "example.net", "ed", ed25519_key()))
    [clause] = dkim_clauses(upstream)
    assert clause.startswith("dkim=pass header.d=example.net")
    assert "header.a=ed25519-sha256" in clause


def test_tampered_body_fails(make_gateway, dns_server, upstream, decisions):
    publish(dns_server, "example.net", "sel", rsa_key())
    gw = dkim_gateway(make_gateway, dns_server)
    send(gw, sign(make_message(), "example.net") + b"P.S. added on the way\r\n")
    [clause] = dkim_clauses(upstream)
    assert clause.startswith("dkim=fail (body hash did not verify) header.d=example.net")
    assert "dkim.fail:tag" in decisions()[0] and "score=1" in decisions()[0]


def test_tampered_signed_header_fails(make_gateway, dns_server, upstream):
    publish(dns_server, "example.net", "sel", rsa_key())
    gw = dkim_gateway(make_gateway, dns_server)
    signed = sign(make_message(subject="hello"), "example.net")
    send(gw, signed.replace(b"Subject: hello", b"Subject: HELLO, you won"))
    [clause] = dkim_clauses(upstream)
    assert clause.startswith("dkim=fail (signature did not verify) header.d=example.net")


def test_missing_key_is_permerror(make_gateway, dns_server, upstream):
    gw = dkim_gateway(make_gateway, dns_server)
    send(gw, sign(make_message(), "example.net"))
    [clause] = dkim_clauses(upstream)
    assert clause.startswith("dkim=permerror (no key) header.d=example.net")


def test_revoked_key_is_permerror(make_gateway, dns_server, upstream):
    dns_server.add("sel._domainkey.example.net", "TXT", "v=DKIM1; k=rsa; p=")
    gw = dkim_gateway(make_gateway, dns_server)
    send(gw, sign(make_message(), "example.net"))
    [clause] = dkim_clauses(upstream)
    assert clause.startswith("dkim=permerror (revoked key)")


def test_key_with_bad_base64_is_permerror_not_a_plugin_error(make_gateway, dns_server, upstream):
    # dkimpy lets binascii.Error out of its key parser: it was a 451 from the stage
    record = rsa_key().record
    dns_server.add("sel._domainkey.example.net", "TXT", record[: record.index("p=") + 47])
    gw = dkim_gateway(make_gateway, dns_server)
    send(gw, sign(make_message(), "example.net"))
    [clause] = dkim_clauses(upstream)
    assert clause.startswith("dkim=permerror (could not parse the public key")


def test_dns_timeout_is_temperror_not_fail(make_gateway, dns_server, upstream, decisions):
    dns_server.timeout("sel._domainkey.example.net")
    gw = dkim_gateway(make_gateway, dns_server)
    send(gw, sign(make_message(), "example.net"))
    [clause] = dkim_clauses(upstream)
    assert clause.startswith("dkim=temperror (key lookup failed) header.d=example.net")
    assert "dkim.temperror:tag" in decisions()[0]


def test_servfail_is_temperror(make_gateway, dns_server, upstream):
    dns_server.servfail("sel._domainkey.example.net")
    gw = dkim_gateway(make_gateway, dns_server)
    send(gw, sign(make_message(), "example.net"))
    assert dkim_clauses(upstream)[0].startswith("dkim=temperror")


def test_malformed_signature_is_neutral(make_gateway, dns_server, upstream):
    publish(dns_server, "example.net", "sel", rsa_key())
    gw = dkim_gateway(make_gateway, dns_server)
    signed = sign(make_message(), "example.net")
    send(gw, signed.replace(b"a=rsa-sha256", b"a=rsa-md5", 1))
    [clause] = dkim_clauses(upstream)
    assert clause.startswith("dkim=neutral (unknown signature algorithm")


def test_unparsable_header_section_is_neutral_not_an_error(make_gateway, dns_server, upstream):
    publish(dns_server, "example.net", "sel", rsa_key())
    gw = dkim_gateway(make_gateway, dns_server)
    signed = sign(make_message(), "example.net")
    send(gw, signed.replace(b"Subject: hello\r\n", b"Subject: hello\r\nno colon here\r\n"))
    [clause] = dkim_clauses(upstream)
    assert clause.startswith("dkim=neutral (unparsable header section)")


def test_two_signatures_each_get_a_result(make_gateway, dns_server, upstream, decisions):
    publish(dns_server, "example.net", "sel", rsa_key())
    publish(dns_server, "esp.example", "s2", rsa_key(n=1))
    gw = dkim_gateway(make_gateway, dns_server)
    # the ESP signs with a key that DNS does not publish: its signature fails
    message = sign(sign(make_message(), "example.net"), "esp.example", "s2", rsa_key(n=2))
    send(gw, message)
    clauses = dkim_clauses(upstream)
    assert [c.split(" ")[0] for c in clauses] == ["dkim=fail", "dkim=pass"]
    assert "header.d=esp.example" in clauses[0] and "header.d=example.net" in clauses[1]
    assert "dkim.pass:tag" in decisions()[0]


def test_only_max_signatures_are_checked(make_gateway, dns_server, upstream):
    publish(dns_server, "example.net", "sel", rsa_key())
    gw = dkim_gateway(make_gateway, dns_server, max_signatures=1)
    send(gw, sign(sign(make_message(), "example.net"), "example.net"))
    assert len(dkim_clauses(upstream)) == 1


def test_unsigned_message_is_dkim_none(make_gateway, dns_server, upstream, decisions):
    gw = dkim_gateway(make_gateway, dns_server)
    send(gw, make_message())
    assert dkim_clauses(upstream) == ["dkim=none"]
    assert "dkim." not in decisions()[0]


def test_large_message_is_verified_in_a_thread(make_gateway, dns_server, upstream):
    publish(dns_server, "example.net", "sel", rsa_key())
    gw = dkim_gateway(make_gateway, dns_server)
    message = sign(make_message(size=600_000), "example.net")
    assert len(message) > 256 * 1024
    send(gw, message)
    assert dkim_clauses(upstream)[0].startswith("dkim=pass")


def test_failed_signature_of_a_listed_domain_is_rejected(make_gateway, dns_server, upstream):
    publish(dns_server, "bank.example", "sel", rsa_key())
    gw = dkim_gateway(make_gateway, dns_server, reject_failed=["bank.example"])
    with gw.client() as client:
        client.mail("alice@bank.example")
        client.rcpt("bob@example.com")
        tampered = sign(make_message("alice@bank.example"), "bank.example") + b"evil\r\n"
        code, text = client.data(tampered)
    assert (code, text) == (550, b"5.7.20 DKIM signature of bank.example did not verify")
    assert upstream.messages == []


def test_listed_domain_with_key_lookup_failure_is_tempfailed(make_gateway, dns_server, upstream):
    dns_server.servfail("sel._domainkey.bank.example")
    gw = dkim_gateway(make_gateway, dns_server, reject_failed=["bank.example"])
    with gw.client() as client:
        client.mail("alice@bank.example")
        client.rcpt("bob@example.com")
        code, text = client.data(sign(make_message("alice@bank.example"), "bank.example"))
    assert code == 451 and text.startswith(b"4.7.20 ")


def test_failed_signature_of_an_unlisted_domain_is_delivered(make_gateway, dns_server, upstream):
    publish(dns_server, "example.net", "sel", rsa_key())
    gw = dkim_gateway(make_gateway, dns_server, reject_failed=["bank.example"])
    send(gw, sign(make_message(), "example.net") + b"tampered\r\n")
    assert len(upstream.messages) == 1


# ---------------------------------------------------------------- signing


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_mail_from_trusted_networks_is_signed(make_gateway, upstream, tmp_path, algorithm):
    key = rsa_key() if algorithm == "rsa-sha256" else ed25519_key()
    key_file = tmp_path / "example.com.key"
    key_file.write_bytes(key.private)
    gw = make_gateway(
        trusted_networks=["127.0.0.0/8"],
        plugins={
            "dkim": {
                "sign": {
                    "example.com": {"selector": "out", "key": str(key_file), "algorithm": algorithm}
                }
            }
        },
    )
    with gw.client() as client:
        client.sendmail(
            "news@mail.example.com", ["x@elsewhere.org"], make_message("news@mail.example.com")
        )
    [msg] = upstream.messages
    [signature] = header_values(msg.data, "DKIM-Signature")
    assert "d=example.com;" in signature and "s=out;" in signature
    assert f"a={algorithm};" in signature
    # folded as dkimpy folds it: no line near the 998-character limit
    head = msg.data.split(b"\r\n\r\n")[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 100
    # the relayed bytes verify against the published key (as a receiver would check them)
    assert dkim.verify(msg.data, dnsfunc=lambda name, timeout=5: key.record.encode())


def test_mail_for_an_unlisted_from_domain_is_not_signed(make_gateway, upstream, tmp_path):
    key_file = tmp_path / "k.pem"
    key_file.write_bytes(rsa_key().private)
    gw = make_gateway(
        trusted_networks=["127.0.0.0/8"],
        plugins={"dkim": {"sign": {"example.com": {"selector": "out", "key": str(key_file)}}}},
    )
    with gw.client() as client:
        client.sendmail("a@other.example", ["x@elsewhere.org"], make_message("a@other.example"))
    assert header_values(upstream.messages[0].data, "DKIM-Signature") == []


def test_unreadable_or_bad_key_is_a_policy_error(make_gateway, tmp_path):
    with pytest.raises(Exception, match="cannot read key file"):
        make_gateway(
            plugins={"dkim": {"sign": {"example.com": {"selector": "s", "key": "/nonexistent"}}}}
        )
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(Exception, match="is not an rsa-sha256 private key"):
        make_gateway(
            plugins={"dkim": {"sign": {"example.com": {"selector": "s", "key": str(bad)}}}}
        )
