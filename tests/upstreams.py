"""Recording upstreams with extras: STARTTLS, and XCLIENT/XFORWARD as Postfix specifies them.

``TlsUpstream`` requires STARTTLS before MAIL, so a delivered message proves
the gateway used TLS. ``XclientUpstream`` implements the server side of
Postfix's XCLIENT_README and XFORWARD_README: XCLIENT (only outside a
transaction; attributes ``NAME ADDR PORT PROTO HELO`` as xtext; ``220`` and
back to the greeting stage, so EHLO is needed again; ``550 5.7.0`` when not
authorized; ``501`` on a bad attribute) and XFORWARD (``250``; the attributes
apply to the next transaction only). It is used where a real Postfix is not
installed, and for the refusals that a correctly configured Postfix never gives.
``ScriptedUpstream`` is a bare SMTP server whose reply to the message a test
sets (malformed replies, a slow one).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiosmtpd.smtp import SMTP

from mailgate.testing import LoopThread, Received, RecordingUpstream, _RecordingHandler

_ATTRIBUTES = {"NAME", "ADDR", "PORT", "PROTO", "HELO"}


def xtext_decode(value: str) -> str:
    """RFC 3461 xtext to text."""
    out, i = bytearray(), 0
    while i < len(value):
        if value[i] == "+":
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
        else:
            out += value[i].encode()
            i += 1
    return out.decode()


class _CountingSMTP(SMTP):
    def __init__(self, upstream: RecordingUpstream, handler: object, **kwargs: Any) -> None:
        super().__init__(handler, hostname="upstream.test", **kwargs)
        upstream.connections += 1


class TlsUpstream(RecordingUpstream):
    """Requires STARTTLS (with ``cert``/``key``) before it takes MAIL."""

    def __init__(self, loop_thread: LoopThread, cert: str, key: str) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        super().__init__(loop_thread)

    def protocol(self, loop: asyncio.AbstractEventLoop) -> SMTP:
        """STARTTLS offered and required."""
        return _CountingSMTP(
            self,
            _RecordingHandler(self),
            loop=loop,
            tls_context=self.context,
            require_starttls=True,
        )


class _XclientHandler(_RecordingHandler):
    def __init__(self, upstream: XclientUpstream) -> None:
        super().__init__(upstream)
        self.xup = upstream

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        extra = []
        # Like Postfix, advertise XCLIENT only to an authorized client: once we act as
        # someone else (after XCLIENT), that someone is not authorized.
        if self.xup.offer_xclient and not server.xclient:
            extra.append("250-XCLIENT NAME ADDR PORT PROTO HELO")
        if self.xup.offer_xforward:
            extra.append("250-XFORWARD NAME ADDR PORT PROTO HELO")
        return responses[:-1] + extra + responses[-1:]

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.xup.seen.append({"xclient": dict(server.xclient), "xforward": dict(server.xforward)})
        server.xforward.clear()
        return await super().handle_MAIL(server, session, envelope, address, options)


class _XclientSMTP(_CountingSMTP):
    def __init__(self, upstream: XclientUpstream, **kwargs: Any) -> None:
        super().__init__(upstream, _XclientHandler(upstream), **kwargs)
        self.xup = upstream
        self.xclient: dict[str, str] = {}
        self.xforward: dict[str, str] = {}

    def _attributes(self, arg: str) -> dict[str, str] | None:
        attrs = {}
        for item in arg.split():
            name, sep, value = item.partition("=")
            if not sep or name.upper() not in _ATTRIBUTES:
                return None
            attrs[name.upper()] = xtext_decode(value)
        return attrs or None

    async def smtp_XCLIENT(self, arg: str) -> None:
        self.xup.commands.append(f"XCLIENT {arg}")
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        if not self.xup.authorize_xclient or self.xclient:
            await self.push("550 5.7.0 Error: insufficient authorization")
            return
        attrs = self._attributes(arg)
        if attrs is None:
            await self.push("501 5.5.4 Bad XCLIENT attribute")
            return
        self.xclient = attrs
        self._set_rset_state()
        self.session.host_name = None  # back to the greeting stage: EHLO again
        await self.push("220 upstream.test ESMTP")

    async def smtp_XFORWARD(self, arg: str) -> None:
        self.xup.commands.append(f"XFORWARD {arg}")
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        attrs = self._attributes(arg)
        if attrs is None:
            await self.push("501 5.5.4 Bad XFORWARD attribute")
            return
        self.xforward.update(attrs)
        await self.push("250 2.0.0 Ok")


class XclientUpstream(RecordingUpstream):
    """Offers XCLIENT and/or XFORWARD; records every such command and, per MAIL, what was set."""

    def __init__(
        self,
        loop_thread: LoopThread,
        *,
        offer_xclient: bool = True,
        offer_xforward: bool = True,
        authorize_xclient: bool = True,
    ) -> None:
        self.offer_xclient = offer_xclient
        self.offer_xforward = offer_xforward
        self.authorize_xclient = authorize_xclient
        self.commands: list[str] = []
        self.seen: list[dict[str, dict[str, str]]] = []
        super().__init__(loop_thread)

    def protocol(self, loop: asyncio.AbstractEventLoop) -> SMTP:
        """An SMTP server that understands XCLIENT and XFORWARD."""
        return _XclientSMTP(self, loop=loop)


class ScriptedUpstream(RecordingUpstream):
    """A minimal SMTP upstream on 127.0.0.1:0 whose end-of-data reply is set by the test.

    Only its server differs from the harness's recording upstream (stop, url).
    """

    def __init__(self, loop_thread: LoopThread) -> None:
        self.data_reply = b"250 2.0.0 Ok: queued"
        self.data_delay = 0.0
        self.commands: list[bytes] = []
        self.closed = 0
        super().__init__(loop_thread)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 scripted.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                line = line.rstrip(b"\r\n")
                self.commands.append(line)
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-scripted.test\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go on\r\n")
                    data = await reader.readuntil(b"\r\n.\r\n")
                    self.messages.append(Received("", [], data))
                    await asyncio.sleep(self.data_delay)
                    writer.write(self.data_reply + b"\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed += 1
            writer.close()

    def start(self) -> None:
        """Listen on a port the OS picks."""

        async def _start() -> asyncio.Server:
            return await asyncio.start_server(self._serve, "127.0.0.1", 0)

        self.server = self.loop_thread.run(_start())
        self.port = self.server.sockets[0].getsockname()[1]
