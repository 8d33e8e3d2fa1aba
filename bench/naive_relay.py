"""The naive relay: Python done the obvious way, the floor mailgate is measured against.

aiosmtpd takes the message, and at end of DATA aiosmtplib's ``sendmail`` sends
it to the upstream; the client gets 250 only if the upstream took it. No
plugins, no policy, no per-recipient lockstep, no logging. Two things make it
a fair floor rather than a straw man: idle upstream connections are reused
(the one optimisation everybody adds), and it runs on uvloop when installed,
like mailgate.

Run: ``python -m bench.naive_relay LISTEN_PORT UPSTREAM_PORT``.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP


class NaiveRelay:
    """An aiosmtpd handler that relays each message with aiosmtplib."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.idle: list[aiosmtplib.SMTP] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Send the message upstream; answer with the outcome."""
        client = self.idle.pop() if self.idle else None
        if client is None or not client.is_connected:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.upstream_port, start_tls=False)
            try:
                await client.connect()
            except (aiosmtplib.SMTPException, OSError):
                return "451 4.4.1 Upstream unavailable"
        try:
            await client.sendmail(envelope.mail_from, envelope.rcpt_tos, envelope.original_content)
        except aiosmtplib.SMTPException:
            client.close()
            return "451 4.4.2 Upstream failed"
        self.idle.append(client)
        return "250 2.0.0 Ok: relayed"


async def serve(port: int, upstream_port: int) -> None:
    """Listen on 127.0.0.1:``port`` until killed."""
    handler = NaiveRelay(upstream_port)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="naive.bench", enable_SMTPUTF8=True), "127.0.0.1", port
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    """Entry point: ``python -m bench.naive_relay LISTEN_PORT UPSTREAM_PORT``."""
    port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(port, upstream_port))
    else:
        uvloop.run(serve(port, upstream_port))


if __name__ == "__main__":
    main()
