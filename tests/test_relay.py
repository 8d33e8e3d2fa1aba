"""In-line relay over real SMTP: lockstep replies, one upstream transaction, faults never 250."""

from __future__ import annotations

import smtplib
import socket
import time

import pytest

from tests.support import MESSAGE, RecordingUpstream


def test_relays_bytes_unchanged_apart_from_added_headers(make_gateway, upstream, decisions):
    gw = make_gateway()
    with gw.client() as client:
        refused = client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert refused == {}
    [msg] = upstream.messages
    assert msg.sender == "alice@example.net"
    assert msg.recipients == ["bob@example.com"]
    head, _, rest = msg.data.partition(b"From: Alice")
    assert head.startswith(b"Received: from client.example.net ([127.0.0.1])\r\n\tby mailgate.test")
    assert b"from client.example.net ([127.0.0.1])" in head
    assert b"From: Alice" + rest == MESSAGE
    [line] = decisions()
    assert "outcome=delivered" in line
    assert "from=<alice@example.net>" in line and "rcpts=<bob@example.com>" in line
    assert 'upstream="250 2.0.0 Ok: queued as 1"' in line


def test_three_recipients_make_one_upstream_transaction(make_gateway, upstream):
    gw = make_gateway()
    rcpts = ["a@example.com", "b@example.com", "c@example.com"]
    with gw.client() as client:
        client.sendmail("alice@example.net", rcpts, MESSAGE)
    assert upstream.mail_commands == 1
    [msg] = upstream.messages
    assert msg.recipients == rcpts


def test_five_messages_on_one_connection_reuse_the_upstream_connection(make_gateway, upstream):
    gw = make_gateway()
    with gw.client() as client:
        for i in range(5):
            client.sendmail("alice@example.net", [f"u{i}@example.com"], MESSAGE)
    assert len(upstream.messages) == 5
    assert [m.recipients for m in upstream.messages] == [[f"u{i}@example.com"] for i in range(5)]
    assert upstream.connections == 1


def test_upstream_refusal_of_one_recipient_reaches_the_client_at_rcpt(
    make_gateway, upstream, decisions
):
    upstream.behaviour.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user"
    gw = make_gateway()
    with gw.client() as client:
        client.mail("alice@example.net")
        assert client.rcpt("bob@example.com")[0] == 250
        code, text = client.rcpt("nobody@example.com")
        assert (code, text) == (550, b"5.1.1 No such user")
        code, _ = client.data(MESSAGE)
        assert code == 250
    [msg] = upstream.messages
    assert msg.recipients == ["bob@example.com"]
    assert "rejected_rcpts=<nobody@example.com>:550" in decisions()[0]


def test_open_relay_is_denied_and_nothing_goes_upstream(make_gateway, upstream):
    gw = make_gateway()
    with gw.client() as client:
        client.mail("alice@example.net")
        code, text = client.rcpt("victim@elsewhere.org")
        assert code == 554
        assert text.startswith(b"5.7.1 ")
        assert client.docmd("DATA")[0] == 503
    assert upstream.messages == []


def test_trusted_network_may_relay_anywhere(make_gateway, upstream):
    gw = make_gateway(trusted_networks=["127.0.0.0/8"])
    with gw.client() as client:
        client.sendmail("alice@example.com", ["friend@elsewhere.org"], MESSAGE)
    assert upstream.messages[0].recipients == ["friend@elsewhere.org"]


def test_upstream_data_reject_is_relayed_as_is(make_gateway, upstream):
    upstream.behaviour.data_reply = "554 5.7.1 Content refused upstream"
    gw = make_gateway()
    with gw.client() as client, pytest.raises(smtplib.SMTPDataError) as err:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert err.value.smtp_code == 554
    assert err.value.smtp_error == b"5.7.1 Content refused upstream"


def test_upstream_refusing_the_data_command_gets_its_transaction_reset(make_gateway, upstream):
    upstream.behaviour.data_command_reply = "451 4.3.0 Try again later"
    gw = make_gateway()
    with gw.client() as client:
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
        assert err.value.smtp_code == 451
        upstream.behaviour.data_command_reply = None
        # The pooled connection was RSET, not left in its transaction (503 nested MAIL).
        client.sendmail("alice@example.net", ["carol@example.com"], MESSAGE)
    assert [m.recipients for m in upstream.messages] == [["carol@example.com"]]
    assert upstream.rsets >= 1 and upstream.connections == 1


def test_upstream_tempfail_at_mail_is_relayed(make_gateway, upstream):
    upstream.behaviour.mail_reply = "451 4.3.0 Try again later"
    gw = make_gateway()
    with gw.client() as client:
        code, _ = client.mail("alice@example.net")
        assert code == 451
        # The session goes on: a later transaction works once the upstream does.
        upstream.behaviour.mail_reply = None
        client.rset()
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert len(upstream.messages) == 1


def test_upstream_down_gives_4xx_at_mail(make_gateway, upstream):
    gw = make_gateway()
    upstream.stop()
    with gw.client() as client:
        code, text = client.mail("alice@example.net")
    assert code == 451
    assert text.startswith(b"4.4.1")


def test_slow_upstream_gives_4xx_not_250(make_gateway, upstream, decisions):
    upstream.behaviour.data_delay = 3
    gw = make_gateway(upstream={"url": upstream.url, "timeout": "1s"})
    with gw.client() as client:
        client.mail("alice@example.net")
        client.rcpt("bob@example.com")
        code, text = client.data(MESSAGE)
    assert code == 451
    assert text.startswith(b"4.4.2")
    assert "outcome=tempfailed stage=data" in decisions()[-1]


def test_upstream_dropping_the_connection_mid_data_gives_4xx(make_gateway, upstream):
    upstream.behaviour.drop_at_data = True
    gw = make_gateway()
    with gw.client() as client:
        client.mail("alice@example.net")
        client.rcpt("bob@example.com")
        code, _ = client.data(MESSAGE)
        assert code == 451
        # A broken upstream connection is never reused: the next message opens a new one.
        upstream.behaviour.drop_at_data = False
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert len(upstream.messages) == 1
    assert upstream.connections == 2


def test_client_disconnect_mid_transaction_closes_the_upstream_connection(
    make_gateway, upstream: RecordingUpstream, decisions
):
    gw = make_gateway()
    client = gw.client()
    client.mail("alice@example.net")
    client.rcpt("bob@example.com")
    client.close()
    deadline = time.monotonic() + 5
    while not decisions() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "outcome=aborted stage=disconnect" in decisions()[0]
    with gw.client() as again:
        again.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert upstream.connections == 2
    assert len(upstream.messages) == 1


def test_rset_resets_upstream_and_keeps_the_connection(make_gateway, upstream):
    gw = make_gateway()
    with gw.client() as client:
        client.mail("alice@example.net")
        client.rcpt("bob@example.com")
        assert client.rset()[0] == 250
        client.sendmail("alice@example.net", ["carol@example.com"], MESSAGE)
    assert upstream.rsets >= 1
    assert upstream.connections == 1
    assert upstream.messages[0].recipients == ["carol@example.com"]


def test_message_size_limit(make_gateway, upstream):
    gw = make_gateway(limits={"message_size": "1KB"})
    with gw.client() as client:
        assert "size" in client.esmtp_features
        assert client.esmtp_features["size"] == "1000"
        client.mail("alice@example.net")
        client.rcpt("bob@example.com")
        code, text = client.data(MESSAGE + b"0123456789\r\n" * 100)
        assert (code, text) == (552, b"5.3.4 Message too big")
        # After the refusal the session still works.
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert len(upstream.messages) == 1


def test_recipient_limit(make_gateway, upstream):
    gw = make_gateway(limits={"recipients": 2})
    with gw.client() as client:
        client.mail("alice@example.net")
        assert client.rcpt("a@example.com")[0] == 250
        assert client.rcpt("b@example.com")[0] == 250
        assert client.rcpt("c@example.com") == (452, b"4.5.3 Too many recipients")
        assert client.data(MESSAGE)[0] == 250
    assert upstream.messages[0].recipients == ["a@example.com", "b@example.com"]


def test_bare_cr_in_helo_cannot_inject_a_header(make_gateway, upstream):
    gw = make_gateway()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        sock.sendall(b"HELO evil.test\rX-Injected: yes\r\n")
        assert reader.readline().startswith(b"501 5.5.2 Syntax error: control character")
        sock.sendall(b"HELO evil.test\r\n")
        assert reader.readline().startswith(b"250")
        for command, code in (
            (b"MAIL FROM:<alice@example.net>", b"250"),
            (b"RCPT TO:<bob@example.com>", b"250"),
            (b"DATA", b"354"),
        ):
            sock.sendall(command + b"\r\n")
            assert reader.readline()[:3] == code
        sock.sendall(MESSAGE + b".\r\n")
        assert reader.readline()[:3] == b"250"
    header = upstream.messages[0].data.split(b"\r\n\r\n")[0]
    assert b"X-Injected" not in header
    assert b"from evil.test ([127.0.0.1])" in header
