"""Listeners: our asyncio servers, one per ``listen:`` entry, each connection an ``SmtpServer``."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable

from mailgate.admission import ConnectionCounter
from mailgate.policy import Listener
from mailgate.runtime import Runtime
from mailgate.session import SmtpSession
from mailgate.smtpserver import SmtpServer
from mailgate.tls import server_context

log = logging.getLogger("mailgate.listener")


class ListenError(Exception):
    """A listening socket could not be opened; the message names the address."""


def address_text(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def os_reason(exc: OSError) -> str:
    """Why a socket could not be opened, in ``os.strerror``'s words (``Address already in use``)."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


def protocol_factory(
    get_runtime: Callable[[], Runtime],
    listener: Listener | None = None,
    tls_context: ssl.SSLContext | None = None,
    counter: ConnectionCounter | None = None,
) -> Callable[[], SmtpServer]:
    """A factory that builds one session and protocol per connection on the current runtime.

    ``tls_context`` is offered with STARTTLS unless the listener is implicit TLS.
    ``counter`` counts open connections for ``limits.connections*`` (share one
    between the listeners of a process).
    """
    listener = listener or Listener()
    counter = counter if counter is not None else ConnectionCounter()
    starttls = tls_context if listener.tls == "starttls" else None

    def factory() -> SmtpServer:
        runtime = get_runtime()
        return SmtpServer(
            SmtpSession(runtime), listener, runtime.policy, counter=counter, tls_context=starttls
        )

    return factory


async def start_listeners(get_runtime: Callable[[], Runtime]) -> list[asyncio.Server]:
    """Open one server per ``listen:`` entry of the current policy."""
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []
    counter = ConnectionCounter()
    for listener in get_runtime().policy.listen:
        host, port = listener.host_port
        context = server_context(**dict(listener.starttls)) if listener.starttls else None
        try:
            server = await loop.create_server(
                protocol_factory(get_runtime, listener, context, counter),
                host,
                port,
                reuse_address=True,
                reuse_port=get_runtime().policy.workers > 1,  # workers share it (SO_REUSEPORT)
                ssl=context if listener.tls == "implicit" else None,
            )
        except OSError as exc:
            for opened in servers:
                opened.close()
            why = os_reason(exc)
            raise ListenError(f"cannot listen on {address_text(host, port)}: {why}") from None
        servers.append(server)
        for sock in server.sockets:
            log.info("listening on address=%s port=%s", *sock.getsockname()[:2])
    return servers
