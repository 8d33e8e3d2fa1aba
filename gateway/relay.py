"""In-line relay: one upstream SMTP transaction per client transaction, in lockstep.

When MAIL passes the local checks the session checks out a pooled upstream
connection and forwards MAIL; each RCPT that passes is forwarded and the
upstream's own reply goes back to the client; at end of DATA the message goes
upstream and the client gets the upstream's reply. So the gateway never says
250 for mail that the upstream has not taken, and needs no queue.

A connection goes back to the pool only after a clean RSET. After any error,
timeout or cancellation it is closed and never reused. An upstream that is
down, slow or drops the connection gives the client a 4xx.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Protocol

import aiosmtplib

from gateway.policy import Upstream as UpstreamConfig
from gateway.verdict import Reply

log = logging.getLogger("mailgate.relay")

UNAVAILABLE = Reply(451, "Upstream server unavailable, try again later", "4.4.1")
TIMED_OUT = Reply(451, "Upstream server timed out, try again later", "4.4.2")
BROKEN = Reply(451, "Upstream connection failed, try again later", "4.4.2")


class UpstreamTransaction(Protocol):
    """One mail transaction with the upstream: the steps the session drives."""

    async def mail(self, sender: str, options: list[str]) -> Reply:
        """Send MAIL FROM; a 4xx/5xx reply ends the transaction."""

    async def rcpt(self, recipient: str) -> Reply:
        """Send one RCPT TO and return the upstream's reply."""

    async def data(self, message: bytes) -> Reply:
        """Send the message; the transaction is over whatever the reply."""

    async def reset(self) -> None:
        """Abandon the transaction cleanly (RSET) and free the connection."""

    def abort(self) -> None:
        """Abandon the transaction at once: close the connection, never reuse it."""


class Upstream(Protocol):
    """Where accepted mail goes."""

    def begin(self) -> UpstreamTransaction:
        """Start a transaction; nothing is sent until ``mail``."""

    async def close(self) -> None:
        """Close every idle connection."""


def _reply_from(exc: aiosmtplib.SMTPResponseException) -> Reply:
    code = exc.code
    if code == 421:
        # 421 tells the client we are closing; we are not, the upstream is.
        return Reply(451, exc.message or "Upstream closed the connection", "")
    return Reply(code, exc.message, "")


def _reply(response: aiosmtplib.SMTPResponse) -> Reply:
    return Reply(response.code, response.message, "")


class _Connection:
    __slots__ = ("client", "idle_since")

    def __init__(self, client: aiosmtplib.SMTP) -> None:
        self.client = client
        self.idle_since = time.monotonic()


class SmtpUpstream:
    """A pool of aiosmtplib connections to one upstream server."""

    def __init__(self, config: UpstreamConfig, local_hostname: str) -> None:
        self.config = config
        self.local_hostname = local_hostname
        self.host, self.port = config.host_port
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(config.max_connections)
        self._tls_context = self._make_tls_context()

    def _make_tls_context(self) -> ssl.SSLContext | None:
        if self.config.starttls == "off":
            return None
        context = ssl.create_default_context(cafile=self.config.ca_file)
        if not self.config.verify_certificate or self.config.starttls == "opportunistic":
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def begin(self) -> SmtpTransaction:
        """Start a transaction; a connection is checked out at ``mail``."""
        return SmtpTransaction(self)

    async def _connect(self) -> _Connection:
        start_tls = {"off": False, "opportunistic": None, "required": True}[self.config.starttls]
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            local_hostname=self.local_hostname,
            timeout=self.config.connect_timeout,
            start_tls=start_tls,
            tls_context=self._tls_context,
            validate_certs=self._tls_context is not None and self.config.verify_certificate,
        )
        await client.connect()
        client.timeout = self.config.timeout
        return _Connection(client)

    async def checkout(self) -> tuple[_Connection, bool]:
        """An open connection and whether it was reused from the pool."""
        async with asyncio.timeout(self.config.connect_timeout):
            await self._slots.acquire()
        try:
            now = time.monotonic()
            while self._idle:
                conn = self._idle.pop()
                if conn.client.is_connected and now - conn.idle_since < self.config.idle_timeout:
                    return conn, True
                conn.client.close()
            return await self._connect(), False
        except BaseException:
            self._slots.release()
            raise

    def checkin(self, conn: _Connection) -> None:
        """Return a clean connection to the pool (or close it if the pool is full)."""
        self._slots.release()
        if conn.client.is_connected and len(self._idle) < self.config.pool_size:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.client.close()

    def discard(self, conn: _Connection) -> None:
        """Close a connection whose state is unknown; it is never reused."""
        self._slots.release()
        conn.client.close()

    async def close(self) -> None:
        """Close every idle connection politely."""
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                async with asyncio.timeout(2):
                    await conn.client.quit()
            except (aiosmtplib.SMTPException, TimeoutError, OSError):
                conn.client.close()


class SmtpTransaction:
    """One transaction on one pooled connection, driven step by step by the session."""

    def __init__(self, upstream: SmtpUpstream) -> None:
        self.upstream = upstream
        self.conn: _Connection | None = None

    def _release(self, clean: bool) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            if clean:
                self.upstream.checkin(conn)
            else:
                self.upstream.discard(conn)

    async def mail(self, sender: str, options: list[str]) -> Reply:
        """Check out a connection and send MAIL FROM (retrying once on a stale pooled one)."""
        for _attempt in range(2):
            try:
                conn, reused = await self.upstream.checkout()
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                log.warning(
                    "upstream %s:%s unavailable: %s", self.upstream.host, self.upstream.port, exc
                )
                return UNAVAILABLE
            self.conn = conn
            encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
            try:
                return _reply(await conn.client.mail(sender, options=options, encoding=encoding))
            except aiosmtplib.SMTPResponseException as exc:
                await self.reset()
                return _reply_from(exc)
            except aiosmtplib.SMTPServerDisconnected:
                self._release(clean=False)
                if reused:
                    continue
                return BROKEN
            except BaseException as exc:
                self._release(clean=False)
                if isinstance(exc, aiosmtplib.SMTPTimeoutError):
                    return TIMED_OUT
                if isinstance(exc, aiosmtplib.SMTPException | OSError):
                    return BROKEN
                raise
        return BROKEN

    async def rcpt(self, recipient: str) -> Reply:
        """Forward one RCPT TO and return the upstream's reply to it."""
        if self.conn is None:
            return BROKEN
        try:
            encoding = "utf-8" if not recipient.isascii() else "ascii"
            return _reply(await self.conn.client.rcpt(recipient, encoding=encoding))
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code == 421:
                self._release(clean=False)
            return _reply_from(exc)
        except BaseException as exc:
            self._release(clean=False)
            if isinstance(exc, aiosmtplib.SMTPTimeoutError):
                return TIMED_OUT
            if isinstance(exc, aiosmtplib.SMTPException | OSError):
                return BROKEN
            raise

    async def data(self, message: bytes) -> Reply:
        """Send the message and return the upstream's final reply."""
        if self.conn is None:
            return BROKEN
        try:
            reply = _reply(await self.conn.client.data(message))
        except aiosmtplib.SMTPResponseException as exc:
            self._release(clean=exc.code != 421)
            return _reply_from(exc)
        except BaseException as exc:
            # Cancelled or failed half-way: the upstream's state is unknown.
            self._release(clean=False)
            if isinstance(exc, aiosmtplib.SMTPTimeoutError):
                return TIMED_OUT
            if isinstance(exc, aiosmtplib.SMTPException | OSError):
                return BROKEN
            raise
        self._release(clean=True)
        return reply

    async def reset(self) -> None:
        """RSET the upstream and return the connection; close it if RSET fails."""
        conn = self.conn
        if conn is None:
            return
        try:
            await conn.client.rset()
        except Exception:
            self._release(clean=False)
        except BaseException:
            self._release(clean=False)
            raise
        else:
            self._release(clean=True)

    def abort(self) -> None:
        """Close the connection now; it is never reused."""
        self._release(clean=False)
