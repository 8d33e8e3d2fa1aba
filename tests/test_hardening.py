"""Bad input that used to break a promise: each case over real SMTP or the real CLI.

1. MAIL parameters go upstream only if its EHLO offered them (SMTPUTF8, BODY=);
   what really needs them is refused with 553/554 5.6.x instead.
2. An 8-bit HELO/EHLO name is refused (501 5.5.2), never written into Received.
3. ``mailgate run`` on an address in use: one line naming it, exit 1.
4. An upstream connect cancelled by our own budget closes the socket and marks
   the server down.
5. Metrics count only what the upstream said; spooled/held mail has its own outcome.
6. ``headers``/``helo`` rules can ``quarantine``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from mailgate.testing import LoopThread, RecordingUpstream, _RecordingHandler, write_policy
from tests.ops_support import mailgate, sample, scrape, wait_until
from tests.rawsmtp import RawClient
from tests.support import MESSAGE
from tests.tcpserver import LoopbackTcpServer
from tests.upstreams import ScriptedUpstream, _CountingSMTP

EHLO = b"EHLO client.example.net"
RCPT = b"RCPT TO:<bob@example.com>"
UTF8_HEADERS = MESSAGE.replace(b"Subject: hello", "Subject: caf\u00e9".encode())
EIGHT_BIT_BODY = MESSAGE.replace(b"Hello Bob.", "Gr\u00fc\u00dfe, Bob.".encode())


def deliver(port: int, mail: bytes, message: bytes = MESSAGE) -> list[tuple[int, bytes]]:
    """MAIL (as given), one RCPT, DATA and the message: the replies, stopping at a refusal."""
    replies: list[tuple[int, bytes]] = []
    with RawClient(port) as c:
        assert c.cmd(EHLO)[0] == 250
        for line in (mail, RCPT, b"DATA"):
            replies.append(c.cmd(line))
            if replies[-1][0] >= 400:
                return replies
        c.send(message + b".\r\n")
        replies.append(c.reply())
        c.cmd(b"QUIT")
    return replies


# ------------------------------------------------------------------ 1: MAIL parameters


class _PlainHandler(_RecordingHandler):
    """Records each MAIL's parameters; offers 8BITMIME only if the upstream says so."""

    def __init__(self, upstream: PlainUpstream) -> None:
        super().__init__(upstream)
        self.plain = upstream

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.plain.offer_8bitmime:
            return responses
        return [line for line in responses if line[4:] != "8BITMIME"]

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.plain.mail_options.append(list(options))
        return await super().handle_MAIL(server, session, envelope, address, options)


class PlainUpstream(RecordingUpstream):
    """aiosmtpd without SMTPUTF8 (its default) and, if asked, without 8BITMIME."""

    def __init__(self, loop_thread: LoopThread, *, offer_8bitmime: bool = True) -> None:
        self.offer_8bitmime = offer_8bitmime
        self.mail_options: list[list[str]] = []
        super().__init__(loop_thread)

    def protocol(self, loop: asyncio.AbstractEventLoop) -> SMTP:
        """An aiosmtpd server that refuses SMTPUTF8 as a MAIL parameter (501)."""
        return _CountingSMTP(self, _PlainHandler(self), loop=loop)


@pytest.fixture
def plain(loop_thread: LoopThread) -> Iterator[PlainUpstream]:
    up = PlainUpstream(loop_thread)
    yield up
    up.close()


@pytest.fixture
def seven_bit(loop_thread: LoopThread) -> Iterator[PlainUpstream]:
    up = PlainUpstream(loop_thread, offer_8bitmime=False)
    yield up
    up.close()


def test_ascii_mail_with_smtputf8_reaches_an_upstream_without_smtputf8(make_gateway, plain):
    gw = make_gateway(upstream=plain.url)
    replies = deliver(gw.port, b"MAIL FROM:<alice@example.net> SMTPUTF8 BODY=8BITMIME")
    assert [code for code, _ in replies] == [250, 250, 354, 250]
    assert len(plain.messages) == 1
    assert plain.mail_options == [["BODY=8BITMIME"]]  # SMTPUTF8 dropped, BODY kept


def test_smtputf8_alone_becomes_body_8bitmime_for_an_upstream_with_8bitmime(make_gateway, plain):
    gw = make_gateway(upstream=plain.url)
    replies = deliver(gw.port, b"MAIL FROM:<alice@example.net> SMTPUTF8", EIGHT_BIT_BODY)
    assert replies[-1][0] == 250
    assert plain.mail_options == [["BODY=8BITMIME"]]
    assert "Grüße".encode() in plain.messages[0].data


def test_a_non_ascii_sender_is_refused_553_5_6_7_when_the_upstream_lacks_smtputf8(
    make_gateway, plain
):
    gw = make_gateway(upstream=plain.url)
    [(code, text)] = deliver(gw.port, "MAIL FROM:<élise@example.net> SMTPUTF8".encode())
    assert (code, text[:5]) == (553, b"5.6.7")
    assert b"SMTPUTF8" in text
    assert plain.mail_commands == 0
    # The pooled connection is clean: the next transaction uses it.
    assert deliver(gw.port, b"MAIL FROM:<alice@example.net>")[-1][0] == 250
    assert plain.connections == 1


def test_a_non_ascii_recipient_is_refused_and_the_others_delivered(make_gateway, plain):
    gw = make_gateway(upstream=plain.url)
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        assert c.cmd(b"MAIL FROM:<alice@example.net> SMTPUTF8")[0] == 250
        code, text = c.cmd("RCPT TO:<bøb@example.com>".encode())
        assert (code, text[:5]) == (553, b"5.6.7")
        assert c.cmd(RCPT)[0] == 250
        assert c.cmd(b"DATA")[0] == 354
        c.send(MESSAGE + b".\r\n")
        assert c.reply()[0] == 250
    [message] = plain.messages
    assert message.recipients == ["bob@example.com"]


def test_non_ascii_headers_are_refused_554_5_6_7_when_the_upstream_lacks_smtputf8(
    make_gateway, plain
):
    gw = make_gateway(upstream=plain.url)
    replies = deliver(gw.port, b"MAIL FROM:<alice@example.net> SMTPUTF8", UTF8_HEADERS)
    code, text = replies[-1]
    assert (code, text[:5]) == (554, b"5.6.7")
    assert plain.messages == []
    assert plain.rsets >= 1  # the upstream transaction was reset, not left open


def test_smtputf8_goes_to_an_upstream_that_offers_it(make_gateway, loop_thread):
    scripted = ScriptedUpstream(loop_thread)
    try:
        gw = make_gateway(upstream=f"smtp://127.0.0.1:{scripted.port}")
        mail = "MAIL FROM:<élise@example.net> SMTPUTF8 BODY=8BITMIME".encode()
        assert deliver(gw.port, mail, UTF8_HEADERS)[-1][0] == 250
        assert mail in scripted.commands
    finally:
        scripted.close()


def test_8bit_data_declared_8bitmime_is_refused_554_5_6_3_without_8bitmime(make_gateway, seven_bit):
    gw = make_gateway(upstream=seven_bit.url)
    ok = deliver(gw.port, b"MAIL FROM:<alice@example.net> BODY=8BITMIME")
    assert ok[-1][0] == 250
    assert seven_bit.mail_options == [[]]  # no BODY= to a server without 8BITMIME
    refused = deliver(gw.port, b"MAIL FROM:<alice@example.net> BODY=8BITMIME", EIGHT_BIT_BODY)
    assert (refused[-1][0], refused[-1][1][:5]) == (554, b"5.6.3")
    assert len(seven_bit.messages) == 1


def test_the_queue_delivers_ascii_smtputf8_mail_to_an_upstream_without_it(
    make_gateway, plain, tmp_path
):
    queue = {"directory": str(tmp_path / "spool"), "handoff_timeout": 0, "retry_min": "1s"}
    gw = make_gateway(upstream=plain.url, delivery="queue", queue=queue)
    replies = deliver(gw.port, b"MAIL FROM:<alice@example.net> SMTPUTF8")
    assert replies[-1][0] == 250 and b"queued as" in replies[-1][1]
    assert wait_until(lambda: len(plain.messages) == 1, 20)
    assert plain.mail_options == [["BODY=8BITMIME"]]  # not SMTPUTF8


def test_the_queue_drops_spooled_utf8_headers_for_an_upstream_without_smtputf8(
    make_gateway, plain, tmp_path, caplog
):
    caplog.set_level("INFO", logger="mailgate")
    spool = tmp_path / "spool"
    queue = {"directory": str(spool), "handoff_timeout": 0, "retry_min": "1s"}
    gw = make_gateway(upstream=plain.url, delivery="queue", queue=queue)
    replies = deliver(gw.port, b"MAIL FROM:<alice@example.net> SMTPUTF8", UTF8_HEADERS)
    assert replies[-1][0] == 250  # spooled first, without lockstep

    def bounced() -> bool:
        return any("outcome=bounced" in r.getMessage() for r in caplog.records)

    assert wait_until(bounced, 20)
    [line] = [r.getMessage() for r in caplog.records if "outcome=bounced" in r.getMessage()]
    assert "554 5.6.7" in line
    assert plain.messages == [] and plain.rsets >= 1
    assert wait_until(lambda: not list((spool / "queue").glob("*.env")), 10)


def test_queue_lockstep_refuses_a_non_ascii_sender_and_spools_nothing(
    make_gateway, plain, tmp_path
):
    spool = tmp_path / "spool"
    gw = make_gateway(upstream=plain.url, delivery="queue", queue={"directory": str(spool)})
    [(code, text)] = deliver(gw.port, "MAIL FROM:<élise@example.net> SMTPUTF8".encode())
    assert (code, text[:5]) == (553, b"5.6.7")
    assert plain.mail_commands == 0
    assert not list((spool / "queue").glob("*.env"))  # nothing spooled


# ------------------------------------------------------------------ 2: HELO names


@pytest.mark.parametrize(
    "greeting",
    [b"EHLO \xff", b"HELO \xff", "EHLO café.example".encode(), b"EHLO a\tb", b"EHLO a\x7fb"],
)
def test_a_helo_name_outside_printable_ascii_is_refused(make_gateway, upstream, greeting):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        code, text = c.cmd(greeting)
        assert (code, text[:5]) == (501, b"5.5.2")
        assert c.cmd(b"MAIL FROM:<alice@example.net>")[0] == 503  # still no greeting
        assert c.cmd(EHLO)[0] == 250
        assert c.cmd(b"MAIL FROM:<alice@example.net>")[0] == 250
        assert c.cmd(RCPT)[0] == 250
        assert c.cmd(b"DATA")[0] == 354
        c.send(MESSAGE + b".\r\n")
        assert c.reply()[0] == 250
    [message] = upstream.messages
    headers = message.data.split(b"\r\n\r\n")[0]
    assert headers.isascii()
    assert b"from client.example.net (" in headers


# ------------------------------------------------------------------ 3: address in use


@pytest.fixture
def taken() -> Iterator[int]:
    """A port on 127.0.0.1 held by a plain listening socket (no SO_REUSEPORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _run(tmp_path: Path, **policy: Any) -> subprocess.CompletedProcess[str]:
    path = write_policy(
        tmp_path / "p.yaml",
        {"upstream": "smtp://127.0.0.1:9", "domains": ["example.com"], **policy},
    )
    return mailgate("run", "-c", str(path))


@pytest.mark.parametrize("workers", [1, 2])
def test_run_on_a_listen_address_in_use_is_one_line_and_exit_1(tmp_path, taken, workers):
    result = _run(tmp_path, listen=[{"address": f"127.0.0.1:{taken}"}], workers=workers)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if f"127.0.0.1:{taken}" in line]
    assert errors == [f"mailgate: cannot listen on 127.0.0.1:{taken}: Address already in use"]


def test_run_on_a_metrics_address_in_use_is_one_line_and_exit_1(tmp_path, taken):
    result = _run(tmp_path, metrics=f"127.0.0.1:{taken}")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"mailgate: cannot serve metrics on 127.0.0.1:{taken}: Address already in use" in (
        result.stderr.splitlines()
    )


# ------------------------------------------------------------------ 4: a silent upstream


class SilentUpstream(LoopbackTcpServer):
    """Accepts TCP and then says nothing (or only its greeting); counts connections and EOFs."""

    def __init__(self, greet: bool = False) -> None:
        self.greet = greet
        self.closed = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        """Greet if asked, then read until the client goes away (counted in ``closed``)."""
        with conn:
            conn.settimeout(0.2)
            if self.greet:
                conn.sendall(b"220 silent.test ESMTP\r\n")
            while not self._stopping.is_set():
                try:
                    if not conn.recv(4096):
                        self.closed += 1
                        return
                except TimeoutError:
                    continue
                except OSError:
                    self.closed += 1
                    return


@pytest.mark.parametrize("greet", [False, True], ids=["no-greeting", "greeting-only"])
def test_a_connect_cut_by_the_handoff_budget_closes_and_marks_the_server_down(
    make_gateway, tmp_path, greet
):
    silent = SilentUpstream(greet=greet)
    try:
        upstream = {"url": f"smtp://127.0.0.1:{silent.port}", "connect_timeout": "20s"}
        queue = {"directory": str(tmp_path / "spool"), "handoff_timeout": "2s"}
        gw = make_gateway(upstream=upstream, delivery="queue", queue=queue)
        assert deliver(gw.port, b"MAIL FROM:<alice@example.net>")[-1][0] == 250
        assert wait_until(lambda: silent.closed >= 1, 10), "the connection was left open"
        server = gw.runtime.queue.route("")
        assert list(server.health().values()) == [False]
        # Marked down: the next message is spooled at once, not after another 2 s wait.
        started = time.monotonic()
        assert deliver(gw.port, b"MAIL FROM:<alice@example.net>")[-1][0] == 250
        assert time.monotonic() - started < 1.5
    finally:
        silent.stop()


# ------------------------------------------------------------------ 5, 6: metrics, quarantine


def test_spooled_mail_is_not_counted_as_an_upstream_2xx(make_gateway, upstream, tmp_path):
    queue = {"directory": str(tmp_path / "spool"), "handoff_timeout": "2s"}
    gw = make_gateway(metrics="127.0.0.1:0", delivery="queue", queue=queue)
    port = gw.gateway.metrics_server.bound[1]
    assert deliver(gw.port, b"MAIL FROM:<alice@example.net>")[-1][0] == 250  # lockstep
    upstream.behaviour.mail_reply = "451 4.3.0 Try again later"  # spool this one
    spooled = deliver(gw.port, b"MAIL FROM:<alice@example.net>")
    assert spooled[-1][0] == 250 and b"queued as" in spooled[-1][1]
    assert len(upstream.messages) == 1
    s = scrape(port)
    replies = "mailgate_upstream_replies_total"
    assert sample(s, replies, command="mail", **{"class": "2xx"}) == 1
    assert sample(s, replies, command="mail", **{"class": "4xx"}) == 1
    assert sample(s, replies, command="rcpt", **{"class": "2xx"}) == 1
    assert sample(s, replies, command="data", **{"class": "2xx"}) == 1
    transactions = "mailgate_transactions_total"
    assert sample(s, transactions, outcome="delivered", stage="data") == 1
    assert sample(s, transactions, outcome="queued", stage="data") == 1


def test_a_headers_rule_can_quarantine_and_held_mail_has_its_own_outcome(
    make_gateway, upstream, tmp_path, decisions
):
    spool = tmp_path / "spool"
    gw = make_gateway(
        metrics="127.0.0.1:0",
        queue={"directory": str(spool)},
        plugins={"headers": {"rules": {"headers.missing_date": "quarantine"}}},
    )
    port = gw.gateway.metrics_server.bound[1]
    undated = b"".join(line for line in MESSAGE.splitlines(True) if not line.startswith(b"Date:"))
    code, text = deliver(gw.port, b"MAIL FROM:<alice@example.net>", undated)[-1]
    assert code == 250 and text.startswith(b"2.0.0 Ok: held as "), text
    assert deliver(gw.port, b"MAIL FROM:<alice@example.net>")[-1][0] == 250  # dated: relayed
    [env] = [json.loads(p.read_text()) for p in (spool / "queue").glob("*.env")]
    assert env["held"] is True and env["hold_rules"] == ["headers.missing_date"]
    assert len(upstream.messages) == 1
    s = scrape(port)
    transactions = "mailgate_transactions_total"
    assert sample(s, transactions, outcome="held", stage="data") == 1
    assert sample(s, transactions, outcome="delivered", stage="data") == 1
    assert sample(s, "mailgate_upstream_replies_total", command="data", **{"class": "2xx"}) == 1
    held = [line for line in decisions() if "headers.missing_date:quarantine" in line]
    assert len(held) == 1 and "outcome=held" in held[0]


def test_a_helo_rule_can_quarantine(make_gateway, upstream, tmp_path):
    spool = tmp_path / "spool"
    gw = make_gateway(
        queue={"directory": str(spool)},
        plugins={"helo": {"rules": {"helo.not_fqdn": "quarantine"}}},
    )
    with RawClient(gw.port) as c:
        assert c.cmd(b"EHLO localhost")[0] == 250
        assert c.cmd(b"MAIL FROM:<alice@example.net>")[0] == 250
        assert c.cmd(RCPT)[0] == 250
        assert c.cmd(b"DATA")[0] == 354
        c.send(MESSAGE + b".\r\n")
        code, text = c.reply()
    assert code == 250 and text.startswith(b"2.0.0 Ok: held as "), text
    assert upstream.messages == []
