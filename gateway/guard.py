"""Protocol limits on one SMTP connection: timeouts, error budget, admission, early talkers.

``GuardedSMTP`` is aiosmtpd's ``SMTP`` protocol with the limits a public MX
needs; the listener's ``GatewaySMTP`` builds on it. What it enforces, and the
reply each limit gives (``docs/protocol.md`` explains the choices):

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
  commit), so no timeout ever cancels an upstream commit half-way; aiosmtpd's
  own idle timer, which does, is replaced. On expiry: ``421 4.4.2`` and disconnect.
- **Error budget**: every 4xx/5xx reply counts, and so does every NOOP, RSET
  or VRFY past ``limits.junk_commands``; at ``limits.errors`` the client gets
  ``421 4.7.0`` and is disconnected, without another pipelined command being
  run. A delivered message resets both counts.
- **Commands**: a NUL byte in a command's argument gets ``501 5.5.2``; command
  lines are limited to 512 octets (plus the 26 + 10 that SIZE and SMTPUTF8
  add to MAIL, per RFC 1870/6531) and each connection keeps its own limits
  (aiosmtpd shares them between connections). ``PIPELINING`` is advertised.
- **Lines**: ``limits.line_length`` replaces aiosmtpd's 1001-octet line limit.

It relies on aiosmtpd 1.4.6 internals (``_reset_timeout``, ``_timeout_handle``,
``_call_handler_hook``, ``_handler_coroutine``, the reader's ``_buffer``),
which is why that version is pinned.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import SMTP, syntax

from gateway.admission import TOO_MANY_CONNECTIONS, TOO_MANY_FROM_YOU, ConnectionCounter
from gateway.context import IPAddress, VerdictRecord
from gateway.decisionlog import format_fields, log_connection
from gateway.policy import Policy
from gateway.proxyproto import peer_ip
from gateway.session import SmtpSession
from gateway.verdict import Reply

# Connections refused before a session exists get their decision line here.
log = logging.getLogger("mailgate.decision")

EARLY_TALKER = Reply(554, "Protocol error: you talked before the greeting", "5.5.1")
TOO_MANY_ERRORS = Reply(421, "Too many errors, closing connection", "4.7.0")
NUL_IN_COMMAND = Reply(501, "Syntax error: NUL byte in command", "5.5.2")

# aiosmtpd replies that embed what the client sent; the fixed ones are in
# gateway.listener.REPLY_REWRITES.
_PREFIX_REWRITES = (
    ('500 Error: command "', "500 5.5.1 Command unrecognized"),
    ("502 Could not VRFY ", "502 5.5.4 Could not VRFY that address"),
)
_JUNK = frozenset({"NOOP", "RSET", "VRFY"})


def _rewrite(status: str) -> str:
    for prefix, replacement in _PREFIX_REWRITES:
        if status.startswith(prefix):
            return replacement
    return status


def _has_nul(args: tuple[Any, ...]) -> bool:
    values = [a for arg in args for a in (arg if isinstance(arg, list) else [arg])]
    return any(isinstance(v, str) and "\x00" in v for v in values)


class GuardedSMTP(SMTP):
    """aiosmtpd's SMTP protocol with connection, time, error and command limits."""

    def __init__(
        self,
        handler: SmtpSession,
        *,
        policy: Policy,
        counter: ConnectionCounter | None = None,
        **kwargs: Any,
    ) -> None:
        # Both are read by SMTP.__init__: per-connection, not aiosmtpd's class-wide values.
        self.line_length_limit = policy.limits.line_length
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(handler, **kwargs)
        self.policy = policy
        self.counter = counter if counter is not None else ConnectionCounter()
        self.guarded_session = handler
        self._state = "new"  # then refused (at accept) or counted, closing, released
        self._claimed: IPAddress | None = None
        self._greeted = False
        self._errors = 0
        self._junk = 0
        self._accepted_at = 0.0
        self._session_deadline = math.inf
        self._data_deadline: float | None = None
        self._awaiting_data_reply = False
        self._held: list[str] = []  # the first lines of a multi-line reply, not yet sent

    @property
    def _finished(self) -> bool:
        """True once the connection is being closed: no more replies, no more commands."""
        return self._state in ("closing", "released")

    # ------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection (refusing it past ``limits.connections``), then serve it."""
        if self._state == "new":  # not the TLS layer arriving after STARTTLS
            if not self.counter.open(self.policy.limits.connections):
                self._state = "refused"
                reply = self._own(TOO_MANY_CONNECTIONS)
                cast(asyncio.WriteTransport, transport).write(f"{reply.render()}\r\n".encode())
                transport.close()
                peer = transport.get_extra_info("peername")
                client = peer[0] if isinstance(peer, tuple) else "-"
                self._log_refusal(client, "too many connections", reply)
                return
            self._state = "counted"
            self._accepted_at = self.loop.time()
            self._session_deadline = self._accepted_at + self.policy.limits.session_timeout
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        """Give back the connection's slots (once: aiosmtpd may call this twice)."""
        if self._state == "refused":
            return  # aiosmtpd never saw this connection
        if self._state != "released":
            self._state = "released"
            self.counter.close()
            if self._claimed is not None:
                self.counter.release(self._claimed)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        """Feed the reader; in DATA, more data restarts the idle part of the timer."""
        super().data_received(data)
        if self._data_deadline is not None:
            self._arm()

    # ------------------------------------------------------------ timers

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's idle timer, replaced: a command has arrived, so the timer stops.

        aiosmtpd calls this at connect and before running each valid command.
        """
        if duration is not None:  # aiosmtpd waiting for its own PROXY header
            self._arm(duration)
            return
        self._stop_timer()
        if self._greeted and self.loop.time() >= self._session_deadline:
            self._timed_out("Session time limit reached")

    def _stop_timer(self) -> None:
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        else:  # aiosmtpd's connection_lost expects a handle
            self._timeout_handle = self.loop.call_later(3600, lambda: None)
            self._timeout_handle.cancel()

    def _arm(self, duration: float | None = None) -> None:
        """Start the timer for a wait on the client, with the nearest limit."""
        if self._finished:
            return
        now = self.loop.time()
        reason = "Timeout waiting for the client"
        delay = duration if duration is not None else self.policy.limits.idle_timeout
        if self._data_deadline is not None and self._data_deadline - now < delay:
            delay, reason = self._data_deadline - now, "DATA took too long"
        if self._session_deadline - now < delay:
            delay, reason = self._session_deadline - now, "Session time limit reached"
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._timeout_handle = self.loop.call_later(max(delay, 0.0), self._timed_out, reason)

    def _timed_out(self, reason: str) -> None:
        self._shut(Reply(421, f"{reason}, closing connection", "4.4.2"), "timeout")

    # ------------------------------------------------------------ closing

    def _own(self, reply: Reply) -> Reply:
        """``reply`` with our hostname first, as RFC 5321 asks of 421 and 554 greetings."""
        return Reply(reply.code, f"{self.hostname} {reply.text}", reply.status)

    def _shut(self, reply: Reply, outcome: str) -> None:
        """Send ``reply``, close the connection and stop running commands."""
        if self._finished or self.transport is None:
            return
        self._state = "closing"
        reply = self._own(reply)
        self._writer.write(f"{reply.render()}\r\n".encode())
        self.transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        session = self.guarded_session.session
        if session is not None:
            log_connection(session, outcome=outcome, reply=reply)
        else:
            self._log_refusal("-", outcome, reply)

    @staticmethod
    def _log_refusal(client: str, outcome: str, reply: Reply) -> None:
        fields = [("session", "-"), ("client", client), ("outcome", outcome), ("reply", reply)]
        log.info(format_fields(fields))

    # ------------------------------------------------------------ replies

    async def push(self, status: AnyStr) -> None:
        """Send a reply; count errors, start the wait timer, gate the greeting."""
        if self._finished:
            return  # a pipelined command after our 421: nothing more is said
        text = status if isinstance(status, str) else status.decode("utf-8", "replace")
        text = _rewrite(text)
        last = text.rpartition("\n")[2]
        if last[3:4] == "-" and isinstance(status, str):
            # aiosmtpd pushes EHLO's reply a line at a time: send the lines in one write.
            self._held.append(text)
            return
        if not self._greeted and text.startswith("220 "):
            self._greeted = True
            if await self._before_greeting():
                return
        held: list[str] = self._held
        self._held = []
        if isinstance(status, str):
            await super().push("\r\n".join([*held, text]))
        else:
            if held:
                await super().push("\r\n".join(held))
            await super().push(status)
        if last[3:4] == "-":
            return  # more lines of this reply follow
        code = last[:3]
        self._data_deadline = None
        if code == "354":
            self._data_deadline = self.loop.time() + self.policy.limits.data_timeout
        elif self._awaiting_data_reply and code.startswith("2"):
            self._errors = self._junk = 0  # delivered: a clean slate
        self._awaiting_data_reply = False
        if code[:1] in ("4", "5") and code != "421":
            self._errors += 1
        if self._errors >= self.policy.limits.errors:
            self._shut(TOO_MANY_ERRORS, "too many errors")
            return
        self._arm()

    async def _before_greeting(self) -> bool:
        """Note our address; per-address limit, greet delay, early talker; True if refused."""
        session = self.guarded_session.session
        if session is None:
            return False
        assert self.transport is not None
        local = self.transport.get_extra_info("sockname")
        if isinstance(local, tuple):
            session.local_ip = peer_ip(local)
        if session.trusted:
            return False
        if not self.counter.claim(session.client_ip, self.policy.limits.connections_per_ip):
            self._shut(TOO_MANY_FROM_YOU, "too many connections from client")
            return True
        self._claimed = session.client_ip
        mode = self.policy.protocol.early_talker
        if mode == "off":
            return False
        wait = self.policy.protocol.greet_delay - (self.loop.time() - self._accepted_at)
        if wait > 0:
            await super().push(f"220-{self.hostname} {self.__ident__}")
            await asyncio.sleep(wait)
        # Bytes already buffered are bytes the client sent before our greeting.
        if not getattr(self._reader, "_buffer", b""):
            return False
        enforced = mode == "reject"
        reason = "client sent data before the greeting"
        session.card.verdicts.append(
            VerdictRecord("core", "on_connect", "protocol.early_talker", "reject", reason, enforced)
        )
        if not enforced:
            log_connection(session, outcome="early talker (monitor)")
            return False
        self._shut(EARLY_TALKER, "early talker")
        return True

    # ------------------------------------------------------------ commands

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        """Run the handler's hook for ``command``, unless the command must be refused."""
        if command == "DATA":  # the message is in: the gateway works now, no timer
            self._data_deadline = None
            self._stop_timer()
            self._awaiting_data_reply = True
        refusal: str | None = None
        if self._finished:
            refusal = ""  # pushed into the void; the connection is going
        elif _has_nul(args):
            refusal = NUL_IN_COMMAND.render()
        if refusal is not None:
            return [refusal] if command == "EHLO" else refusal
        if command in _JUNK:
            self._junk += 1
            if self._junk > self.policy.limits.junk_commands:
                self._errors += 1
        if command == "EHLO":
            responses: list[str] = args[1]
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return await super()._call_handler_hook(command, *args)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        """EHLO, with MAIL's length allowance (SIZE, SMTPUTF8) counted once per connection."""
        self.command_size_limits.clear()
        await super().smtp_EHLO(hostname)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """STARTTLS; after the handshake, wait for the client's next command under the timer."""
        await super().smtp_STARTTLS(arg)
        if self.transport is not None:
            self._arm()
