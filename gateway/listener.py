"""Listeners: our asyncio servers, one per ``listen:`` entry, speaking SMTP via aiosmtpd.

``GatewaySMTP`` subclasses aiosmtpd's ``SMTP`` protocol for what its handler
API lacks: a connect stage before the banner, a hook when the connection is
gone, and replies with enhanced status codes in place of aiosmtpd's canned
ones. It relies on aiosmtpd 1.4.6 internals (``_handle_client``), which is
why that version is pinned.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP

from gateway.runtime import Runtime
from gateway.session import SmtpSession

log = logging.getLogger("mailgate.listener")

# aiosmtpd's own replies, rewritten to carry RFC 3463 enhanced status codes.
REPLY_REWRITES: dict[str, str] = {
    "552 Error: Too much mail data": "552 5.3.4 Message too big",
    "552 Error: message size exceeds fixed maximum message size": "552 5.3.4 Message too big",
    "503 Error: need MAIL command": "503 5.5.1 Need MAIL command",
    "503 Error: need RCPT command": "503 5.5.1 Need RCPT command",
    "503 Error: nested MAIL command": "503 5.5.1 Nested MAIL command",
    "503 Error: send HELO first": "503 5.5.1 Send HELO/EHLO first",
    "553 5.1.3 Error: malformed address": "553 5.1.3 Malformed address",
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long",
    "500 Command line too long": "500 5.5.2 Command line too long",
    "500 Error: bad syntax": "500 5.5.2 Syntax error",
    "250 OK": "250 2.0.0 Ok",
}


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP protocol with a connect stage and a disconnect event."""

    def __init__(self, handler: SmtpSession, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.gateway_session = handler

    async def _handle_client(self) -> None:
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        reply = await self.gateway_session.connect(peer)
        if reply is not None:
            await self.push(reply.render())
            self.transport.close()
            return
        await super()._handle_client()

    async def push(self, status: str) -> None:  # type: ignore[override]
        """Send a reply, rewriting aiosmtpd's bare canned replies to carry enhanced codes."""
        await super().push(REPLY_REWRITES.get(status, status))

    def connection_lost(self, error: Exception | None) -> None:
        """Let the session close out its transaction and tell the plugins."""
        super().connection_lost(error)
        task = asyncio.get_running_loop().create_task(self.gateway_session.disconnected())
        _background.add(task)
        task.add_done_callback(_background.discard)


_background: set[asyncio.Task[None]] = set()


def protocol_factory(get_runtime: Callable[[], Runtime]) -> Callable[[], GatewaySMTP]:
    """A factory that builds one session and protocol per connection on the current runtime."""

    def factory() -> GatewaySMTP:
        runtime = get_runtime()
        policy = runtime.policy
        return GatewaySMTP(
            SmtpSession(runtime),
            hostname=policy.hostname,
            ident="ESMTP mailgate",
            data_size_limit=policy.limits.message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=policy.limits.idle_timeout,
            auth_exclude_mechanism=["LOGIN", "PLAIN"],
            loop=asyncio.get_running_loop(),
        )

    return factory


async def start_listeners(get_runtime: Callable[[], Runtime]) -> list[asyncio.Server]:
    """Open one server per ``listen:`` entry of the current policy."""
    loop = asyncio.get_running_loop()
    servers = []
    for listener in get_runtime().policy.listen:
        host, port = listener.host_port
        server = await loop.create_server(
            protocol_factory(get_runtime), host, port, reuse_address=True
        )
        servers.append(server)
        for sock in server.sockets:
            log.info("listening on %s", sock.getsockname()[:2])
    return servers
