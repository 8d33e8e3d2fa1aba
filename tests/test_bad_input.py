"""Bad input over real SMTP (issue 13): no traceback, no lost mail, no state drift.

Every test speaks byte-exact SMTP (``tests.rawsmtp``) to a gateway on
127.0.0.1:0. Plugins that break the hook contract are in ``tests.bad_plugins``;
an upstream that sends malformed replies is ``tests.upstreams.ScriptedUpstream``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import pytest

from mailgate import Action, Verdict
from mailgate.stages import bad_result
from mailgate.verdict import VerdictError
from tests.rawsmtp import RawClient, send_message, wait_for
from tests.support import MESSAGE, LoopThread
from tests.upstreams import ScriptedUpstream

EHLO = b"EHLO client.example.net"
MAIL = b"MAIL FROM:<alice@example.net>"
RCPT = b"RCPT TO:<bob@example.com>"


def _internal_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "internal error" in r.getMessage()]


# ------------------------------------------------------------------ 1, 4: verdicts


@pytest.mark.parametrize(
    ("action", "code", "status"),
    [
        (Action.TEMPFAIL, 250, "2.0.0"),
        (Action.REJECT, 450, "4.7.1"),
        (Action.REJECT, 250, ""),
        (Action.TEMPFAIL, 550, "5.7.1"),
        (Action.REJECT, 550, "4.7.1"),
        (Action.ACCEPT, 250, "2.0.0"),
        (Action.TAG, 550, "5.7.1"),
    ],
)
def test_a_verdict_whose_code_contradicts_its_action_cannot_be_built(action, code, status):
    with pytest.raises(VerdictError):
        Verdict(action, "x.y", "r", code, status, "text")


@pytest.mark.parametrize("score", [math.nan, math.inf, -math.inf])
def test_a_verdict_with_a_score_that_is_not_finite_cannot_be_built(score):
    with pytest.raises(ValueError, match="finite"):
        Verdict.tag("x.y", "r", score=score)


def test_sound_verdicts_pass_the_result_check():
    for verdict in (
        Verdict.reject("a.b", "r", code=554, status="5.7.1"),
        Verdict.tempfail("a.b", "r", code=421, status="4.3.0"),
        Verdict.accept("a.b", "r"),
        Verdict.tag("a.b", "r", score=-2.5, headers={"X-A": "b"}),
    ):
        assert bad_result(verdict) is None
    assert bad_result("250 ok") == "returned str, not a Verdict or None"


@pytest.mark.parametrize(
    ("kind", "stage"),
    [
        ("contradiction", "on_rcpt"),
        ("contradiction", "on_mail"),
        ("positive_reject", "on_rcpt"),
        ("wrong_type", "on_rcpt"),
        ("nan", "on_rcpt"),
        ("inf", "on_data"),
        ("contradiction", "on_data"),
        ("wrong_type", "on_data"),
    ],
)
def test_a_bad_hook_result_fails_closed_and_is_recorded_as_plugin_bad_result(
    make_gateway, upstream, caplog, decisions, kind, stage
):
    gw = make_gateway(
        plugins={"buggy": {"module": "tests.bad_plugins:BadResult", "kind": kind, "stage": stage}}
    )
    caplog.set_level(logging.INFO, logger="mailgate")
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        if stage == "on_mail":
            assert c.cmd(MAIL) == (451, b"4.3.0 Temporary filter failure, try again later")
        else:
            assert c.cmd(MAIL)[0] == 250
            if stage == "on_rcpt":
                assert c.cmd(RCPT) == (451, b"4.3.0 Temporary filter failure, try again later")
                assert c.cmd(b"DATA")[0] == 503  # the recipient was not taken
            else:
                assert c.cmd(RCPT)[0] == 250
                assert c.cmd(b"DATA")[0] == 354
                c.send(MESSAGE + b".\r\n")
                assert c.reply() == (451, b"4.3.0 Temporary filter failure, try again later")
        assert c.cmd(b"QUIT")[0] == 221
    assert upstream.messages == []
    errors = [r for r in caplog.records if r.name == "mailgate.plugins"]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert f"plugin=buggy hook={stage} bad result" in errors[0].getMessage()
    assert wait_for(lambda: any("buggy.bad_result:tempfail" in line for line in decisions()))
    assert "Traceback" not in caplog.text


def test_a_verdict_built_with_a_contradiction_is_a_plugin_error(
    make_gateway, upstream, caplog, decisions
):
    # The probe: Verdict(Action.TEMPFAIL, ..., 250, "2.0.0", "Ok: queued").
    gw = make_gateway(
        plugins={"buggy": {"module": "tests.bad_plugins:BadResult", "kind": "constructor"}}
    )
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        assert c.cmd(MAIL)[0] == 250
        assert c.cmd(RCPT) == (451, b"4.3.0 Temporary filter failure, try again later")
        assert c.cmd(b"QUIT")[0] == 221
    assert upstream.messages == []
    [error] = [r for r in caplog.records if r.name == "mailgate.plugins"]
    assert "plugin=buggy hook=on_rcpt bad result: contradictory verdict" in error.getMessage()
    assert "a tempfail needs a 4xx code, not 250" in error.getMessage()
    assert error.exc_info is None  # a plugin's mistake, said in one line: no traceback
    assert wait_for(lambda: any("buggy.bad_result:tempfail" in line for line in decisions()))


def test_a_bad_result_in_monitor_mode_is_recorded_and_changes_nothing(
    make_gateway, upstream, decisions
):
    gw = make_gateway(
        plugins={
            "buggy": {
                "module": "tests.bad_plugins:BadResult",
                "kind": "contradiction",
                "mode": "monitor",
            }
        }
    )
    assert send_message(gw.port, MESSAGE)[0] == 250
    assert len(upstream.messages) == 1
    assert wait_for(lambda: any("buggy.bad_result:tempfail(monitor)" in x for x in decisions()))


# ------------------------------------------------------------------ 2: 8-bit addresses


def test_non_ascii_sender_without_smtputf8_gets_553_5_6_7_and_opens_no_upstream(
    make_gateway, upstream, caplog
):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        code, text = c.cmd("MAIL FROM:<é@example.net>".encode())
        assert (code, text[:5]) == (553, b"5.6.7")
        code, text = c.cmd(b"MAIL FROM:<\xff@example.net> SMTPUTF8")
        assert (code, text[:5]) == (553, b"5.6.7")
        code, text = c.cmd(b"MAIL FROM:<\xc3@example.net>")  # a truncated UTF-8 sequence
        assert (code, text[:5]) == (553, b"5.6.7")
        assert upstream.connections == 0
        # The state is consistent: the next MAIL is not "nested".
        assert c.transaction(MESSAGE)[0] == 250
    assert len(upstream.messages) == 1
    assert _internal_errors(caplog) == []


def test_non_ascii_recipient_without_smtputf8_gets_553_and_the_rest_are_delivered(
    make_gateway, upstream, caplog
):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        assert c.cmd(MAIL)[0] == 250
        code, text = c.cmd("RCPT TO:<bøb@example.com>".encode())
        assert (code, text[:5]) == (553, b"5.6.7")
        code, text = c.cmd(b"RCPT TO:<\xff@example.com>")
        assert (code, text[:5]) == (553, b"5.6.7")
        code, _ = c.cmd(b"MAIL FROM:<alice@example.net>")
        assert code == 503  # the transaction is still open: a nested MAIL, correctly
        assert c.cmd(RCPT)[0] == 250
        assert c.cmd(b"DATA")[0] == 354
        c.send(MESSAGE + b".\r\n")
        assert c.reply()[0] == 250
    [message] = upstream.messages
    assert message.recipients == ["bob@example.com"]
    assert _internal_errors(caplog) == []


def test_invalid_utf8_recipient_with_smtputf8_gets_553(scripted, make_gateway, caplog):
    gw = make_gateway(upstream=scripted.url)
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        assert c.cmd("MAIL FROM:<élise@example.net> SMTPUTF8".encode())[0] == 250
        code, text = c.cmd(b"RCPT TO:<b\xffb@example.com>")
        assert (code, text[:5]) == (553, b"5.6.7")
        assert c.cmd("RCPT TO:<bøb@example.com>".encode())[0] == 250
        assert c.cmd(b"DATA")[0] == 354
        c.send(MESSAGE + b".\r\n")
        assert c.reply()[0] == 250
    assert "MAIL FROM:<élise@example.net> SMTPUTF8".encode() in scripted.commands
    assert "RCPT TO:<bøb@example.com>".encode() in scripted.commands
    assert not any(b"\xff" in line for line in scripted.commands)
    assert _internal_errors(caplog) == []


def test_non_ascii_digits_in_size_are_a_syntax_error(make_gateway):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        assert c.cmd("MAIL FROM:<alice@example.net> SIZE=١٢٣".encode())[0] == 501


# ------------------------------------------------------------------ 3: recipient overshoot


def test_pipelined_recipients_past_the_limit_get_452_and_data_goes_ahead(
    make_gateway, upstream, decisions
):
    gw = make_gateway(limits={"recipients": 100, "errors": 20})
    rcpts = [f"RCPT TO:<user{i}@example.com>".encode() for i in range(130)]
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        c.send(b"\r\n".join([MAIL, *rcpts, b"DATA", b""]))
        replies = c.replies(1 + 130 + 1)
        codes = [code for code, _ in replies]
        assert codes[0] == 250
        assert codes[1:101] == [250] * 100
        assert replies[101:131] == [(452, b"4.5.3 Too many recipients")] * 30
        assert codes[131] == 354
        c.send(MESSAGE + b".\r\n")
        assert c.reply()[0] == 250
        assert c.cmd(b"QUIT")[0] == 221
    [message] = upstream.messages
    assert message.recipients == [f"user{i}@example.com" for i in range(100)]


def test_recipients_past_the_overshoot_bound_count_as_errors(make_gateway, upstream):
    gw = make_gateway(limits={"recipients": 2, "recipient_overshoot": 3, "errors": 2})
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        assert c.cmd(MAIL)[0] == 250
        for i in range(2):
            assert c.cmd(f"RCPT TO:<u{i}@example.com>".encode())[0] == 250
        for i in range(3):  # the overshoot: 452, no error counted
            assert c.cmd(f"RCPT TO:<o{i}@example.com>".encode())[0] == 452
        assert c.cmd(b"RCPT TO:<x1@example.com>")[0] == 452  # error 1
        assert c.cmd(b"RCPT TO:<x2@example.com>")[0] == 452  # error 2: the budget is spent
        assert c.reply()[0] == 421
        assert c.closed_by_server()
    assert upstream.messages == []


# ------------------------------------------------------------------ 5: malformed upstream replies


@pytest.fixture
def scripted(loop_thread: LoopThread) -> Iterator[ScriptedUpstream]:
    """A scripted upstream on 127.0.0.1:0."""
    upstream = ScriptedUpstream(loop_thread)
    yield upstream
    upstream.close()


@pytest.mark.parametrize(
    "bad",
    [
        b"2500 ok",
        b"25 ok",
        b"250ok",
        b"650 what",
        b"+50 ok",
        b"250-first\r\n251 second",
        b"hello",
    ],
)
def test_a_malformed_upstream_reply_is_a_4xx_and_the_upstream_connection_is_closed(
    scripted, make_gateway, caplog, bad
):
    scripted.data_reply = bad
    gw = make_gateway(upstream=scripted.url)
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        reply = c.transaction(MESSAGE)
        assert reply == (451, b"4.4.2 Upstream sent a malformed reply, try again later")
        assert wait_for(lambda: scripted.closed == 1)  # never reused
        # The session goes on; the next message gets a new upstream connection.
        scripted.data_reply = b"250 2.0.0 Ok: queued"
        assert c.transaction(MESSAGE) == (250, b"2.0.0 Ok: queued")
    assert scripted.connections == 2
    assert "malformed reply line" in caplog.text
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize(
    ("good", "relayed"),
    [
        (b"250-2.0.0 first\r\n250 2.0.0 second", (250, b"2.0.0 first\n2.0.0 second")),
        (b"250", (250, b"")),  # a reply code alone is a whole reply (RFC 5321 §4.2)
        (b"250-\r\n250 done", (250, b"done")),
        (b"554 5.7.1 no \xff thanks", (554, b"5.7.1 no \xff thanks")),
    ],
)
def test_well_formed_upstream_replies_are_relayed(scripted, make_gateway, good, relayed):
    scripted.data_reply = good
    gw = make_gateway(upstream=scripted.url)
    assert send_message(gw.port, MESSAGE) == relayed


# ------------------------------------------------------------------ DATA size (RFC 1870)


def _dotted(size: int) -> bytes:
    """A message of ``size`` octets whose body lines all start with a dot (stuffed on the wire)."""
    head = b"Subject: dots\r\n\r\n"
    lines, last = divmod(size - len(head) - 2, 11)
    message = head + b".dotdotdo\r\n" * lines + b"z" * last + b"\r\n"
    assert len(message) == size
    return message


def _stuffed(message: bytes) -> bytes:
    return message.replace(b"\r\n.", b"\r\n..")


def test_the_size_limit_counts_the_message_not_the_doubled_dots(make_gateway, upstream):
    limit = 3000
    gw = make_gateway(limits={"message_size": limit})
    fits, over = _dotted(limit), _dotted(limit + 1)
    assert len(_stuffed(fits)) > limit * 1.05
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        for message, expected in ((fits, 250), (over, 552), (fits, 250)):
            assert c.transaction(_stuffed(message))[0] == expected
    assert len(upstream.messages) == 2
    assert upstream.messages[0].data.endswith(fits)


def test_an_upstream_timeout_closes_the_upstream_not_the_client_and_may_duplicate(
    scripted, make_gateway
):
    # docs/delivery.md (RFC 1047): the upstream took the message, answered late;
    # the client gets a 4xx, keeps its session, and its retry is a duplicate.
    scripted.data_delay = 1.0
    gw = make_gateway(upstream={"url": scripted.url, "timeout": "0.3s"})
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        assert c.cmd(MAIL)[0] == 250
        assert c.cmd(RCPT)[0] == 250
        assert c.cmd(b"DATA")[0] == 354
        c.send(MESSAGE + b".\r\n")
        assert c.reply() == (451, b"4.4.2 Upstream server timed out, try again later")
        assert wait_for(lambda: scripted.closed == 1)  # the upstream connection is closed
        assert c.cmd(b"NOOP")[0] == 250  # the client's is not
        scripted.data_delay = 0.0
        assert c.cmd(MAIL)[0] == 250
        assert c.cmd(RCPT)[0] == 250
        assert c.cmd(b"DATA")[0] == 354
        c.send(MESSAGE + b".\r\n")
        assert c.reply()[0] == 250
    assert len(scripted.messages) == 2  # the same message, twice


def test_after_an_internal_error_the_next_mail_is_not_nested(make_gateway, upstream, monkeypatch):
    # Our own bug at RCPT: the session drops the transaction, and so must the server
    # (it used to keep "MAIL given", so the next MAIL got 503 Nested MAIL until RSET).
    from mailgate.relay import SmtpTransaction

    original = SmtpTransaction.rcpt
    failures = [RuntimeError("a bug")]

    async def rcpt_once_broken(self: SmtpTransaction, recipient: str):  # type: ignore[no-untyped-def]
        if failures:
            raise failures.pop()
        return await original(self, recipient)

    monkeypatch.setattr(SmtpTransaction, "rcpt", rcpt_once_broken)
    gw = make_gateway()
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        assert c.cmd(MAIL)[0] == 250
        assert c.cmd(RCPT) == (451, b"4.3.0 Internal error, try again later")
        assert c.cmd(b"DATA")[0] == 503  # no transaction is open...
        assert c.cmd(MAIL)[0] == 250  # ...so this MAIL starts one
        assert c.cmd(RCPT)[0] == 250
        assert c.cmd(b"DATA")[0] == 354
        c.send(MESSAGE + b".\r\n")
        assert c.reply()[0] == 250
    assert len(upstream.messages) == 1
