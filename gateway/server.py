"""The gateway process: load the policy, start plugins and listeners, serve until told to stop.

``Gateway.current`` is the runtime new connections get; sessions keep the
runtime they started with, so replacing ``current`` is an atomic policy swap.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from gateway.listener import start_listeners
from gateway.runtime import Runtime

log = logging.getLogger("mailgate")


class Gateway:
    """A running mailgate: its current runtime and its listening servers."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime
        self.servers: list[asyncio.Server] = []
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        """Start the plugins, then open the listeners."""
        await self.current.start()
        self.servers = await start_listeners(lambda: self.current)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) of every listening socket, ports resolved."""
        return [sock.getsockname()[:2] for s in self.servers for sock in s.sockets]

    def request_stop(self) -> None:
        """Ask :meth:`serve` to return."""
        self._stopping.set()

    async def serve(self) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`request_stop`), then shut down."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self._stopping.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()

    async def stop(self) -> None:
        """Close the listeners and stop the plugins and upstream."""
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        self.servers = []
        await self.current.stop()
        log.info("stopped")
