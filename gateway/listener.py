"""Listeners: our asyncio servers, one per ``listen:`` entry, speaking SMTP via aiosmtpd.

``GatewaySMTP`` subclasses aiosmtpd's ``SMTP`` protocol for what its handler
API lacks: a connect stage before the banner, a hook when the connection is
gone, and replies with enhanced status codes in place of aiosmtpd's canned
ones. It relies on aiosmtpd 1.4.6 internals (``_handle_client``), which is
why that version is pinned.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
import types
from collections.abc import Callable
from typing import Any

import aiosmtpd.smtp

from gateway.admission import ConnectionCounter
from gateway.guard import GuardedSMTP
from gateway.policy import Listener
from gateway.proxyproto import ProxyRefused, real_client
from gateway.runtime import Runtime
from gateway.session import SmtpSession
from gateway.tls import server_context

log = logging.getLogger("mailgate.listener")


# aiosmtpd 1.4.6 builds every connection's protocol with inspect.getmembers() on
# the protocol and the handler and inspect.signature() on the EHLO hook: about
# 60 µs per connection, for answers that depend only on the classes. Its module
# uses nothing else of ``inspect``, so it gets a stand-in that asks once per class.
_auth_names: dict[type, tuple[str, ...]] = {}
_signatures: dict[Any, inspect.Signature] = {}


def _getmembers(obj: object) -> list[tuple[str, Any]]:
    # aiosmtpd keeps only the members named auth_*, its AUTH mechanisms.
    cls = type(obj)
    if cls not in _auth_names:
        _auth_names[cls] = tuple(name for name in dir(cls) if name.startswith("auth_"))
    return [(name, getattr(obj, name)) for name in _auth_names[cls]]


def _signature(func: Callable[..., Any]) -> inspect.Signature:
    key = getattr(func, "__func__", func)  # a bound method's signature is its function's
    if key not in _signatures:
        _signatures[key] = inspect.signature(func)
    return _signatures[key]


aiosmtpd.smtp.inspect = types.SimpleNamespace(  # type: ignore[attr-defined,assignment]
    getmembers=_getmembers, signature=_signature
)

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
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
    "454 TLS not available": "454 4.7.0 TLS not available",
    "502 5.5.1 Too many unrecognized commands, goodbye.": (
        "421 4.7.0 Too many unrecognized commands, closing connection"
    ),
    "503 Error: send EHLO first": "503 5.5.1 Send EHLO first",
    "501 Syntax: HELO hostname": "501 5.5.4 Syntax: HELO hostname",
    "501 Syntax: EHLO hostname": "501 5.5.4 Syntax: EHLO hostname",
    "501 Syntax: MAIL FROM: <address>": "501 5.5.4 Syntax: MAIL FROM:<address>",
    "501 Syntax: MAIL FROM: <address> [SP <mail-parameters>]": (
        "501 5.5.4 Syntax: MAIL FROM:<address> [SP <mail-parameters>]"
    ),
    "501 Syntax: RCPT TO: <address>": "501 5.5.4 Syntax: RCPT TO:<address>",
    "501 Syntax: RCPT TO: <address> [SP <mail-parameters>]": (
        "501 5.5.4 Syntax: RCPT TO:<address> [SP <mail-parameters>]"
    ),
    "501 Syntax: DATA": "501 5.5.4 Syntax: DATA",
    "501 Syntax: RSET": "501 5.5.4 Syntax: RSET",
    "501 Syntax: QUIT": "501 5.5.4 Syntax: QUIT",
    "501 Syntax: STARTTLS": "501 5.5.4 Syntax: STARTTLS",
    "501 Syntax: VRFY <address>": "501 5.5.4 Syntax: VRFY <address>",
    "501 Error: BODY can only be one of 7BIT, 8BITMIME": "501 5.5.4 BODY must be 7BIT or 8BITMIME",
    "501 Error: SMTPUTF8 takes no arguments": "501 5.5.4 SMTPUTF8 takes no arguments",
    "555 MAIL FROM parameters not recognized or not implemented": (
        "555 5.5.4 MAIL FROM parameters not recognized"
    ),
    "555 RCPT TO parameters not recognized or not implemented": (
        "555 5.5.4 RCPT TO parameters not recognized"
    ),
    "502 EXPN not implemented": "502 5.5.1 EXPN not implemented",
    "252 Cannot VRFY user, but will accept message and attempt delivery": (
        "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery"
    ),
    "554 Command refused due to lack of security": "554 5.7.0 Command refused: TLS failed",
}


class GatewaySMTP(GuardedSMTP):
    """aiosmtpd's SMTP protocol with a connect stage and a disconnect event.

    Protocol limits (timeouts, error budget, connection limits, early talkers)
    come from :class:`gateway.guard.GuardedSMTP`.
    """

    def __init__(self, handler: SmtpSession, listener: Listener, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.gateway_session = handler
        self.listener = listener

    async def _handle_client(self) -> None:
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        if self.listener.proxy_protocol:
            try:
                peer = await real_client(self._reader, peer, self.listener)
            except ProxyRefused as exc:
                log.warning("connection from %s refused: %s", peer[0], exc)
                if exc.reply is not None:
                    await self.push(exc.reply.render())
                self.transport.close()
                return
        tls = self.transport.get_extra_info("ssl_object") is not None
        reply = await self.gateway_session.connect(peer, tls=tls)
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


def protocol_factory(
    get_runtime: Callable[[], Runtime],
    listener: Listener | None = None,
    tls_context: ssl.SSLContext | None = None,
    counter: ConnectionCounter | None = None,
) -> Callable[[], GatewaySMTP]:
    """A factory that builds one session and protocol per connection on the current runtime.

    ``tls_context`` is offered with STARTTLS unless the listener is implicit TLS.
    ``counter`` counts open connections for ``limits.connections*`` (share one
    between the listeners of a process).
    """
    listener = listener or Listener()
    counter = counter if counter is not None else ConnectionCounter()
    starttls = tls_context if listener.tls == "starttls" else None

    def factory() -> GatewaySMTP:
        runtime = get_runtime()
        policy = runtime.policy
        return GatewaySMTP(
            SmtpSession(runtime),
            listener,
            policy=policy,
            counter=counter,
            tls_context=starttls,
            require_starttls=listener.require_starttls,
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
    counter = ConnectionCounter()
    for listener in get_runtime().policy.listen:
        host, port = listener.host_port
        context = server_context(**dict(listener.starttls)) if listener.starttls else None
        server = await loop.create_server(
            protocol_factory(get_runtime, listener, context, counter),
            host,
            port,
            reuse_address=True,
            reuse_port=get_runtime().policy.workers > 1,  # workers share the port (SO_REUSEPORT)
            ssl=context if listener.tls == "implicit" else None,
        )
        servers.append(server)
        for sock in server.sockets:
            log.info("listening on %s", sock.getsockname()[:2])
    return servers
