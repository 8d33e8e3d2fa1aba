"""Helpers for testing plugins and policies over real SMTP on loopback.

Shipped with mailgate so that plugin authors test the way mailgate tests
itself: a real gateway built from a policy, in front of a real recording
upstream, spoken to with the standard library's ``smtplib``::

    from mailgate.testing import gateway_harness

    def test_my_plugin(tmp_path):
        policy = {"plugins": {"mine": {"module": "mypkg:MyPlugin"}}}
        with gateway_harness(policy, tmp_path) as h:
            with h.gateway.client() as client:
                client.sendmail("a@example.net", ["b@example.com"], MESSAGE)
            assert b"X-Mine: yes" in h.upstream.messages[0].data

Everything listens on 127.0.0.1 with port 0 (the OS picks a free port). The
gateway and the upstream run on an event loop in a thread; the test talks to
them with blocking ``smtplib`` from its own thread.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from aiosmtpd.smtp import SMTP, Envelope

from mailgate.runtime import Runtime
from mailgate.server import Gateway
from mailgate.yamlsource import load

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Stop the loop and join its thread."""

        async def _drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(_drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class Received:
    """One message as the upstream received it."""

    sender: str
    recipients: list[str]
    data: bytes


@dataclass
class UpstreamBehaviour:
    """How the recording upstream answers; tests change these between messages."""

    mail_reply: str | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_command_reply: str | None = None
    """The reply to the DATA command itself (instead of 354)."""
    data_reply: str | None = None
    data_delay: float = 0.0
    drop_at_data: bool = False


class _RecordingHandler:
    def __init__(self, upstream: RecordingUpstream) -> None:
        self.up = upstream

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.up.mail_commands += 1
        reply = self.up.behaviour.mail_reply
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender ok"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.up.behaviour.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        behaviour = self.up.behaviour
        if behaviour.data_delay:
            await asyncio.sleep(behaviour.data_delay)
        if behaviour.drop_at_data:
            server.transport.close()
            return "421 4.3.0 dropped"
        if behaviour.data_reply:
            return behaviour.data_reply
        self.up.messages.append(
            Received(
                envelope.mail_from or "", list(envelope.rcpt_tos), envelope.original_content or b""
            )
        )
        return f"250 2.0.0 Ok: queued as {len(self.up.messages)}"

    async def handle_RSET(self, server: Any, session: Any, envelope: Envelope) -> str:
        self.up.rsets += 1
        return "250 2.0.0 Ok"


class _CountingSMTP(SMTP):
    def __init__(self, upstream: RecordingUpstream, **kwargs: Any) -> None:
        super().__init__(_RecordingHandler(upstream), **kwargs)
        self.up = upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:
            self.up.connections += 1
        super().connection_made(transport)

    async def smtp_DATA(self, arg: str) -> None:
        """DATA, unless the behaviour refuses the command itself."""
        reply = self.up.behaviour.data_command_reply
        if reply and self.envelope is not None and self.envelope.rcpt_tos:
            await self.push(reply)
            return
        await super().smtp_DATA(arg)


class RecordingUpstream:
    """A real SMTP server (aiosmtpd) on 127.0.0.1:0 that records what it receives."""

    def __init__(self, loop_thread: LoopThread) -> None:
        self.loop_thread = loop_thread
        self.behaviour = UpstreamBehaviour()
        self.messages: list[Received] = []
        self.connections = 0
        self.mail_commands = 0
        self.rsets = 0
        self.server: asyncio.Server | None = None
        self._reserved: socket.socket | None = None
        self.port = 0
        self.start()

    def start(self) -> None:
        """Listen (again, on the same port after :meth:`stop`)."""
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None

        async def _start() -> asyncio.Server:
            loop = asyncio.get_running_loop()
            return await loop.create_server(lambda: self.protocol(loop), "127.0.0.1", self.port)

        self.server = self.loop_thread.run(_start())
        self.port = self.server.sockets[0].getsockname()[1]

    def protocol(self, loop: asyncio.AbstractEventLoop) -> SMTP:
        """The server side of one connection (a subclass may serve another way)."""
        return _CountingSMTP(self, hostname="upstream.test", loop=loop)

    def stop(self) -> None:
        """Stop listening: new connections are refused.

        The port stays bound (not listening) until :meth:`start`, so that no
        other listener gets it meanwhile: a gateway started after this on port
        0 could otherwise be handed the same port and relay to itself.
        """
        if self.server is not None:
            server, self.server = self.server, None

            async def _close() -> None:
                # On the loop's own thread: asyncio.Server is not thread-safe.
                server.close()
                await server.wait_closed()

            self.loop_thread.run(_close())
            self._reserved = socket.socket()
            self._reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._reserved.bind(("127.0.0.1", self.port))

    def close(self) -> None:
        """Stop listening and give the port back."""
        self.stop()
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None

    @property
    def url(self) -> str:
        """The ``smtp://`` URL for the policy's ``upstream``."""
        return f"smtp://127.0.0.1:{self.port}"


class RunningGateway:
    """mailgate, started from a policy on the loop thread, listening on 127.0.0.1:0."""

    def __init__(self, loop_thread: LoopThread, policy_path: Path) -> None:
        self.loop_thread = loop_thread
        self.policy_path = policy_path
        doc = load(policy_path.read_text(), str(policy_path))
        self.runtime = Runtime.from_document(doc)
        self.gateway = Gateway(self.runtime)
        loop_thread.run(self.gateway.start())
        self.port = self.gateway.addresses[0][1]

    def client(self, helo: str = "client.example.net", timeout: float = 10) -> smtplib.SMTP:
        """A connected smtplib client that has already said EHLO."""
        client = smtplib.SMTP("127.0.0.1", self.port, timeout=timeout)
        client.ehlo(helo)
        return client

    def stop(self) -> None:
        """Close the listeners and stop the runtime."""
        self.loop_thread.run(self.gateway.stop())


def write_policy(path: Path, policy: dict[str, Any]) -> Path:
    """Write ``policy`` as YAML, forcing the listener onto 127.0.0.1:0."""
    policy = {"hostname": "mailgate.test", "listen": [{"address": "127.0.0.1:0"}], **policy}
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


MESSAGE = (
    b"From: Alice <alice@example.net>\r\n"
    b"To: Bob <bob@example.com>\r\n"
    b"Subject: hello\r\n"
    b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.net>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
    b".leading dot stays\r\n"
)


@dataclass
class Harness:
    """What :func:`gateway_harness` yields: the running gateway and its upstream."""

    gateway: RunningGateway
    upstream: RecordingUpstream


@contextmanager
def gateway_harness(policy: dict[str, Any], workdir: Path) -> Iterator[Harness]:
    """Run a gateway from ``policy`` in front of a recording upstream, then stop both.

    ``upstream`` defaults to the recording upstream and ``domains`` to
    ``[example.com]``; the policy file is written into ``workdir``.
    """
    loop_thread = LoopThread()
    upstream = RecordingUpstream(loop_thread)
    gateway = None
    try:
        policy = {"upstream": upstream.url, "domains": ["example.com"], **policy}
        gateway = RunningGateway(loop_thread, write_policy(workdir / "policy.yaml", policy))
        yield Harness(gateway, upstream)
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.close()
        loop_thread.stop()
