"""The server side of one SMTP connection: read commands, enforce the protocol limits, reply.

``SmtpServer`` is an asyncio protocol. It keeps the bytes the client sent in
one buffer, takes command lines and the DATA block out of it, checks each
command's syntax and state (RFC 5321, with PIPELINING, SIZE, 8BITMIME,
SMTPUTF8 and STARTTLS) and hands what passes to the connection's
:class:`~mailgate.session.SmtpSession`, which runs the hooks and the relay. Every
reply it makes carries an RFC 3463 enhanced status code except the greeting
(220), the HELO/EHLO reply (250) and the 354, which RFC 2034 leaves without
one; upstream replies are relayed as the upstream wrote them.

The limits a public MX needs, and the reply each gives (``docs/protocol.md``
explains the choices):

- **Connections**: ``limits.connections`` open at once (checked at accept,
  before anything runs) and ``limits.connections_per_ip`` per client address
  (checked before the greeting, once a PROXY header has named the real
  client; trusted networks are exempt): ``421 4.7.0`` and disconnect.
- **Early talker**: with ``protocol.early_talker`` on, a client that sends
  anything before the greeting (after ``protocol.greet_delay``, during which a
  ``220-`` first line is sent, as postscreen does) gets ``554 5.5.1`` and is
  disconnected; in ``monitor`` mode it is only logged. Trusted clients are exempt.
- **Timeouts**: while the gateway waits for the client, one timer runs: the
  smallest of ``limits.idle_timeout`` (one whole command line, so a client
  trickling bytes is cut off; in DATA, the time between two chunks),
  ``limits.data_timeout`` (354 to the final dot) and ``limits.session_timeout``.
  It is stopped while the gateway works on a command (hooks, the upstream
  commit), so no timeout ever cancels an upstream commit half-way. On expiry:
  ``421 4.4.2`` and disconnect.
- **Error budget**: every 4xx/5xx reply counts, and so does every NOOP, RSET
  or VRFY past ``limits.junk_commands``; at ``limits.errors`` the client gets
  ``421 4.7.0`` and is disconnected, without another pipelined command being
  run. A delivered message resets both counts. The fifth unknown command
  also ends the session (``421 4.7.0``).
- **Commands**: a NUL byte or another control character (TAB aside) in a
  command's argument gets ``501 5.5.2``; command lines are limited to 512
  octets (plus the 26 + 10 that SIZE and SMTPUTF8 add to MAIL, per RFC 1870/6531).
- **DATA**: only ``CRLF.CRLF`` ends it; lines up to ``limits.line_length``
  octets, the message up to ``limits.message_size``; past either, the rest of
  the message is read and dropped and the client gets ``500 5.5.2`` or
  ``552 5.3.4`` after the final dot.
- **Memory**: the bytes of message data the process holds (DATA buffers and
  messages until their reply) are charged to ``limits.memory`` (split between
  ``workers``). A DATA that would start with the budget spent gets ``452 4.3.1``
  before the 354; a message whose data passes the budget while it arrives is
  dropped at once, the rest is read and thrown away, and the client gets
  ``452 4.3.1`` after the final dot. ``limits.data_per_ip`` DATA phases may run
  at once per client address (trusted networks exempt); one more gets
  ``451 4.7.1`` before the 354. Either refusal ends the transaction (the
  client starts again with MAIL) and the decision line names the rule
  (``limits.memory``, ``limits.data_per_ip``).
- **STARTTLS**: whatever the client pipelined after the command is dropped
  (the STARTTLS injection defence); with ``require_starttls`` only EHLO, NOOP,
  STARTTLS and QUIT are taken before TLS.

A client that half-closes its side after the final dot still gets its
message relayed and the reply written: end of input only ends the command loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import cast

from mailgate.admission import (
    DATA_PER_IP_RULE,
    MEMORY_RULE,
    OUT_OF_MEMORY,
    PROCESS_BUDGET,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_FROM_YOU,
    TOO_MANY_MESSAGES,
    ConnectionCounter,
    MemoryBudget,
)
from mailgate.context import IPAddress, VerdictRecord
from mailgate.deadline import LazyDeadline
from mailgate.decisionlog import emit_fields, log_connection
from mailgate.policy import Listener, Policy
from mailgate.proxyproto import ProxyRefused, peer_ip, real_client
from mailgate.session import SmtpSession
from mailgate.smtpsyntax import ParameterError, body_type_ok, parse_parameters, parse_path
from mailgate.verdict import Reply
from mailgate.workers import worker_share

log = logging.getLogger("mailgate.smtp")
# Connections refused before a session exists get their decision line here.

EARLY_TALKER = Reply(554, "Protocol error: you talked before the greeting", "5.5.1")
TOO_MANY_ERRORS = Reply(421, "Too many errors, closing connection", "4.7.0")
TOO_MANY_UNKNOWN = Reply(421, "Too many unrecognized commands, closing connection", "4.7.0")
NUL_IN_COMMAND = Reply(501, "Syntax error: NUL byte in command", "5.5.2")
CONTROL_IN_COMMAND = Reply(501, "Syntax error: control character in command", "5.5.2")
BAD_HELO_NAME = Reply(501, "Syntax error: HELO/EHLO name must be printable ASCII", "5.5.2")
SYNTAX_ERROR = Reply(500, "Syntax error", "5.5.2")
LINE_TOO_LONG = Reply(500, "Line too long", "5.5.2")
COMMAND_TOO_LONG = Reply(500, "Command line too long", "5.5.2")
UNKNOWN_COMMAND = Reply(500, "Command unrecognized", "5.5.1")
MESSAGE_TOO_BIG = Reply(552, "Message too big", "5.3.4")
NEED_HELO = Reply(503, "Send HELO/EHLO first", "5.5.1")
NEED_MAIL = Reply(503, "Need MAIL command", "5.5.1")
NEED_RCPT = Reply(503, "Need RCPT command", "5.5.1")
NESTED_MAIL = Reply(503, "Nested MAIL command", "5.5.1")
MALFORMED_ADDRESS = Reply(553, "Malformed address", "5.1.3")
NEED_SMTPUTF8 = Reply(553, "Non-ASCII address needs SMTPUTF8 (RFC 6531)", "5.6.7")
NOT_UTF8 = Reply(553, "Address is not valid UTF-8", "5.6.7")
NEED_STARTTLS = Reply(530, "Must issue a STARTTLS command first", "5.7.0")
TLS_UNAVAILABLE = Reply(454, "TLS not available", "4.7.0")
READY_FOR_TLS = Reply(220, "Ready to start TLS", "2.0.0")
START_DATA = Reply(354, "End data with <CR><LF>.<CR><LF>")
OK = Reply(250, "Ok", "2.0.0")
BYE = Reply(221, "Bye", "2.0.0")
CANNOT_VRFY = Reply(252, "Cannot VRFY user, but will accept message and attempt delivery", "2.5.2")
BAD_VRFY = Reply(502, "Could not VRFY that address", "5.5.4")
NO_EXPN = Reply(502, "EXPN not implemented", "5.5.1")
BAD_BODY = Reply(501, "BODY must be 7BIT or 8BITMIME", "5.5.4")
BAD_SMTPUTF8 = Reply(501, "SMTPUTF8 takes no arguments", "5.5.4")
MAIL_PARAMETERS = Reply(555, "MAIL FROM parameters not recognized", "5.5.4")
RCPT_PARAMETERS = Reply(555, "RCPT TO parameters not recognized", "5.5.4")

COMMAND_LIMIT = 512
"""Octets in a command line without its CRLF (RFC 5321 §4.5.3.1.4)."""
MAIL_EXTENSIONS = 26 + 10
"""What SIZE (RFC 1870) and SMTPUTF8 (RFC 6531) add to MAIL's limit in an EHLO session."""
UNKNOWN_LIMIT = 5
_Path = tuple[str, list[str], dict[str, str | bool]]
"""A MAIL/RCPT path: the address, the upper-cased parameters, and them parsed."""
_OVERLONG = 4096  # a command line past this is dropped as it arrives
_PAUSE_AT = 256 * 1024  # pipelined command bytes held before we stop reading
_BEFORE_STARTTLS = frozenset({"NOOP", "EHLO", "STARTTLS", "QUIT"})
_JUNK = frozenset({"NOOP", "RSET", "VRFY"})
_PRINTABLE = re.compile(r"[ -~]+")
_CONTROL = re.compile(rb"[\x01-\x08\x0a-\x1f\x7f]")  # C0 controls but TAB (the line's CRLF is gone)


@functools.lru_cache(maxsize=256)
def _wire(reply: Reply) -> bytes:
    """``reply`` as sent, with its CRLF; the same few replies go out on every connection."""
    return reply.render().encode("utf-8", "surrogateescape") + b"\r\n"


def _syntax(usage: str) -> Reply:
    return Reply(501, f"Syntax: {usage}", "5.5.4")


def _limit(rule: str, reason: str) -> VerdictRecord:
    """The decision-log record of a DATA phase refused by a limit (``limits.memory``, ...)."""
    return VerdictRecord("core", "on_data", rule, "tempfail", reason, True)


def longest_line_over(data: bytes | bytearray, limit: int, stop: int | None = None) -> bool:
    """True when a line of ``data[:stop]`` (with its CRLF, if any) is longer than ``limit``."""
    start, size = 0, len(data) if stop is None else stop
    while size - start > limit:
        # The last line end that keeps the line from ``start`` within the limit.
        end = data.rfind(b"\r\n", start, start + limit)
        if end < 0:
            return True
        start = end + 2
    return False


def unstuff(data: bytes | bytearray, end: int | None = None) -> bytes:
    """``data[:end]`` without the dot that starts a line (RFC 5321 §4.5.2 transparency)."""
    return _unstuff_rest(_copy_unstuffed_first(data, end))


def _copy_unstuffed_first(data: bytes | bytearray, end: int | None) -> bytes:
    """A copy of ``data[:end]``, without the first line's stuffing dot."""
    lead = 1 if data[:1] == b"." else 0
    with memoryview(data) as view:
        return bytes(view[lead:end])


def _unstuff_rest(data: bytes) -> bytes:
    """``data`` without the stuffing dot of every line after the first (no copy if none)."""
    return data.replace(b"\r\n.", b"\r\n")


class SmtpServer(asyncio.Protocol):
    """One client connection, from accept to close."""

    def __init__(
        self,
        session: SmtpSession,
        listener: Listener,
        policy: Policy,
        *,
        counter: ConnectionCounter | None = None,
        tls_context: ssl.SSLContext | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.session = session
        self.listener = listener
        self.policy = policy
        self.limits = policy.limits
        self.hostname = policy.hostname
        self.counter = counter if counter is not None else ConnectionCounter()
        self.budget = budget if budget is not None else PROCESS_BUDGET
        """Bytes of message data in flight, for ``limits.memory`` (the process's by default)."""
        self._memory_cap = worker_share(self.limits.memory, policy.workers)
        self._held = 0  # bytes this connection has charged to the budget
        self._data_claim: IPAddress | None = None  # counted in counter.data_per_ip
        self.tls_context = tls_context
        """Offered with STARTTLS; None on an implicit-TLS listener or without certificates."""
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._state = "new"  # then refused (at accept) or open, closing, closed
        self._task: asyncio.Task[None] | None = None
        self._buf = bytearray()
        self._scan = 0  # self._buf[:self._scan] holds no line end
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._writing_paused: asyncio.Future[None] | None = None
        self._out: list[bytes] = []
        self._overlong = False
        self._timer = LazyDeadline(self.loop, lambda: self._timed_out(self._reason))
        """The timeout of the current wait on the client (no wait: no deadline)."""
        self._reason = ""  # what the client is told when it passes
        self._in_data = False
        self._data_deadline: float | None = None
        self._accepted_at = 0.0
        self._session_deadline = math.inf
        self._claimed: IPAddress | None = None
        self._tls = False
        self._helo: str | None = None
        self._esmtp = False
        self._mail = False
        self._smtputf8 = False  # the open transaction's MAIL said SMTPUTF8
        self._rcpts = 0
        self._overshoot = 0  # RCPTs past limits.recipients in this transaction
        self._errors = 0
        self._junk = 0
        self._unknown = 0

    # ------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection (refusing it past ``limits.connections``), then serve it."""
        transport = cast(asyncio.Transport, transport)
        if not self.counter.open(self.limits.connections):
            self._state = "refused"
            reply = self._own(TOO_MANY_CONNECTIONS)
            transport.write(f"{reply.render()}\r\n".encode())
            transport.close()
            peer = transport.get_extra_info("peername")
            client = peer[0] if isinstance(peer, tuple) else "-"
            self._log_refusal(client, "too many connections", reply)
            return
        self._state = "open"
        self.transport = transport
        self._tls = transport.get_extra_info("ssl_object") is not None
        self._accepted_at = self.loop.time()
        self._session_deadline = self._accepted_at + self.limits.session_timeout
        self._task = self.loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        """Buffer what the client sent; in DATA, every chunk restarts the idle part of the timer."""
        self._buf += data
        if self._in_data:
            if self._timer.deadline is not None:
                self._arm()
            # The reader has not yet charged the last read to the memory budget: stop until
            # it has (uvloop reads a socket up to 32 times before the reader runs).
            hold_off = self._waiter is None or self._waiter.done()
        else:
            hold_off = len(self._buf) > _PAUSE_AT
        if hold_off and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        """The client will send no more; what it sent is still served, then we close."""
        self._eof = True
        self._wake()
        # Keep our side open for the replies still owed (TLS cannot half-close: asyncio
        # closes it whatever we answer, and warns if we answer True).
        return not self._tls

    def connection_lost(self, exc: Exception | None) -> None:
        """Give back the connection's slots, stop serving, let the session close out."""
        if self._state in ("refused", "closed"):
            return
        self._state = "closed"
        self.counter.close()
        self._end_data()
        if self._claimed is not None:
            self.counter.release(self._claimed)
        self._timer.cancel()
        self._wake()
        if self._writing_paused is not None and not self._writing_paused.done():
            self._writing_paused.set_result(None)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        task = self.loop.create_task(self.session.disconnected())
        _background.add(task)
        task.add_done_callback(_background.discard)

    def pause_writing(self) -> None:
        """The client is not reading its replies: stop taking its commands until it does."""
        if self._writing_paused is None or self._writing_paused.done():
            self._writing_paused = self.loop.create_future()

    def resume_writing(self) -> None:
        """The client reads again."""
        if self._writing_paused is not None and not self._writing_paused.done():
            self._writing_paused.set_result(None)

    # ------------------------------------------------------------ the connection

    async def _serve(self) -> None:
        try:
            if await self._open():
                while self._state == "open":
                    if self._writing_paused is not None:
                        await self._writing_paused  # replies pile up unread: wait
                    line = await self._read_line()
                    if line is None:
                        break
                    await self._command(line)
        except asyncio.CancelledError:
            pass  # the connection is gone, timed out while we waited, or the gateway stops
        except Exception:
            log.exception("internal error in the SMTP server")
        self._close()

    async def _open(self) -> bool:
        """PROXY header, connect stage, connection limits, early talkers; then the greeting."""
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        if self.listener.proxy_protocol:
            try:
                peer = await real_client(_ProxyReader(self), peer, self.listener)
            except ProxyRefused as exc:
                log.warning("connection refused: client=%s reason=%s", peer[0], exc)
                if exc.reply is not None:
                    self._send(exc.reply)
                self._close()
                return False
        refusal = await self.session.connect(peer, tls=self._tls)
        if refusal is not None:
            self._send(refusal)
            self._close()
            return False
        if not await self._admit():
            return False
        self._send(Reply(220, f"{self.hostname} ESMTP mailgate"))
        return self._state == "open"

    async def _admit(self) -> bool:
        """Note our address; per-address limit, greet delay, early talker; False if refused."""
        session = self.session.session
        assert session is not None and self.transport is not None
        local = self.transport.get_extra_info("sockname")
        if isinstance(local, tuple):
            session.local_ip = peer_ip(local)
        if session.trusted:
            return True
        if not self.counter.claim(session.client_ip, self.limits.connections_per_ip):
            self._shut(TOO_MANY_FROM_YOU, "too many connections from client")
            return False
        self._claimed = session.client_ip
        mode = self.policy.protocol.early_talker
        if mode == "off":
            return True
        wait = self.policy.protocol.greet_delay - (self.loop.time() - self._accepted_at)
        if wait > 0:
            self.transport.write(f"220-{self.hostname} ESMTP mailgate\r\n".encode())
            await asyncio.sleep(wait)
        if not self._buf:
            return True
        # Bytes already buffered are bytes the client sent before our greeting.
        enforced = mode == "reject"
        reason = "client sent data before the greeting"
        session.card.verdicts.append(
            VerdictRecord("core", "on_connect", "protocol.early_talker", "reject", reason, enforced)
        )
        if not enforced:
            log_connection(session, outcome="early talker (monitor)")
            return True
        self._shut(EARLY_TALKER, "early talker")
        return False

    # ------------------------------------------------------------ input

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        """Send what is owed, then wait for more input from the client."""
        self._flush()
        if self._writing_paused is not None:
            await self._writing_paused
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def _read_line(self) -> bytes | None:
        """The next command line without its line end; None once the client is done.

        A line longer than ``_OVERLONG`` is dropped as it arrives and comes back
        empty, with ``self._overlong`` set.
        """
        armed = False
        while True:
            end = self._buf.find(b"\n", self._scan)
            if end >= 0:
                line = bytes(self._buf[:end]).rstrip(b"\r")
                del self._buf[: end + 1]
                self._scan = 0
                if armed:
                    self._timer.clear()
                return line
            if len(self._buf) > _OVERLONG:
                self._overlong = True
                del self._buf[:]
            self._scan = len(self._buf)
            if self._eof or self._state != "open":
                return None
            if not armed:
                self._arm()
                armed = True
            await self._wait()

    async def _read_message(self) -> bytes | Reply | None:
        """The DATA block up to the final dot, unstuffed; a Reply if it broke a limit.

        None when the connection ended first. The buffer is charged to the
        memory budget as it grows; past the budget (or past
        ``limits.message_size``) it is dropped at once and the rest is read
        and thrown away. The message comes back still charged (see :meth:`_end_data`).
        """
        limit = self.limits.message_size
        # RFC 1870 counts the message, not the dot-stuffed bytes on the wire. A
        # stuffed line is at least "..\r\n", so what is received shrinks by at
        # most a quarter: past 4/3 of the limit it is over it for certain.
        drop_at = (4 * limit + 12) // 3
        self._in_data = True
        self._data_deadline = self.loop.time() + self.limits.data_timeout
        refusal: Reply | None = None  # set once the message is being read and dropped
        dropped = 0  # octets read and thrown away
        stuffed = 0  # the doubled dots among them
        scan = 0
        try:
            while True:
                buf = self._buf
                if refusal is None and not self._hold(len(buf)):
                    refusal = OUT_OF_MEMORY
                if not dropped and refusal is None and buf[:3] == b".\r\n":
                    end = 0
                    break
                end = buf.find(b"\r\n.\r\n", scan)
                if end >= 0:
                    end += 2
                    break
                # Over the limit even without the ".\r" of a final dot begun: drop it.
                if refusal is None and dropped + len(buf) - 2 > drop_at:
                    refusal = MESSAGE_TOO_BIG
                if refusal is not None and len(buf) > 4:
                    stuffed += buf.count(b"\r\n..", 0, len(buf) - 1)
                    dropped += len(buf) - 4
                    del buf[:-4]  # keep what may be the start of the final dot
                    self._hold(0)
                scan = max(len(buf) - 4, 0)
                if self._eof or self._state != "open":
                    return None
                if self._timer.deadline is None:
                    self._arm()
                await self._wait()
        finally:
            self._in_data = False
            self._data_deadline = None
            self._timer.clear()
        if refusal is not None and dropped - stuffed + end - buf.count(b"\r\n..", 0, end) > limit:
            refusal = MESSAGE_TOO_BIG  # permanent: it takes precedence over the memory's 4xx
        if refusal is not None:
            del buf[: end + 3]
            self._hold(0)
            self._scan = 0
            return refusal
        line_length = self.limits.line_length
        too_long = end > line_length and longest_line_over(buf, line_length, end)
        # Copied out of the buffer once, and the buffer goes before any other copy
        # (the unstuffing) is made: a message is never held three times.
        data = b"" if too_long else _copy_unstuffed_first(buf, end)
        del buf[: end + 3]
        self._scan = 0
        data = _unstuff_rest(data)
        self._hold(len(data))
        if len(data) > limit:
            self._hold(0)
            return MESSAGE_TOO_BIG
        return LINE_TOO_LONG if too_long else data

    def _hold(self, size: int) -> bool:
        """Hold ``size`` bytes of the budget in all; False (and nothing held) if they don't fit."""
        grow = size - self._held
        if grow > 0 and not self.budget.charge(grow, self._memory_cap):
            self._hold(0)
            return False
        if grow < 0:
            self.budget.release(-grow)
        self._held = size
        return True

    def _claim_data(self) -> VerdictRecord | None:
        """Room for one more DATA phase (memory budget, ``data_per_ip``); else why not."""
        session = self.session.session
        assert session is not None
        if not self.budget.has_room(self._memory_cap):
            reason = f"{self.budget.in_flight} bytes in flight, budget {self._memory_cap}"
            return _limit(MEMORY_RULE, reason)
        if not session.trusted:
            limit = self.limits.data_per_ip
            if not self.counter.claim_data(session.client_ip, limit):
                reason = f"{limit} messages in transfer from {session.client_ip}"
                return _limit(DATA_PER_IP_RULE, reason)
            self._data_claim = session.client_ip
        return None

    def _end_data(self) -> None:
        """Give back what the DATA phase took: its bytes of the budget, its per-address slot."""
        self._hold(0)
        if self._data_claim is not None:
            self.counter.release_data(self._data_claim)
            self._data_claim = None

    # ------------------------------------------------------------ output

    def _send(self, reply: Reply, *, count: bool = True) -> None:
        """Queue ``reply``; write it now unless another pipelined command is waiting.

        Counts errors (unless ``count`` is false): at ``limits.errors`` the
        connection is closed with 421.
        """
        if self._state != "open":
            return  # a pipelined command after our 421: nothing more is said
        self._out.append(_wire(reply))
        if self._buf.find(b"\n") < 0:
            self._flush()
        if count and reply.code >= 400 and reply.code != 421:
            self._errors += 1
        if self._errors >= self.limits.errors:
            self._shut(TOO_MANY_ERRORS, "too many errors")

    def _flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def _own(self, reply: Reply) -> Reply:
        """``reply`` with our hostname first, as RFC 5321 asks of 421 and 554 greetings."""
        return Reply(reply.code, f"{self.hostname} {reply.text}", reply.status)

    def _close(self) -> None:
        """Write what is owed and close the connection."""
        if self._state == "open" and self.transport is not None:
            self._flush()
            self._state = "closing"
            self.transport.close()

    def _shut(self, reply: Reply, outcome: str, *, own: bool = True) -> None:
        """Send ``reply``, close the connection and stop running commands."""
        if self._state != "open" or self.transport is None:
            return
        reply = self._own(reply) if own else reply
        self._out.append(f"{reply.render()}\r\n".encode())
        self._close()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        session = self.session.session
        if session is not None:
            log_connection(session, outcome=outcome, reply=reply)
        else:
            self._log_refusal("-", outcome, reply)

    @staticmethod
    def _log_refusal(client: str, outcome: str, reply: Reply) -> None:
        fields = [("session", "-"), ("client", client), ("outcome", outcome), ("reply", reply)]
        emit_fields(fields)

    # ------------------------------------------------------------ timers

    def _arm(self) -> None:
        """Start the timeout of a wait on the client, with the nearest limit."""
        if self._state != "open":
            return
        now = self.loop.time()
        reason, delay = "Timeout waiting for the client", self.limits.idle_timeout
        if self._data_deadline is not None and self._data_deadline - now < delay:
            reason, delay = "DATA took too long", self._data_deadline - now
        if self._session_deadline - now < delay:
            reason, delay = "Session time limit reached", self._session_deadline - now
        self._reason = reason
        self._timer.set(now + max(delay, 0.0))

    def _timed_out(self, reason: str) -> None:
        self._timer.clear()
        self._shut(Reply(421, f"{reason}, closing connection", "4.4.2"), "timeout")

    # ------------------------------------------------------------ commands

    async def _command(self, line: bytes) -> None:
        """Check one command line against the limits and the state, then run it."""
        if self._overlong:
            self._overlong = False
            self._send(COMMAND_TOO_LONG)
            return
        if self.loop.time() >= self._session_deadline:
            self._timed_out("Session time limit reached")
            return
        name_bytes, _, arg_bytes = line.partition(b" ")
        try:
            name = name_bytes.upper().decode("ascii")
        except UnicodeDecodeError:
            name = ""
        if not name:
            self._send(SYNTAX_ERROR)
            return
        limit = COMMAND_LIMIT + (MAIL_EXTENSIONS if name == "MAIL" and self._esmtp else 0)
        if len(line) > limit:
            self._send(COMMAND_TOO_LONG)
            return
        if (
            self.listener.require_starttls
            and self.tls_context is not None
            and not self._tls
            and name not in _BEFORE_STARTTLS
        ):
            self._send(NEED_STARTTLS)
            return
        run = _COMMANDS.get(name)
        if run is None:
            self._unknown += 1
            if self._unknown >= UNKNOWN_LIMIT:
                self._shut(TOO_MANY_UNKNOWN, "too many unrecognized commands", own=False)
            else:
                self._send(UNKNOWN_COMMAND)
            return
        if b"\x00" in arg_bytes:
            self._send(NUL_IN_COMMAND)
            return
        if _CONTROL.search(arg_bytes):
            # A bare CR in a path would survive into the address (or vanish from it).
            self._send(CONTROL_IN_COMMAND)
            return
        if name in _JUNK:
            self._junk += 1
            if self._junk > self.limits.junk_commands:
                self._errors += 1
        arg = arg_bytes.strip().decode("utf-8", "surrogateescape")
        try:
            await run(self, arg)
        except Exception as exc:
            reply = await self.session.internal_error(exc)
            self._new_transaction()  # the session has dropped its transaction: so do we
            self._send(reply)

    def _new_transaction(self) -> None:
        self._mail = False
        self._smtputf8 = False
        self._rcpts = 0
        self._overshoot = 0

    async def _helo_command(self, arg: str) -> None:
        await self._greeting(arg, esmtp=False)

    async def _ehlo_command(self, arg: str) -> None:
        await self._greeting(arg, esmtp=True)

    async def _greeting(self, hostname: str, esmtp: bool) -> None:
        if not hostname:
            self._send(_syntax(f"{'EHLO' if esmtp else 'HELO'} hostname"))
            return
        if not _PRINTABLE.fullmatch(hostname):
            # RFC 5321 §4.1.1.1: a domain or an address literal. SMTPUTF8 is asked for
            # per MAIL, after the greeting, so a name here is ASCII (A-labels); 8-bit
            # bytes would otherwise land raw in our Received header.
            self._send(BAD_HELO_NAME)
            return
        self._new_transaction()
        refusal = await self.session.helo(hostname, esmtp=esmtp)
        if refusal is not None:
            self._send(refusal)
            return
        self._helo, self._esmtp = hostname, esmtp
        lines = [self.hostname]
        if esmtp:
            lines += [f"SIZE {self.limits.message_size}", "8BITMIME", "SMTPUTF8"]
            if self.tls_context is not None and not self._tls:
                lines.append("STARTTLS")
            lines += ["PIPELINING", "HELP"]
        self._send(Reply(250, "\n".join(lines)))

    def _usage(self, usage: str) -> Reply:
        """The syntax error for MAIL or RCPT, naming parameters in an EHLO session."""
        return _syntax(usage + (" [SP <mail-parameters>]" if self._esmtp else ""))

    def _path(self, arg: str, keyword: str, usage: str) -> _Path | Reply:
        """The address and parameters of MAIL or RCPT, or the reply refusing them."""
        if arg[: len(keyword)].upper() != keyword:
            return self._usage(usage)
        parsed = parse_path(arg[len(keyword) :].strip())
        if parsed is None:
            return MALFORMED_ADDRESS
        address, rest = parsed
        if not address or (rest and not self._esmtp) or not rest.isascii():
            return self._usage(usage)
        options = rest.upper().split()
        try:
            return address, options, parse_parameters(options)
        except ParameterError:
            return self._usage(usage)

    async def _mail_command(self, arg: str) -> None:
        if self._helo is None:
            self._send(NEED_HELO)
            return
        usage = "MAIL FROM:<address>"
        path = self._path(arg, "FROM:", usage)
        if isinstance(path, Reply):
            self._send(path)
            return
        if self._mail:
            self._send(NESTED_MAIL)
            return
        address, options, params = path
        smtputf8 = params.get("SMTPUTF8") is True
        refusal = self._mail_parameters(params) or _eight_bit(address, smtputf8)
        if refusal is not None:
            self._send(refusal)
            return
        reply = await self.session.mail("" if address == "<>" else address, options)
        self._mail = reply.positive
        self._smtputf8 = smtputf8 and reply.positive
        self._send(reply)

    def _mail_parameters(self, params: dict[str, str | bool]) -> Reply | None:
        """The reply refusing MAIL's parameters, or None when they are all fine."""
        if not body_type_ok(params):
            return BAD_BODY
        if not isinstance(params.pop("SMTPUTF8", False), bool):
            return BAD_SMTPUTF8
        params.pop("BODY", None)
        size = params.pop("SIZE", None)
        if size is not None:
            if isinstance(size, bool) or not (size.isascii() and size.isdigit()):
                return _syntax("MAIL FROM:<address> [SP <mail-parameters>]")
            if int(size) > self.limits.message_size:
                return MESSAGE_TOO_BIG
        return MAIL_PARAMETERS if params else None

    async def _rcpt_command(self, arg: str) -> None:
        if self._helo is None:
            self._send(NEED_HELO)
            return
        if not self._mail:
            self._send(NEED_MAIL)
            return
        usage = "RCPT TO:<address>"
        path = self._path(arg, "TO:", usage)
        if isinstance(path, Reply):
            self._send(path)
            return
        address, _, params = path
        if address == "<>":
            self._send(self._usage(usage))
            return
        if params:
            self._send(RCPT_PARAMETERS)
            return
        refusal = _eight_bit(address, self._smtputf8)
        if refusal is not None:
            self._send(refusal)
            return
        reply = await self.session.rcpt(address)
        if reply.positive:
            self._rcpts += 1
        elif reply.code == 452 and reply.status == "4.5.3":
            # "Too many recipients" (ours: limits.recipients, or another route in queue
            # mode; or the upstream's): RFC 5321 §4.5.3.1.10 has the client send them
            # in a later transaction, so they are not errors until the transaction
            # overshoots by limits.recipient_overshoot (Postfix's
            # smtpd_recipient_overshoot_limit).
            self._overshoot += 1
            self._send(reply, count=self._overshoot > self.limits.recipient_overshoot)
            return
        self._send(reply)

    async def _data_command(self, arg: str) -> None:
        if self._helo is None:
            self._send(NEED_HELO)
            return
        if not self._rcpts:
            self._send(NEED_RCPT)
            return
        if arg:
            self._send(_syntax("DATA"))
            return
        refused = self._claim_data()
        if refused is not None:
            reply = OUT_OF_MEMORY if refused.rule == MEMORY_RULE else TOO_MANY_MESSAGES
            self._new_transaction()
            await self.session.refuse_data(reply, record=refused)
            self._send(reply)
            return
        try:
            await self._data_phase()
        finally:
            self._end_data()

    async def _data_phase(self) -> None:
        """354, the message, and the reply to it (the budget is given back by the caller)."""
        self._send(START_DATA)
        message = await self._read_message()
        if message is None:
            return
        self._new_transaction()
        if isinstance(message, Reply):
            record = None
            if message is OUT_OF_MEMORY:
                reason = f"the message passed the budget of {self._memory_cap} bytes in flight"
                record = _limit(MEMORY_RULE, reason)
            await self.session.refuse_data(message, record=record)
            self._send(message)
            return
        # The session gets the only reference, so it can let the bytes go before relaying.
        box = [message]
        del message
        reply = await self.session.data(box.pop())
        if reply.positive:
            self._errors = self._junk = 0  # delivered: a clean slate
        self._send(reply)
        self._flush()

    async def _rset_command(self, arg: str) -> None:
        if arg:
            self._send(_syntax("RSET"))
            return
        self._new_transaction()
        await self.session.rset()
        self._send(OK)

    async def _noop_command(self, arg: str) -> None:
        self._send(OK)

    async def _quit_command(self, arg: str) -> None:
        if arg:
            self._send(_syntax("QUIT"))
            return
        await self.session.rset()
        self._send(BYE)
        self._close()

    async def _vrfy_command(self, arg: str) -> None:
        if not arg:
            self._send(_syntax("VRFY <address>"))
        elif parse_path(arg) is None:
            self._send(BAD_VRFY)
        else:
            self._send(CANNOT_VRFY)

    async def _expn_command(self, arg: str) -> None:
        self._send(NO_EXPN)

    async def _help_command(self, arg: str) -> None:
        unoffered = {"EXPN"} | (set() if self.tls_context else {"STARTTLS"})
        commands = sorted(set(_COMMANDS) - unoffered)
        self._send(Reply(214, "Supported commands: " + " ".join(commands), "2.0.0"))

    async def _starttls_command(self, arg: str) -> None:
        if arg:
            self._send(_syntax("STARTTLS"))
            return
        if self.tls_context is None or self._tls or self.transport is None:
            self._send(TLS_UNAVAILABLE)
            return
        self._send(READY_FOR_TLS)
        self._flush()
        del self._buf[:]  # RFC 3207 §4.2: nothing sent before TLS may count after it
        self._scan = 0
        self._arm()  # the handshake is a wait on the client
        try:
            transport = await self.loop.start_tls(
                self.transport, self, self.tls_context, server_side=True
            )
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("TLS handshake failed: error=%s", exc)
            self._close()
            return
        finally:
            self._timer.clear()
        if transport is None:
            self._close()
            return
        self.transport = transport
        self._tls = True
        self._helo, self._esmtp = None, False  # the client must greet again
        self._new_transaction()
        self.session.tls_started()


def _eight_bit(address: str, smtputf8: bool) -> Reply | None:
    """The refusal of a non-ASCII address: not valid UTF-8, or no SMTPUTF8 (RFC 6531 §3.2)."""
    if address.isascii():
        return None
    try:
        address.encode("utf-8")  # undecodable bytes came in as lone surrogates
    except UnicodeEncodeError:
        return NOT_UTF8
    return None if smtputf8 else NEED_SMTPUTF8


_Command = Callable[[SmtpServer, str], Awaitable[None]]
_COMMANDS: dict[str, _Command] = {
    "HELO": SmtpServer._helo_command,
    "EHLO": SmtpServer._ehlo_command,
    "MAIL": SmtpServer._mail_command,
    "RCPT": SmtpServer._rcpt_command,
    "DATA": SmtpServer._data_command,
    "RSET": SmtpServer._rset_command,
    "NOOP": SmtpServer._noop_command,
    "QUIT": SmtpServer._quit_command,
    "VRFY": SmtpServer._vrfy_command,
    "EXPN": SmtpServer._expn_command,
    "HELP": SmtpServer._help_command,
    "STARTTLS": SmtpServer._starttls_command,
}

_background: set[asyncio.Task[None]] = set()


class _ProxyReader:
    """The reads of ``mailgate.proxyproto.ByteReader``, served from the connection's buffer."""

    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def _until(self, ready: Callable[[bytearray], int]) -> bytes:
        server = self.server
        while (size := ready(server._buf)) < 0:
            if server._eof or server._state != "open":
                raise asyncio.IncompleteReadError(bytes(server._buf), None)
            await server._wait()
        data = bytes(server._buf[:size])
        del server._buf[:size]
        return data

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes."""
        return await self._until(lambda buf: n if len(buf) >= n else -1)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        """Up to and including ``separator``."""

        def ready(buf: bytearray) -> int:
            end = buf.find(separator)
            return end + len(separator) if end >= 0 else -1

        return await self._until(ready)

    async def read(self, n: int = -1) -> bytes:
        """At least one and at most ``n`` bytes."""
        return await self._until(lambda buf: (len(buf) if n < 0 else min(len(buf), n)) or -1)
