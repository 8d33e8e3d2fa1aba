"""SMTP smuggling: bare CR/LF and NUL in DATA never reach the upstream as line endings.

The upstream here is deliberately lenient, like the servers the December 2023
attacks (SEC Consult; CVE-2023-51764/51765/51766) exploited: any of CRLF, LF
or CR ends a line, NULs are dropped, and a line holding only "." ends DATA. A
meta-test shows that this upstream, fed the attack directly, does record the
smuggled second transaction; through the gateway it never does.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from mailgate.context import Message
from mailgate.hookspecs import hookimpl
from tests.rawsmtp import RawClient, wait_for
from tests.support import LoopThread
from tests.tlscerts import Certs

VARIANTS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CR.CR": b"\r.\r",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CRLF.NUL.CRLF": b"\r\n\x00.\r\n",
}
HEAD = (
    b"From: Alice <alice@example.net>\r\n"
    b"To: Bob <bob@example.com>\r\n"
    b"Subject: lunch\r\n"
    b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <lunch@example.net>\r\n"
    b"\r\n"
    b"See you at noon."
)
SMUGGLED = (
    b"MAIL FROM:<ceo@example.com>\r\n"
    b"RCPT TO:<bob@example.com>\r\n"
    b"DATA\r\n"
    b"From: CEO <ceo@example.com>\r\n"
    b"To: Bob <bob@example.com>\r\n"
    b"Subject: urgent wire transfer\r\n"
    b"\r\n"
    b"Pay the invoice today.\r\n"
)


def attack(variant: bytes) -> bytes:
    """A message body hiding a second transaction behind a non-standard end of data."""
    return HEAD + variant + SMUGGLED


# ------------------------------------------------------------------ the lenient upstream

_LINE_END = re.compile(rb"\r\n|\n|\r")
_LENIENT_END_OF_DATA = re.compile(rb"(?:\A|\r\n|\n|\r)\.(?:\r\n|\n|\r)")


@dataclass
class Transaction:
    """One message the lenient upstream accepted, with the DATA bytes as they came."""

    sender: str
    recipients: list[str]
    wire: bytes


@dataclass
class LenientState:
    """What the lenient upstream saw."""

    senders: list[str] = field(default_factory=list)
    transactions: list[Transaction] = field(default_factory=list)


class _LenientProtocol(asyncio.Protocol):
    def __init__(self, state: LenientState) -> None:
        self.state = state
        self.buffer = b""
        self.in_data = False
        self.sender = ""
        self.rcpts: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 lenient.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self._step():
            pass

    def _step(self) -> bool:
        if self.in_data:
            wire = self.buffer.replace(b"\x00", b"")
            end = _LENIENT_END_OF_DATA.search(wire)
            if end is None:
                return False
            self.state.transactions.append(
                Transaction(self.sender, self.rcpts, wire[: end.start()])
            )
            self.buffer, self.in_data = wire[end.end() :], False
            self.transport.write(b"250 2.0.0 queued\r\n")
            return True
        match = _LINE_END.search(self.buffer)
        if match is None:
            return False
        line, self.buffer = self.buffer[: match.start()], self.buffer[match.end() :]
        verb = line[:4].upper()
        if verb in (b"EHLO", b"HELO"):
            self.transport.write(b"250-lenient.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n")
        elif verb == b"MAIL":
            self.sender = line.split(b"<", 1)[-1].split(b">", 1)[0].decode()
            self.state.senders.append(self.sender)
            self.rcpts = []
            self.transport.write(b"250 2.1.0 ok\r\n")
        elif verb == b"RCPT":
            self.rcpts.append(line.split(b"<", 1)[-1].split(b">", 1)[0].decode())
            self.transport.write(b"250 2.1.5 ok\r\n")
        elif verb == b"DATA":
            self.in_data = True
            self.transport.write(b"354 go ahead\r\n")
        elif verb == b"QUIT":
            self.transport.write(b"221 2.0.0 bye\r\n")
            self.transport.close()
        elif line:
            self.transport.write(b"250 2.0.0 ok\r\n")  # RSET, NOOP
        return True


class LenientUpstream:
    """A lenient SMTP server on 127.0.0.1:0."""

    def __init__(self, loop_thread: LoopThread) -> None:
        self.state = LenientState()
        self.loop_thread = loop_thread

        async def start() -> asyncio.Server:
            loop = asyncio.get_running_loop()
            return await loop.create_server(lambda: _LenientProtocol(self.state), "127.0.0.1", 0)

        self.server = loop_thread.run(start())
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Stop listening (on the loop's thread: asyncio.Server is not thread-safe)."""
        self.server.get_loop().call_soon_threadsafe(self.server.close)


@pytest.fixture
def lenient(loop_thread):
    server = LenientUpstream(loop_thread)
    yield server
    server.stop()


def _deliver(port: int, body: bytes) -> tuple[int, bytes]:
    """Send one message with raw bytes; return the DATA reply (and check nothing follows it)."""
    with RawClient(port) as c:
        assert c.cmd(b"EHLO client.example.net")[0] == 250
        assert c.cmd(b"MAIL FROM:<alice@example.net>")[0] == 250
        assert c.cmd(b"RCPT TO:<bob@example.com>")[0] == 250
        assert c.cmd(b"DATA")[0] == 354
        c.send(body + b"\r\n.\r\n")
        reply = c.reply()
        # Had the gateway ended DATA early, the smuggled commands' replies would come next.
        assert c.cmd(b"QUIT")[0] == 221
    return reply


def _bare(data: bytes) -> bool:
    return data.count(b"\n") != data.count(b"\r\n") or data.count(b"\r") != data.count(b"\r\n")


# ------------------------------------------------------------------ the tests


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_the_lenient_upstream_is_vulnerable_on_its_own(lenient, variant):
    with RawClient(lenient.port) as c:
        c.send(
            b"EHLO attacker.example\r\nMAIL FROM:<alice@example.net>\r\n"
            b"RCPT TO:<bob@example.com>\r\nDATA\r\n" + attack(variant) + b".\r\nQUIT\r\n"
        )
        assert c.closed_by_server()
    assert lenient.state.senders == ["alice@example.net", "ceo@example.com"]
    assert len(lenient.state.transactions) == 2


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_smuggling_is_rejected_by_default(make_gateway, lenient, decisions, variant):
    gw = make_gateway(upstream=f"smtp://127.0.0.1:{lenient.port}")
    code, text = _deliver(gw.port, attack(variant))
    assert code == 550 and text.startswith(b"5.6.0 ")
    assert lenient.state.transactions == []
    assert "ceo@example.com" not in lenient.state.senders
    rule = "protocol.nul" if b"\x00" in variant else "protocol.bare_"
    assert wait_for(
        lambda: any(f"{rule}" in line and "outcome=rejected" in line for line in decisions())
    )


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_smuggling_is_defused_by_normalize(make_gateway, lenient, variant):
    gw = make_gateway(
        upstream=f"smtp://127.0.0.1:{lenient.port}", protocol={"line_endings": "normalize"}
    )
    code, _ = _deliver(gw.port, attack(variant))
    assert "ceo@example.com" not in lenient.state.senders
    if b"\x00" in variant:
        assert code == 550  # NUL is refused whatever the line-ending mode
        assert lenient.state.transactions == []
        return
    assert code == 250
    [txn] = lenient.state.transactions
    assert txn.sender == "alice@example.net"
    assert not _bare(txn.wire)
    assert b"MAIL FROM:<ceo@example.com>\r\n" in txn.wire  # delivered as content, not obeyed


def test_bare_lf_in_a_header_is_rejected_with_its_rule_id(make_gateway, upstream, decisions):
    gw = make_gateway()
    body = b"From: a@example.net\r\nSubject: hi\nBcc: victim@example.org\r\n\r\nbody"
    assert _deliver(gw.port, body) == (
        550,
        b"5.6.0 Bare LF in message content: lines must end in CRLF",
    )
    assert upstream.messages == []
    [line] = decisions()
    assert "verdicts=protocol.bare_lf:reject" in line


def test_bare_cr_is_rejected_too(make_gateway, upstream):
    gw = make_gateway()
    assert _deliver(gw.port, b"Subject: a\rb\r\n\r\nbody")[1].startswith(b"5.6.0 Bare CR")
    assert upstream.messages == []


def test_nul_in_data_is_refused(make_gateway, upstream):
    gw = make_gateway(protocol={"line_endings": "normalize"})
    assert _deliver(gw.port, b"Subject: a\r\n\r\nbo\x00dy") == (
        550,
        b"5.6.0 NUL byte in message content",
    )
    assert upstream.messages == []


class Recorder:
    """A plugin that keeps the bytes on_data saw."""

    name = "recorder"
    seen: ClassVar[list[bytes]] = []

    @hookimpl
    def on_data(self, message: Message) -> None:
        Recorder.seen.append(message.raw)


def test_normalize_relays_exactly_the_bytes_the_plugins_judged(make_gateway, upstream, decisions):
    Recorder.seen.clear()
    gw = make_gateway(
        protocol={"line_endings": "normalize"},
        plugins={"recorder": {"module": "tests.test_smuggling:Recorder"}},
    )
    body = b"From: a@example.net\nSubject: hi\r\rX: y\r\n\r\nline one\nline two\r"
    assert _deliver(gw.port, body)[0] == 250
    [seen] = Recorder.seen
    assert (
        seen
        == b"From: a@example.net\r\nSubject: hi\r\n\r\nX: y\r\n\r\nline one\r\nline two\r\n\r\n"
    )
    [msg] = upstream.messages
    assert msg.data.endswith(seen)
    assert msg.data[: -len(seen)].startswith(b"Received: ")
    [line] = decisions()
    assert "protocol.bare_lf:normalize,protocol.bare_cr:normalize" in line


def test_excluded_networks_are_normalized_instead_of_rejected(make_gateway, upstream):
    gw = make_gateway(protocol={"line_endings_exclusions": ["127.0.0.0/8"]})
    assert _deliver(gw.port, b"Subject: hi\n\nbody\n")[0] == 250
    [msg] = upstream.messages
    assert msg.data.endswith(b"Subject: hi\r\n\r\nbody\r\n\r\n")


def test_plaintext_pipelined_after_starttls_never_reaches_the_tls_session(
    make_gateway, upstream, certs: Certs
):
    tls = {"cert": str(certs.server_cert), "key": str(certs.server_key)}
    gw = make_gateway(listen=[{"address": "127.0.0.1:0", "starttls": tls}])
    with RawClient(gw.port) as c:
        assert b"STARTTLS" in c.cmd(b"EHLO client.example.net")[1]
        c.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
        assert c.reply() == (220, b"2.0.0 Ready to start TLS")
        context = ssl.create_default_context(cafile=str(certs.ca))
        c.sock = context.wrap_socket(c.sock, server_hostname="localhost")
        c.reader = c.sock.makefile("rb")
        assert c.cmd(b"EHLO client.example.net")[0] == 250
        # Had the injected MAIL run inside TLS, this RCPT would be accepted.
        assert c.cmd(b"RCPT TO:<bob@example.com>") == (503, b"5.5.1 Need MAIL command")
        assert c.cmd(b"QUIT")[0] == 221
    assert upstream.mail_commands == 0
