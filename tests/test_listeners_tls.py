"""Inbound TLS over real sockets: STARTTLS, require_starttls, implicit TLS, bad certificates."""

from __future__ import annotations

import smtplib
import socket
import ssl

import pytest

from mailgate.cli import main as mailgate
from tests.support import MESSAGE
from tests.tlscerts import Certs


def _client_context(ca: object) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def _listener(certs: Certs, **extra: object) -> dict[str, object]:
    tls = {"cert": str(certs.server_cert), "key": str(certs.server_key)}
    return {"address": "127.0.0.1:0", "starttls": tls, **extra}


def test_starttls_is_offered_verified_and_marks_the_session(make_gateway, upstream, certs):
    gw = make_gateway(listen=[_listener(certs)])
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.ehlo("client.example.net")
        assert client.has_extn("starttls")
        code, text = client.starttls(context=_client_context(certs.ca))
        assert (code, text) == (220, b"2.0.0 Ready to start TLS")
        client.ehlo("client.example.net")
        assert not client.has_extn("starttls")
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    [msg] = upstream.messages
    assert b"with ESMTPS id" in msg.data.split(b"From: Alice")[0]


def test_plain_session_is_not_marked_tls(make_gateway, upstream, certs):
    gw = make_gateway(listen=[_listener(certs)])
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert b"with ESMTP id" in upstream.messages[0].data


def test_require_starttls_refuses_mail_until_tls(make_gateway, upstream, certs):
    gw = make_gateway(listen=[_listener(certs, require_starttls=True)])
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.ehlo("client.example.net")
        assert client.mail("alice@example.net") == (
            530,
            b"5.7.0 Must issue a STARTTLS command first",
        )
        client.starttls(context=_client_context(certs.ca))
        client.ehlo("client.example.net")
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert len(upstream.messages) == 1


def test_implicit_tls_listener_speaks_tls_from_the_first_byte(make_gateway, upstream, certs):
    gw = make_gateway(listen=[_listener(certs, tls="implicit")])
    context = _client_context(certs.ca)
    with smtplib.SMTP_SSL("127.0.0.1", gw.port, timeout=10, context=context) as client:
        client.ehlo("client.example.net")
        assert not client.has_extn("starttls")
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert b"with ESMTPS id" in upstream.messages[0].data
    # A plaintext client gets no SMTP banner from an implicit-TLS port.
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError, TimeoutError)):
        smtplib.SMTP("127.0.0.1", gw.port, timeout=3)


def test_client_that_distrusts_our_certificate_cannot_complete_starttls(make_gateway, certs):
    gw = make_gateway(listen=[_listener(certs)])
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.ehlo("client.example.net")
        with pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(context=_client_context(certs.other_ca))
    # The gateway keeps serving.
    with gw.client() as client:
        assert client.noop()[0] == 250


def test_bad_certificate_paths_are_policy_errors_with_positions(tmp_path, certs, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "listen:\n"
        "  - address: 127.0.0.1:2525\n"
        "    starttls:\n"
        f"      cert: {tmp_path / 'missing.pem'}\n"
        f"      key: {certs.server_key}\n"
        "  - address: 127.0.0.1:2526\n"
        "    tls: implicit\n"
    )
    assert mailgate(["check", "-c", str(policy)]) == 2
    err = capsys.readouterr().err
    assert (
        f"p.yaml:3:5: listen.0.starttls: cannot read {tmp_path / 'missing.pem'}: No such file"
        in err
    )
    assert "p.yaml:6:5: listen.1: tls: implicit and require_starttls need starttls" in err


def test_certificate_and_key_that_do_not_match_are_refused(tmp_path, certs, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text(f"listen:\n  - starttls: {{cert: {certs.ca}, key: {certs.server_key}}}\n")
    assert mailgate(["check", "-c", str(policy)]) == 2
    assert "listen.0.starttls: cannot use certificate" in capsys.readouterr().err


def test_starttls_in_a_transaction_starts_over(make_gateway, upstream, certs):
    gw = make_gateway(listen=[_listener(certs)])
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.ehlo("client.example.net")
        client.mail("alice@example.net")
        client.rcpt("bob@example.com")
        client.starttls(context=_client_context(certs.ca))
        client.ehlo("client.example.net")
        assert client.docmd("DATA")[0] == 503  # the plaintext transaction is gone
        client.sendmail("alice@example.net", ["carol@example.com"], MESSAGE)
    assert [m.recipients for m in upstream.messages] == [["carol@example.com"]]


def test_a_tls_client_closing_its_side_is_served_without_asyncio_warnings(
    make_gateway, certs, caplog
):
    gw = make_gateway(listen=[_listener(certs, tls="implicit")])
    context = _client_context(certs.ca)
    raw = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        reader = tls.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        tls.sendall(b"NOOP\r\n")
        assert reader.readline().startswith(b"250 ")
        reader.close()
        tls.unwrap()  # TLS close_notify: end of input, as a client's shutdown
    # The gateway keeps serving; asyncio had nothing to warn about.
    with smtplib.SMTP_SSL("127.0.0.1", gw.port, timeout=10, context=context) as client:
        assert client.noop()[0] == 250
    assert not [r for r in caplog.records if "eof_received" in r.getMessage()]
