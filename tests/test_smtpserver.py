"""The listener's SMTP server (``mailgate.smtpserver``) over real sockets: DATA, pipelining, EOF.

Raw SMTP to a gateway on 127.0.0.1:0 (``tests.rawsmtp``) in front of the
recording upstream, for what ``test_protocol_limits``, ``test_smuggling`` and
``test_relay`` do not already cover: the end of DATA however it is split,
dot-stuffing, the size and line limits at their edges, half-closed
connections, large pipelined floods, parameter checks and a PROXY header sent
byte by byte. Where the way the bytes are cut into reads matters, a unit test
feeds ``SmtpServer`` the pieces directly, since TCP may join them.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from mailgate.admission import MemoryBudget
from mailgate.policy import Limits, Listener, Policy
from mailgate.smtpserver import MESSAGE_TOO_BIG, SmtpServer
from mailgate.verdict import Reply
from tests.rawsmtp import RawClient, wait_for
from tests.support import Received
from tests.test_proxy_protocol import v1, v2

EHLO = b"EHLO client.example.net"
MAIL = b"MAIL FROM:<alice@example.net>"
RCPT = b"RCPT TO:<bob@example.com>"
WIRE = b"\r\n".join(
    [
        b"..starts with a dot",
        b"Subject: dots",
        b"",
        b"..x",
        b"..",
        b"...",
        b".. ",
        b"a.b",
        b"end",
        b"",
    ]
)
"""A message as a client sends it, dot-stuffed (RFC 5321 §4.5.2)."""
MESSAGE = b"\r\n".join(
    [b".starts with a dot", b"Subject: dots", b"", b".x", b".", b"..", b". ", b"a.b", b"end", b""]
)
"""``WIRE`` as it must reach the upstream."""


def relayed(msg: Received) -> bytes:
    """What the upstream received, without the Received header the gateway put on top."""
    assert msg.data.startswith(b"Received: ")
    lines = msg.data.split(b"\r\n")
    first = 1
    while lines[first][:1] in (b" ", b"\t"):
        first += 1
    return b"\r\n".join(lines[first:])


def start_data(c: RawClient) -> None:
    """MAIL, RCPT and DATA, each accepted."""
    assert c.cmd(MAIL)[0] == 250
    assert c.cmd(RCPT)[0] == 250
    assert c.cmd(b"DATA")[0] == 354


def deliver(c: RawClient, wire: bytes = WIRE) -> tuple[int, bytes]:
    """One whole transaction; the reply to the final dot."""
    start_data(c)
    c.send(wire + b".\r\n")
    return c.reply()


def message_of(size: int) -> bytes:
    """A message of exactly ``size`` octets (CRLF line ends, lines under 80 octets)."""
    head = b"Subject: size\r\n\r\n"
    lines, last = divmod(size - len(head) - 2, 78)
    message = head + (b"y" * 76 + b"\r\n") * lines + b"z" * last + b"\r\n"
    assert len(message) == size
    return message


# ------------------------------------------------------------------ the end of DATA


def test_a_message_sent_one_byte_at_a_time_arrives_intact(make_gateway, upstream):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert c.cmd(EHLO)[0] == 250
        start_data(c)
        for byte in WIRE + b".\r\n":
            c.send(bytes([byte]))
        assert c.reply()[0] == 250
        assert c.cmd(b"QUIT")[0] == 221
    [msg] = upstream.messages
    assert relayed(msg) == MESSAGE


def test_the_final_dot_split_anywhere_across_two_sends_ends_the_message_once(
    make_gateway, upstream
):
    gw = make_gateway()
    end = b"\r\n.\r\n"
    with RawClient(gw.port) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert c.cmd(EHLO)[0] == 250
        for cut in range(len(end) + 1):
            start_data(c)
            c.send(WIRE[:-2] + end[:cut])
            c.send(end[cut:])
            assert c.reply()[0] == 250, cut
        assert c.cmd(b"NOOP")[0] == 250  # nothing of a message was taken as a command
    assert [relayed(msg) for msg in upstream.messages] == [MESSAGE] * (len(end) + 1)


def read_in_pieces(pieces: list[bytes], limits: Limits) -> bytes | Reply | None:
    """What ``SmtpServer`` makes of a DATA block that arrives in exactly these reads."""

    async def run() -> bytes | Reply | None:
        # A budget of its own: the reader charges it, and no DATA command is here to give it back.
        policy = Policy(hostname="mailgate.test", limits=limits)
        server = SmtpServer(None, Listener(), policy, budget=MemoryBudget())
        server._state = "open"
        reader = asyncio.ensure_future(server._read_message())
        for piece in pieces:
            for _ in range(100):  # until the reader has taken the last piece and waits again
                waiting = server._waiter is not None and not server._waiter.done()
                if reader.done() or waiting:
                    break
                await asyncio.sleep(0)
            server.data_received(piece)
        server.eof_received()
        return await asyncio.wait_for(reader, 10)

    return asyncio.run(run())


def every_split(wire: bytes) -> list[list[bytes]]:
    """``wire`` cut in two at every position, and one octet at a time."""
    return [[wire[:cut], wire[cut:]] for cut in range(len(wire) + 1)] + [[bytes([b]) for b in wire]]


def test_the_final_dot_is_found_however_the_reads_split_it():
    limits = Limits(message_size=len(WIRE) + 100)
    for pieces in every_split(WIRE + b".\r\n"):
        assert read_in_pieces(pieces, limits) == MESSAGE, pieces


def test_a_message_over_the_size_limit_is_refused_however_the_reads_split_it():
    limits = Limits(message_size=len(MESSAGE) - 1)  # RFC 1870: the unstuffed size counts
    for pieces in every_split(WIRE + b".\r\n"):
        assert read_in_pieces(pieces, limits) == MESSAGE_TOO_BIG, pieces


@pytest.mark.parametrize("under", [0, 1])
def test_a_message_at_the_size_limit_survives_a_split_final_dot(under):
    assert len(WIRE) > len(MESSAGE)  # the doubled dots do not count (RFC 1870)
    limits = Limits(message_size=len(MESSAGE) + under)
    for pieces in every_split(WIRE + b".\r\n"):
        assert read_in_pieces(pieces, limits) == MESSAGE, pieces


def test_an_empty_message_is_relayed_empty(make_gateway, upstream):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        assert c.cmd(MAIL)[0] == 250
        assert c.cmd(RCPT)[0] == 250
        c.send(b"DATA\r\n.\r\n")
        assert c.reply()[0] == 354
        assert c.reply()[0] == 250
        assert c.cmd(b"NOOP")[0] == 250
    [msg] = upstream.messages
    assert relayed(msg) == b""


def test_dot_stuffed_lines_arrive_unstuffed(make_gateway, upstream):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        assert deliver(c)[0] == 250
    [msg] = upstream.messages
    assert relayed(msg) == MESSAGE


# ------------------------------------------------------------------ limits at their edges


def test_a_message_at_the_size_limit_is_accepted_and_one_octet_more_is_refused(
    make_gateway, upstream
):
    limit = 3000
    gw = make_gateway(limits={"message_size": limit})
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        assert c.cmd(f"MAIL FROM:<alice@example.net> SIZE={limit}".encode())[0] == 250
        assert c.cmd(b"RSET")[0] == 250
        assert deliver(c, message_of(limit))[0] == 250
        assert deliver(c, message_of(limit + 1)) == (552, b"5.3.4 Message too big")
        assert deliver(c, message_of(limit))[0] == 250  # the session goes on
    assert [relayed(msg) for msg in upstream.messages] == [message_of(limit)] * 2


def test_a_line_at_the_line_limit_is_relayed_and_one_octet_more_is_refused(make_gateway, upstream):
    gw = make_gateway(limits={"line_length": 1001})
    at_limit = b"Subject: long\r\n\r\n" + b"x" * 999 + b"\r\n"  # 1001 octets with its CRLF
    over = b"Subject: long\r\n\r\n" + b"x" * 1000 + b"\r\n"
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        assert deliver(c, at_limit)[0] == 250
        assert deliver(c, over) == (500, b"5.5.2 Line too long")
        assert deliver(c)[0] == 250  # the session goes on
    assert [relayed(msg) for msg in upstream.messages] == [at_limit, MESSAGE]


# ------------------------------------------------------------------ end of input


def test_a_client_that_half_closes_after_the_final_dot_still_gets_its_reply(make_gateway, upstream):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        c.send(b"\r\n".join([EHLO, MAIL, RCPT, b"DATA", WIRE + b"."]) + b"\r\n")
        c.sock.shutdown(socket.SHUT_WR)
        assert [code for code, _ in c.replies(5)] == [250, 250, 250, 354, 250]
        assert c.closed_by_server()
    [msg] = upstream.messages
    assert relayed(msg) == MESSAGE


def test_a_client_that_half_closes_before_the_final_dot_relays_nothing(make_gateway, upstream):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        c.send(b"\r\n".join([EHLO, MAIL, RCPT, b"DATA", WIRE]))
        c.sock.shutdown(socket.SHUT_WR)
        assert [code for code, _ in c.replies(4)] == [250, 250, 250, 354]
        assert c.closed_by_server()
    assert upstream.mail_commands == 1
    assert upstream.messages == []


# ------------------------------------------------------------------ pipelining


def test_a_pipelined_transaction_gets_every_reply_in_order(make_gateway, upstream):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        c.send(b"\r\n".join([EHLO, MAIL, RCPT, b"RCPT TO:<carol@example.com>", b"DATA", b""]))
        replies = c.replies(5)
        assert [code for code, _ in replies] == [250, 250, 250, 250, 354]
        assert b"PIPELINING" in replies[0][1]
        c.send(WIRE + b".\r\nRSET\r\nNOOP\r\nQUIT\r\n")
        assert [code for code, _ in c.replies(4)] == [250, 250, 250, 221]
        assert c.closed_by_server()
    [msg] = upstream.messages
    assert msg.recipients == ["bob@example.com", "carol@example.com"]
    assert relayed(msg) == MESSAGE


def test_a_flood_of_pipelined_noops_gets_every_reply_and_the_session_goes_on(
    make_gateway, upstream
):
    gw = make_gateway(limits={"junk_commands": 100_000, "errors": 100_000})
    count = 50_000  # 300 000 octets in one send: past the 256 KiB at which reading pauses
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        sender = threading.Thread(target=c.send, args=(b"NOOP\r\n" * count,))
        sender.start()
        # Read only once the flood is sent (or after 5 s): the replies pile up unread first.
        wait_for(lambda: not sender.is_alive(), timeout=5)
        replies = c.replies(count)
        sender.join(30)
        assert replies == [(250, b"2.0.0 Ok")] * count
        assert deliver(c)[0] == 250
    assert len(upstream.messages) == 1


def test_a_client_that_never_reads_its_replies_cannot_make_the_gateway_read_on(make_gateway):
    gw = make_gateway()
    cap = 24 * 1024 * 1024  # well past what the kernel buffers hold on loopback (~2 MB)
    sent = 0
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.settimeout(15)
        sock.connect(("127.0.0.1", gw.port))
        assert sock.recv(100).startswith(b"220 ")
        sock.settimeout(1.5)  # this long without taking a byte: the gateway stopped reading
        chunk = b"HELP\r\n" * 10_000  # each 6-octet command earns an 86-octet reply
        try:
            while sent < cap:
                sent += sock.send(chunk)
        except TimeoutError:
            pass
    assert sent < cap
    with RawClient(gw.port) as other:
        assert other.cmd(EHLO)[0] == 250


# ------------------------------------------------------------------ commands


@pytest.mark.parametrize(
    ("before", "command", "reply"),
    [
        ([MAIL], b"RCPT TO:<>", (501, b"5.5.4 Syntax: RCPT TO:<address>")),
        ([], MAIL + b" SIZE=abc", (501, b"5.5.4 Syntax: MAIL FROM:<address> [SP <mail-")),
        ([], MAIL + b" SIZE", (501, b"5.5.4 Syntax: MAIL FROM:<address> [SP <mail-")),
        ([], MAIL + b" SIZE=", (501, b"5.5.4 Syntax: MAIL FROM:<address> [SP <mail-")),
        ([], MAIL + b" SIZE=25000001", (552, b"5.3.4 Message too big")),
        ([], MAIL + b" BODY=BINARYMIME", (501, b"5.5.4 BODY must be 7BIT or 8BITMIME")),
        ([], MAIL + b" SMTPUTF8=x", (501, b"5.5.4 SMTPUTF8 takes no arguments")),
        ([], MAIL + b" FOO=1", (555, b"5.5.4 MAIL FROM parameters not recognized")),
        ([MAIL], RCPT + b" NOTIFY=NEVER", (555, b"5.5.4 RCPT TO parameters not recognized")),
        ([MAIL], RCPT + b" FOO=", (501, b"5.5.4 Syntax: RCPT TO:<address> [SP <mail-param")),
        ([], MAIL + b" size=25000000 body=8bitmime", (250, b"2.1.0 Sender ok")),
        ([], b"NO\x00OP", (500, b"5.5.1 Command unrecognized")),
        ([], b"N\xc3\x96OP", (500, b"5.5.2 Syntax error")),
        # A bare CR in a path would stay in the address, or vanish from a domain.
        ([], b"MAIL FROM:<a\rb@example.net>", (501, b"5.5.2 Syntax error: control character")),
        ([MAIL], b"RCPT TO:<bob@exam\rple.com>", (501, b"5.5.2 Syntax error: control character")),
        ([MAIL], b"RCPT TO:<bob@example.com>\x1b", (501, b"5.5.2 Syntax error: control character")),
        ([], b"MAIL FROM:\t<alice@example.net>", (250, b"2.1.0 Sender ok")),
    ],
)
def test_command_replies(make_gateway, before, command, reply):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        for line in [EHLO, *before]:
            assert c.cmd(line)[0] == 250
        code, text = c.cmd(command)
        assert (code, text[: len(reply[1])]) == reply
        assert c.cmd(b"NOOP")[0] == 250


def test_help_names_every_command_and_starttls_only_when_offered(make_gateway, certs):
    commands = b"DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET VRFY".split()  # not EXPN: 502
    tls = {"cert": str(certs.server_cert), "key": str(certs.server_key)}
    for listener, offered in (
        ({"address": "127.0.0.1:0"}, commands),
        ({"address": "127.0.0.1:0", "starttls": tls}, sorted([*commands, b"STARTTLS"])),
    ):
        gw = make_gateway(listen=[listener])
        with RawClient(gw.port) as c:
            assert c.cmd(b"HELP") == (214, b"2.0.0 Supported commands: " + b" ".join(offered))


def test_mail_parameters_need_ehlo(make_gateway):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        assert c.cmd(b"HELO client.example.net")[0] == 250
        assert c.cmd(MAIL + b" SIZE=10") == (501, b"5.5.4 Syntax: MAIL FROM:<address>")
        assert c.cmd(MAIL)[0] == 250


def test_an_overlong_command_line_sent_in_pieces_gets_one_reply(make_gateway):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        c.send(b"NOOP " + b"x" * 5000)  # past 4096 octets without a line end
        c.send(b"y" * 5000)
        c.send(b"z\r\n")
        assert c.reply() == (500, b"5.5.2 Command line too long")
        assert c.cmd(b"NOOP") == (250, b"2.0.0 Ok")  # not a second 500: one line, one reply
        assert c.cmd(MAIL)[0] == 250


# ------------------------------------------------------------------ PROXY


@pytest.mark.parametrize("header", [v1("198.51.100.7"), v2("198.51.100.7")], ids=["v1", "v2"])
def test_a_proxy_header_sent_one_byte_at_a_time_is_read(make_gateway, upstream, header):
    listener = {
        "address": "127.0.0.1:0",
        "proxy_protocol": True,
        "trusted_proxies": ["127.0.0.0/8"],
    }
    gw = make_gateway(listen=[listener])
    with RawClient(gw.port, banner=False) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in header:
            c.send(bytes([byte]))
        assert c.reply() == (220, b"mailgate.test ESMTP mailgate")
        assert c.cmd(EHLO)[0] == 250
        assert deliver(c)[0] == 250
    [msg] = upstream.messages
    assert b"from client.example.net ([198.51.100.7])" in msg.data


# ------------------------------------------------------------------ path parsing


@pytest.mark.parametrize(
    "command",
    [b'MAIL FROM:"', b"MAIL FROM:<a@[\\]>", b"MAIL FROM:<=?utf-8?q?a=00b?=@example.net> (x)"],
)
def test_a_malformed_path_gets_a_permanent_refusal(make_gateway, command):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        assert c.cmd(command)[0] in (501, 553)


def test_the_upstream_gets_only_addresses_the_client_sent(make_gateway, upstream):
    gw = make_gateway()
    with RawClient(gw.port) as c:
        assert c.cmd(EHLO)[0] == 250
        assert c.cmd(MAIL)[0] == 250
        c.cmd(b"RCPT TO:<=?utf-8?q?bob?=@example.com> (a comment)")
        assert c.cmd(b"RCPT TO:<carol@example.com>")[0] == 250
        assert c.cmd(b"DATA")[0] == 354
        c.send(WIRE + b".\r\n")
        assert c.reply()[0] == 250
    [msg] = upstream.messages
    assert "bob@example.com" not in msg.recipients
