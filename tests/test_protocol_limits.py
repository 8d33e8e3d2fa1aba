"""Protocol limits over real sockets: command syntax, error budget, connections, timeouts.

Every test speaks raw SMTP to a gateway on 127.0.0.1:0 (``tests.rawsmtp``), so
the bytes on the wire are exactly the test's. Timing tests never assert how
long something took: they use short limits and assert what the client got.
"""

from __future__ import annotations

import select
import time
from pathlib import Path

from mailgate.policy import Policy
from mailgate.yamlsource import load
from tests.rawsmtp import RawClient, wait_for
from tests.support import MESSAGE

EHLO = b"EHLO client.example.net"
MAIL = b"MAIL FROM:<alice@example.net>"
RCPT = b"RCPT TO:<bob@example.com>"


def _readable(c: RawClient) -> bool:
    return bool(select.select([c.sock], [], [], 0)[0])


# ------------------------------------------------------------------ commands


def test_command_line_over_512_octets_gets_500_5_5_2_and_the_session_goes_on(make_gateway):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        assert c.cmd(b"NOOP " + b"x" * 600) == (500, b"5.5.2 Command line too long")
        assert c.cmd(b"NOOP")[0] == 250


def test_mail_keeps_its_extension_allowance_when_another_client_connects(make_gateway, upstream):
    # aiosmtpd keeps command limits in a class-wide dict that each new
    # connection clears; the gateway keeps them per connection.
    gw = make_gateway()
    sender = b"a" * 468 + b"@example.net"
    line = b"MAIL FROM:<" + sender + b"> BODY=8BITMIME SIZE=1000"
    assert 512 < len(line) + 2 <= 512 + 26  # RFC 1870: SIZE adds 26 octets to MAIL
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        with RawClient(gw.port) as other:
            assert other.cmd(EHLO)[0] == 250
            assert c.cmd(line)[0] == 250


def test_unknown_command_gets_500_5_5_1(make_gateway):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        assert c.cmd(b"FOO bar") == (500, b"5.5.1 Command unrecognized")
        assert c.cmd(b"NOOP")[0] == 250


def test_bad_sequence_gets_503_5_5_1(make_gateway, upstream):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        assert c.cmd(MAIL) == (503, b"5.5.1 Send HELO/EHLO first")
        assert c.cmd(EHLO)[0] == 250
        assert c.cmd(RCPT) == (503, b"5.5.1 Need MAIL command")
        assert c.cmd(b"DATA") == (503, b"5.5.1 Need RCPT command")
        assert c.cmd(MAIL)[0] == 250
        assert c.cmd(MAIL) == (503, b"5.5.1 Nested MAIL command")
        assert c.cmd(b"DATA") == (503, b"5.5.1 Need RCPT command")
    assert upstream.messages == []


def test_syntax_errors_carry_enhanced_status_codes(make_gateway):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        assert c.cmd(b"HELO") == (501, b"5.5.4 Syntax: HELO hostname")
        assert c.cmd(EHLO)[0] == 250
        assert c.cmd(b"MAIL TO:<x@example.net>")[1].startswith(b"5.5.4 Syntax: MAIL FROM:")
        assert c.cmd(b"MAIL FROM:<a@example.net> FOO=bar")[0:1] == (555,)
        assert c.cmd(b"EXPN staff") == (502, b"5.5.1 EXPN not implemented")


def test_nul_in_a_command_is_refused(make_gateway, upstream):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        assert c.cmd(b"HELO evil\x00.example") == (501, b"5.5.2 Syntax error: NUL byte in command")
        assert c.cmd(EHLO)[0] == 250
        code, _ = c.cmd(b"MAIL FROM:<al\x00ice@example.net>")
        assert code >= 500
        assert c.cmd(b"NO\x00OP")[0] == 500
    assert upstream.mail_commands == 0


# ------------------------------------------------------------------ error budget


def test_too_many_errors_get_421_and_pipelined_commands_are_not_run(
    make_gateway, upstream, decisions
):
    gw = make_gateway(limits={"errors": 3})
    with RawClient(gw.port) as c:
        c.send(b"\r\n".join([EHLO, RCPT, RCPT, b"DATA", MAIL, RCPT, b""]))
        codes = [code for code, _ in c.replies(5)]
        assert codes[:4] == [250, 503, 503, 503]
        assert codes[4] == 421
        assert c.closed_by_server()
    assert upstream.mail_commands == 0
    assert wait_for(lambda: any('outcome="too many errors"' in line for line in decisions()))


def test_error_budget_reply_names_the_reason(make_gateway):
    gw = make_gateway(limits={"errors": 1})
    with RawClient(gw.port) as c:
        assert c.cmd(b"FOO")[0] == 500
        assert c.reply() == (421, b"4.7.0 mailgate.test Too many errors, closing connection")


def test_five_unrecognized_commands_end_the_session_with_421(make_gateway):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        assert [c.cmd(b"FOO")[0] for _ in range(4)] == [500] * 4
        assert c.cmd(b"FOO") == (421, b"4.7.0 Too many unrecognized commands, closing connection")
        assert c.closed_by_server()


def test_a_delivery_resets_the_error_count(make_gateway, upstream):
    gw = make_gateway(limits={"errors": 3})
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        for _ in range(3):
            assert c.cmd(b"RCPT TO:<x@example.com>")[0] == 503
            assert c.cmd(b"DATA")[0] == 503
            assert c.transaction(MESSAGE)[0] == 250
    assert len(upstream.messages) == 3


def test_junk_commands_past_their_limit_count_as_errors(make_gateway):
    gw = make_gateway(limits={"junk_commands": 2, "errors": 2})
    with RawClient(gw.port) as c:
        assert [c.cmd(b"NOOP")[0] for _ in range(4)] == [250] * 4
        assert c.reply()[0] == 421
        assert c.closed_by_server()


# ------------------------------------------------------------------ connections


def test_connections_over_the_total_limit_get_421_at_connect(make_gateway, decisions):
    gw = make_gateway(limits={"connections": 2})
    first, second = RawClient(gw.port), RawClient(gw.port)
    try:
        assert first.banner is not None and first.banner[0] == 220
        assert second.banner is not None and second.banner[0] == 220
        with RawClient(gw.port) as third:
            assert third.banner == (
                421,
                b"4.7.0 mailgate.test Too many connections, try again later",
            )
            assert third.closed_by_server()
        assert any('outcome="too many connections"' in line for line in decisions())
        first.close()

        def admitted() -> bool:
            with RawClient(gw.port) as again:
                return again.banner is not None and again.banner[0] == 220

        assert wait_for(admitted)
    finally:
        first.close()
        second.close()


def test_connections_per_address_over_the_limit_get_421(make_gateway, decisions):
    gw = make_gateway(limits={"connections_per_ip": 1})
    with RawClient(gw.port) as first:
        assert first.banner is not None and first.banner[0] == 220
        with RawClient(gw.port) as second:
            assert second.banner is not None
            assert second.banner[0] == 421
            assert b"4.7.0 mailgate.test Too many connections from your address" in second.banner[1]
        assert first.cmd(EHLO)[0] == 250
    assert any('outcome="too many connections from client"' in line for line in decisions())


def test_trusted_networks_are_exempt_from_the_per_address_limit(make_gateway):
    gw = make_gateway(limits={"connections_per_ip": 1}, trusted_networks=["127.0.0.0/8"])
    with RawClient(gw.port) as first, RawClient(gw.port) as second:
        assert first.banner is not None and second.banner is not None
        assert (first.banner[0], second.banner[0]) == (220, 220)


# ------------------------------------------------------------------ timeouts


def test_a_client_trickling_a_command_is_cut_off(make_gateway, decisions):
    gw = make_gateway(limits={"idle_timeout": "1s"})
    with RawClient(gw.port) as c:
        sent = 0
        payload = b"NOOP " + b"x" * 400  # 40s at one byte per 100 ms; never a whole line
        for byte in payload:
            if _readable(c):
                break
            c.send(bytes([byte]))
            sent += 1
            time.sleep(0.1)
        assert sent < len(payload), "the gateway let the trickle go on"
        assert c.reply() == (
            421,
            b"4.4.2 mailgate.test Timeout waiting for the client, closing connection",
        )
        assert c.closed_by_server()


def test_data_phase_has_a_deadline(make_gateway, upstream, decisions):
    gw = make_gateway(limits={"data_timeout": "1s", "idle_timeout": "30s"})
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        c.open_data()
        c.send(b"Subject: slow\r\n\r\n")
        for _ in range(400):  # 40s of lines at 100 ms each, well within idle_timeout
            if _readable(c):
                break
            c.send(b"x\r\n")
            time.sleep(0.1)
        assert c.reply() == (421, b"4.4.2 mailgate.test DATA took too long, closing connection")
    assert upstream.messages == []
    assert wait_for(lambda: any("outcome=aborted" in line for line in decisions()))


def test_session_has_a_deadline(make_gateway):
    gw = make_gateway(limits={"session_timeout": "1s", "idle_timeout": "30s"})
    with RawClient(gw.port) as c:
        for _ in range(400):
            code, text = c.cmd(b"NOOP")
            if code != 250:
                break
            time.sleep(0.1)
        assert (code, text) == (
            421,
            b"4.4.2 mailgate.test Session time limit reached, closing connection",
        )


def test_no_timeout_cancels_an_upstream_commit(make_gateway, upstream, decisions):
    # aiosmtpd's own idle timer runs while the handler works and cancels it;
    # here every client timer is far shorter than the upstream's reply.
    upstream.behaviour.data_delay = 2.0
    gw = make_gateway(limits={"idle_timeout": "300ms", "data_timeout": "300ms"})
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        code, text = c.transaction(MESSAGE)
        assert code == 250, text
        assert c.cmd(b"QUIT")[0] == 221
    assert len(upstream.messages) == 1
    assert any("outcome=delivered" in line for line in decisions())


def test_commands_after_a_slow_commit_still_get_a_fresh_wait(make_gateway, upstream):
    upstream.behaviour.data_delay = 1.0
    gw = make_gateway(limits={"idle_timeout": "500ms"})
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        assert c.transaction(MESSAGE)[0] == 250
        assert c.cmd(b"NOOP")[0] == 250  # sent at once: within the renewed idle timeout
        assert c.reply()[0] == 421  # then silence is cut off


# ------------------------------------------------------------------ early talker


def test_a_client_that_talks_before_the_greeting_is_refused(make_gateway, upstream, decisions):
    gw = make_gateway(protocol={"greet_delay": "500ms"})
    with RawClient(gw.port, banner=False) as c:
        c.send(EHLO + b"\r\n" + MAIL + b"\r\n")
        code, text = c.reply()
        assert code == 554
        assert text.endswith(b"5.5.1 mailgate.test Protocol error: you talked before the greeting")
        assert text.startswith(b"mailgate.test ESMTP")  # the 220- first line came first
        assert c.closed_by_server()
    assert upstream.mail_commands == 0
    assert wait_for(lambda: any('outcome="early talker"' in line for line in decisions()))
    assert any("protocol.early_talker:reject" in line for line in decisions())


def test_a_patient_client_gets_a_two_line_greeting(make_gateway):
    gw = make_gateway(protocol={"greet_delay": "300ms"})
    with RawClient(gw.port) as c:
        assert c.banner == (220, b"mailgate.test ESMTP mailgate\nmailgate.test ESMTP mailgate")
        assert c.cmd(EHLO)[0] == 250


def test_early_talker_in_monitor_mode_is_only_logged(make_gateway, decisions):
    gw = make_gateway(protocol={"greet_delay": "300ms", "early_talker": "monitor"})
    with RawClient(gw.port, banner=False) as c:
        c.send(EHLO + b"\r\n")
        assert c.reply()[0] == 220
        assert c.reply()[0] == 250
    assert any("protocol.early_talker:reject(monitor)" in line for line in decisions())


def test_early_talker_off_may_be_written_unquoted():
    policy = Policy.model_validate(load("protocol: {early_talker: off}\n", "p.yaml").data)
    assert policy.protocol.early_talker == "off"


def test_trusted_clients_may_talk_early(make_gateway):
    gw = make_gateway(protocol={"greet_delay": "300ms"}, trusted_networks=["127.0.0.1/32"])
    with RawClient(gw.port, banner=False) as c:
        c.send(EHLO + b"\r\n")
        assert c.reply() == (220, b"mailgate.test ESMTP mailgate")
        assert c.reply()[0] == 250


# ------------------------------------------------------------------ pipelining


def test_pipelining_is_advertised_and_replies_come_in_order(make_gateway, upstream):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        code, text = c.cmd(EHLO)
        assert code == 250 and b"\nPIPELINING\n" in text
        c.send(MAIL + b"\r\n" + RCPT + b"\r\nRCPT TO:<victim@elsewhere.org>\r\nDATA\r\n")
        assert [code for code, _ in c.replies(4)] == [250, 250, 554, 354]
        c.send(MESSAGE + b".\r\nQUIT\r\n")
        assert c.reply()[0] == 250
        assert c.reply()[0] == 221
    [msg] = upstream.messages
    assert msg.recipients == ["bob@example.com"]


# ------------------------------------------------------------------ long lines


def _maildir_messages(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((folder / "new").glob("*"))]


def test_long_body_lines_up_to_the_limit_are_relayed_intact(make_gateway, tmp_path):
    mail = tmp_path / "mail"
    gw = make_gateway(upstream=f"maildir:{mail}")
    line = b"<p>" + b"x" * 5000 + b"</p>\r\n"
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        assert c.transaction(MESSAGE + line)[0] == 250
    [stored] = _maildir_messages(mail)
    assert stored.endswith(line)


def test_a_line_over_the_limit_refuses_the_message_and_the_session_goes_on(make_gateway, upstream):
    gw = make_gateway(limits={"line_length": 2000})
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        assert c.transaction(MESSAGE + b"y" * 3000 + b"\r\n") == (500, b"5.5.2 Line too long")
        assert c.transaction(MESSAGE)[0] == 250
    assert len(upstream.messages) == 1
