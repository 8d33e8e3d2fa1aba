"""In-line relay: one upstream SMTP transaction per client transaction, in lockstep.

When MAIL passes the local checks the session checks out a pooled upstream
connection and forwards MAIL; each RCPT that passes is forwarded and the
upstream's own reply goes back to the client; at end of DATA the message goes
upstream and the client gets the upstream's reply. So the gateway never says
250 for mail that the upstream has not taken, and needs no queue.

A connection goes back to the pool only after a clean RSET. After any error,
timeout or cancellation it is closed and never reused. An upstream that is
down, slow or drops the connection gives the client a 4xx.

With several servers (``url`` then ``failover``), a new connection goes to the
first one that is up; one that fails to connect (refused, timed out, bad
greeting, failed TLS) is marked down for ``down_for`` and skipped while another
is up. When every server is marked down they are all tried anyway, so a
marking never refuses mail by itself. ``client_identity`` sends XCLIENT or
XFORWARD (``mailgate.xclient``) before MAIL.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Protocol

import aiosmtplib
from aiosmtplib.protocol import MAX_LINE_LENGTH, SMTPProtocol

from mailgate.deadline import LazyDeadline
from mailgate.dns import Resolver
from mailgate.lineendings import bare_line_endings, normalize
from mailgate.policy import Upstream as UpstreamConfig
from mailgate.tls import client_context
from mailgate.verdict import Reply
from mailgate.xclient import ClientIdentity, command

log = logging.getLogger("mailgate.relay")

UNAVAILABLE = Reply(451, "Upstream server unavailable, try again later", "4.4.1")
TIMED_OUT = Reply(451, "Upstream server timed out, try again later", "4.4.2")
BROKEN = Reply(451, "Upstream connection failed, try again later", "4.4.2")
IDENTITY_REFUSED = Reply(451, "Upstream refused the client identity, try again later", "4.3.0")
MALFORMED = Reply(451, "Upstream sent a malformed reply, try again later", "4.4.2")
NO_SMTPUTF8_ADDRESS = Reply(553, "Upstream cannot take a non-ASCII address (no SMTPUTF8)", "5.6.7")
NO_SMTPUTF8_MESSAGE = Reply(554, "Upstream cannot take non-ASCII headers (no SMTPUTF8)", "5.6.7")
NO_8BITMIME = Reply(554, "Upstream cannot take 8-bit data (no 8BITMIME)", "5.6.3")

# RFC 5321 §4.2: three digits, the first 2-5, then SP or "-" and text, or nothing at all.
_REPLY_LINE = re.compile(rb"[2-5][0-9][0-9](?:[ -][^\n]*)?\r?\n")


class MalformedReply(aiosmtplib.SMTPResponseException):
    """The upstream sent a reply line that is not ``DDD<SP|->text``: an unknown reply."""


def strict_replies(client: aiosmtplib.SMTP) -> None:
    """Make ``client`` refuse malformed reply lines instead of guessing at them.

    aiosmtplib reads the code as ``int(line[:3])`` and the text from the
    fifth octet, so ``2500 ok`` reads as ``250 ok`` and ``25 ok`` as code 25.
    Here every complete line of a reply is checked first (and a multiline
    reply must repeat its code); a bad one raises :class:`MalformedReply`,
    which ends the transaction with a 4xx and closes the connection.
    """
    protocol = client.protocol
    if protocol is None:
        return
    buffer: bytearray = protocol._buffer

    def checked() -> aiosmtplib.SMTPResponse | None:
        # The checks above, and aiosmtplib's _read_response_from_buffer step for step
        # in the same pass (it walked the lines a second time): its message joins the
        # stripped texts with LF (none after an empty first text), its code is the
        # last line's, and a line past MAX_LINE_LENGTH fails the reply.
        offset, code = 0, b""
        message = bytearray()
        too_long = False
        while (end := buffer.find(b"\n", offset)) >= 0:
            line = bytes(buffer[offset : end + 1])
            if not _REPLY_LINE.fullmatch(line) or (code and line[:3] != code):
                text = line[:80].decode("ascii", "backslashreplace").rstrip()
                raise MalformedReply(-1, f"malformed reply line {text!r}")
            too_long = too_long or len(line) > MAX_LINE_LENGTH
            offset = end + 1
            if message:
                message += b"\n"
            message += line[4:].strip(b" \t\r\n")
            if line[3:4] != b"-":
                if too_long:
                    break
                del buffer[:offset]
                return aiosmtplib.SMTPResponse(
                    int(line[:3]), message.decode("utf-8", "surrogateescape")
                )
            code = line[:3]
        if too_long:
            raise aiosmtplib.SMTPResponseException(
                aiosmtplib.SMTPStatus.invalid_response.value, "Response too long"
            )
        return None

    setattr(protocol, "_read_response_from_buffer", checked)  # noqa: B010 - shadows a method
    setattr(protocol, "read_response", _reader(protocol))  # noqa: B010 - shadows a method


def _reader(
    protocol: SMTPProtocol,
) -> Callable[[float | None], Awaitable[aiosmtplib.SMTPResponse]]:
    """aiosmtplib's ``read_response`` for ``protocol``, its deadline one lazy timer handle.

    The same steps and errors as ``SMTPProtocol.read_response``, whose
    ``asyncio.wait_for`` builds a second future and task callbacks around every
    reply (4 per message); here the deadline (:class:`~mailgate.deadline.LazyDeadline`,
    one handle for all the connection's reads) fails the waiter itself.
    """
    loop = protocol._loop
    waiting: list[asyncio.Future[aiosmtplib.SMTPResponse]] = []  # the reply under the deadline

    def expired() -> None:
        if waiting and not waiting[0].done():
            waiting[0].set_exception(TimeoutError())

    deadline = LazyDeadline(loop, expired)

    async def read_response(timeout: float | None = None) -> aiosmtplib.SMTPResponse:  # noqa: ASYNC109 - aiosmtplib's signature
        waiter = protocol._response_waiter
        if waiter is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        protocol._response_pending = True
        if timeout is not None:
            waiting[:] = [waiter]
            deadline.set(loop.time() + timeout)
        try:
            return await waiter
        except TimeoutError as exc:
            raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from exc
        finally:
            waiting.clear()
            protocol._response_pending = False
            if protocol.transport is None:
                deadline.cancel()
                protocol._response_waiter = None
            else:
                deadline.clear()
                protocol._response_waiter = loop.create_future()

    return read_response


PIECE = 256 * 1024
"""Bytes of the message dot-stuffed and written upstream at a time."""


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

    def begin(self, identity: ClientIdentity | None = None) -> UpstreamTransaction:
        """Start a transaction for the client ``identity``; nothing is sent until ``mail``."""

    async def close(self) -> None:
        """Close every idle connection."""


def _reply(response: aiosmtplib.SMTPResponse) -> Reply:
    """The upstream's reply as the client's; 421 (the upstream closing) becomes 451."""
    if response.code == 421:
        # 421 tells the client we are closing; we are not, the upstream is.
        return Reply(451, response.message or "Upstream closed the connection", "")
    return Reply(response.code, response.message, "")


def _path(keyword: bytes, address: str, encoding: str) -> bytes:
    """``FROM:<address>`` or ``TO:<address>``, the address as the client sent it.

    (The server side has checked its syntax; aiosmtplib's ``mail``/``rcpt``
    would parse it again with ``email.utils``.)
    """
    return keyword + b"<" + address.encode(encoding) + b">"


def stuffed_pieces(message: bytes, size: int = PIECE) -> Iterator[bytes]:
    """``message`` dot-stuffed (RFC 5321 §4.5.2), in pieces of about ``size`` bytes.

    Each piece is cut after a CRLF where the window has one (else not between a
    CR and what follows it), so no ``CRLF .`` straddles two pieces and only a
    piece at a time is ever copied.
    """
    total, start = len(message), 0
    with memoryview(message) as view:
        while start < total:
            end = min(start + size, total)
            if end < total:
                cut = message.rfind(b"\r\n", start, end)
                if cut >= 0:
                    end = cut + 2
                elif message[end - 1] == 13 and end - 1 > start:  # a CR: keep it with its LF
                    end -= 1
            piece = bytes(view[start:end])
            if piece[:1] == b"." and (start == 0 or message[start - 2 : start] == b"\r\n"):
                yield b"."
            yield piece.replace(b"\r\n.", b"\r\n..")
            start = end


async def _drain(client: aiosmtplib.SMTP, protocol: SMTPProtocol) -> None:
    """What ``StreamWriter.drain`` awaits, under the client's timeout; no timer if no wait."""
    if protocol._paused or protocol._connection_lost:
        async with asyncio.timeout(client.timeout):
            await protocol._drain_helper()


async def _send_content(client: aiosmtplib.SMTP, message: bytes) -> aiosmtplib.SMTPResponse:
    """After the 354: the message dot-stuffed, the final dot, and the upstream's reply.

    The message is written a piece at a time, waiting whenever the upstream
    falls behind (``client.timeout`` at most), so no second full copy is ever
    made; aiosmtplib's ``data`` makes two regex passes over the whole of it.
    A message of at most one piece goes with its final dot in one write (one
    system call, not two).
    What the session relays already has CRLF line endings only (other
    callers' bare CR or LF are normalised here first).
    """
    if any(bare_line_endings(message)):
        message = normalize(message)
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    ending = b".\r\n" if not message or message.endswith(b"\r\n") else b"\r\n.\r\n"
    try:
        if len(message) <= PIECE:  # the usual message: with its final dot, one write
            protocol.write(b"".join([*stuffed_pieces(message), ending]))
            await _drain(client, protocol)
        else:
            for piece in stuffed_pieces(message):
                protocol.write(piece)
                await _drain(client, protocol)
            protocol.write(ending)
        return await protocol.read_response(timeout=client.timeout)
    except TimeoutError:
        client.close()
        raise aiosmtplib.SMTPTimeoutError("Timed out writing the message") from None
    except ConnectionResetError:
        client.close()
        raise aiosmtplib.SMTPServerDisconnected("Connection lost") from None
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        client.close()  # what aiosmtplib does: a half-read reply leaves it out of step
        raise


def _failure(exc: BaseException) -> Reply:
    """The client's reply when a step failed; cancellation and our own bugs propagate."""
    if isinstance(exc, aiosmtplib.SMTPTimeoutError):
        return TIMED_OUT
    if isinstance(exc, MalformedReply):
        log.warning("upstream: %s; connection closed", exc.message)
        return MALFORMED
    if isinstance(exc, aiosmtplib.SMTPException | OSError):
        return BROKEN
    raise exc


def mail_parameters(options: list[str], offered: Mapping[str, str]) -> list[bytes]:
    """The MAIL parameters to send: those of ``options`` whose extension is ``offered``.

    ``offered`` is the upstream's EHLO keywords, lower-cased (aiosmtplib's
    ``esmtp_extensions``). ``SMTPUTF8`` goes only with ``smtputf8`` (RFC 6531),
    ``BODY=`` only with ``8bitmime`` (RFC 6152). A client's SMTPUTF8 implies 8-bit
    content, so an upstream with 8BITMIME but not SMTPUTF8 gets ``BODY=8BITMIME``.
    """
    params: list[str] = []
    if "SMTPUTF8" in options and "smtputf8" in offered:
        params.append("SMTPUTF8")
    if "8bitmime" in offered:
        body = [o for o in options if o.startswith("BODY=")]
        if not body and "SMTPUTF8" in options and "smtputf8" not in offered:
            body = ["BODY=8BITMIME"]
        params += body
    return [p.encode("ascii") for p in params]


def content_refusal(message: bytes, options: list[str], offered: Mapping[str, str]) -> Reply | None:
    """Why the upstream (``offered``: its EHLO keywords) cannot take ``message``, or None.

    Non-ASCII header fields of an SMTPUTF8 message need an upstream with SMTPUTF8
    (``554 5.6.7``, RFC 6531 §3.4); 8-bit data declared as such (``BODY=8BITMIME``
    or SMTPUTF8) needs one with 8BITMIME (``554 5.6.3``, RFC 6152 §3). Mail the
    client did not declare 8-bit is relayed as it came. No downgrade is attempted.
    """
    utf8, eight_bit = "SMTPUTF8" in options, "BODY=8BITMIME" in options
    if utf8 and "smtputf8" not in offered:
        end = message.find(b"\r\n\r\n")
        if not (message if end < 0 else message[:end]).isascii():
            return NO_SMTPUTF8_MESSAGE
    if (utf8 or eight_bit) and "8bitmime" not in offered and not message.isascii():
        return NO_8BITMIME
    return None


class _Server:
    """One upstream server and its health mark."""

    __slots__ = ("down_until", "host", "port")

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.down_until = 0.0

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class _Connection:
    __slots__ = ("client", "identity", "idle_since", "server", "xclient", "xforward")

    def __init__(self, client: aiosmtplib.SMTP, server: _Server) -> None:
        self.client = client
        self.server = server
        self.idle_since = time.monotonic()
        # What the upstream advertised before any XCLIENT changed who it thinks we are.
        self.xclient: str | None = client.esmtp_extensions.get("xclient")
        self.xforward: str | None = client.esmtp_extensions.get("xforward")
        self.identity: ClientIdentity | None = None
        """The client this connection was announced as with XCLIENT; None if never."""


class _IdentityRefused(Exception):
    """The upstream refused XCLIENT (or the EHLO after it); the connection is not reused."""


class SmtpUpstream:
    """A pool of aiosmtplib connections to one upstream, with failover between its servers."""

    def __init__(
        self, config: UpstreamConfig, local_hostname: str, resolver: Resolver | None = None
    ) -> None:
        self.config = config
        self.local_hostname = local_hostname
        self.resolver = resolver
        self.servers = [_Server(host, port) for host, port in config.servers]
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(config.max_connections)
        self._tls_context = self._make_tls_context()

    def _make_tls_context(self) -> ssl.SSLContext | None:
        if self.config.starttls == "off":
            return None
        # Opportunistic TLS takes any certificate: it only guards against passive listeners.
        verify = self.config.verify_certificate and self.config.starttls == "required"
        return client_context(verify=verify, ca_file=self.config.ca_file)

    def begin(self, identity: ClientIdentity | None = None) -> SmtpTransaction:
        """Start a transaction; a connection is checked out at ``mail``."""
        return SmtpTransaction(self, identity)

    def health(self) -> dict[str, bool]:
        """``host:port`` -> whether that server is currently considered up."""
        now = time.monotonic()
        return {str(s): s.down_until <= now for s in self.servers}

    def _candidates(self) -> list[_Server]:
        now = time.monotonic()
        up = [s for s in self.servers if s.down_until <= now]
        return up or sorted(self.servers, key=lambda s: s.down_until)

    async def _connect(self) -> _Connection:
        start_tls = {"off": False, "opportunistic": None, "required": True}[self.config.starttls]
        error: BaseException | None = None
        for server in self._candidates():
            client = aiosmtplib.SMTP(
                hostname=server.host,
                port=server.port,
                local_hostname=self.local_hostname,
                timeout=self.config.connect_timeout,
                start_tls=start_tls,
                tls_context=self._tls_context,
            )
            started = time.monotonic()
            try:
                await client.connect()
                strict_replies(client)
                if client.is_ehlo_or_helo_needed:
                    await client.ehlo()
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                client.close()
                self._mark_down(server, exc)
                error = exc
                continue
            except asyncio.CancelledError:
                # Our own budget ran out (queue mode's handoff_timeout) or the client left
                # before the server greeted and answered EHLO: never leave the socket open.
                client.close()
                waited = time.monotonic() - started
                self._mark_down(server, f"no greeting or EHLO reply after {waited:.1f}s")
                raise
            if server.down_until:
                log.info("upstream is up again: server=%s", server)
                server.down_until = 0.0
            client.timeout = self.config.timeout
            return _Connection(client, server)
        assert error is not None
        raise error

    def _mark_down(self, server: _Server, error: object) -> None:
        """Skip ``server`` for ``down_for`` (logged when it was up)."""
        if server.down_until <= time.monotonic():
            log.warning("upstream marked down: server=%s error=%s", server, error)
        server.down_until = time.monotonic() + self.config.down_for

    async def checkout(self, identity: ClientIdentity | None = None) -> tuple[_Connection, bool]:
        """An open connection and whether it was reused from the pool.

        A connection announced with XCLIENT as another client is not reused for this one.
        """
        if self._slots.locked():
            async with asyncio.timeout(self.config.connect_timeout):
                await self._slots.acquire()
        else:  # a free slot is taken without waiting: no asyncio.timeout (3.1 us) to arm
            await self._slots.acquire()
        try:
            now = time.monotonic()
            for conn in self._idle[::-1]:
                expired = now - conn.idle_since >= self.config.idle_timeout
                if expired or not conn.client.is_connected:
                    self._idle.remove(conn)
                    conn.client.close()
                elif conn.identity is None or conn.identity == identity:
                    self._idle.remove(conn)
                    return conn, True
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

    async def announce(self, conn: _Connection, identity: ClientIdentity | None) -> None:
        """Tell the upstream who the client is (XCLIENT or XFORWARD), as the policy asks."""
        mode = self.config.client_identity
        if mode == "off" or identity is None:
            return
        client = conn.client
        if mode == "xclient" and conn.xclient is not None:
            if conn.identity == identity:
                return
            if "NAME" in conn.xclient.upper().split() and self.resolver is not None:
                await identity.resolve_name(self.resolver)
            line = command("XCLIENT", identity, conn.xclient)
            if line is None:
                return
            response = await client.execute_command(line.encode())
            if response.code != 220:
                raise _IdentityRefused(f"{response.code} {response.message}")
            conn.identity = identity
            # XCLIENT resets the session to the greeting; the EHLO now speaks for the client.
            helo = identity.helo or ""
            usable = helo.isascii() and helo.isprintable() and " " not in helo and helo != ""
            try:
                await client.ehlo(hostname=helo if usable else None)
            except aiosmtplib.SMTPHeloError as exc:
                raise _IdentityRefused(f"EHLO after XCLIENT: {exc.code} {exc.message}") from None
        elif conn.xforward is not None:
            if "NAME" in conn.xforward.upper().split() and self.resolver is not None:
                await identity.resolve_name(self.resolver)
            line = command("XFORWARD", identity, conn.xforward)
            if line is not None:
                response = await client.execute_command(line.encode())
                if response.code != 250:
                    log.warning(
                        "upstream refused XFORWARD: server=%s reply=%s", conn.server, response
                    )

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

    def __init__(self, upstream: SmtpUpstream, identity: ClientIdentity | None = None) -> None:
        self.upstream = upstream
        self.identity = identity
        self.conn: _Connection | None = None
        self.options: list[str] = []
        """The client's MAIL parameters (what the message may need of the upstream)."""

    def _release(self, clean: bool) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            if clean:
                self.upstream.checkin(conn)
            else:
                self.upstream.discard(conn)

    async def mail(self, sender: str, options: list[str]) -> Reply:
        """Check out a connection and send MAIL FROM (retrying once on a stale pooled one).

        ``options`` are the client's MAIL parameters (``SMTPUTF8``, ``BODY=``); each
        goes upstream only if the upstream's EHLO offered its extension (see
        :func:`mail_parameters`). A non-ASCII sender to an upstream without SMTPUTF8
        gets ``553 5.6.7`` and nothing is sent (RFC 6531 §3.4).
        """
        self.options = list(options)
        for _attempt in range(2):
            try:
                conn, reused = await self.upstream.checkout(self.identity)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                servers = ",".join(map(str, self.upstream.servers))
                log.warning("upstream unavailable: servers=%s error=%s", servers, exc)
                return UNAVAILABLE
            self.conn = conn
            try:
                await self.upstream.announce(conn, self.identity)
                if not sender.isascii() and not conn.client.supports_extension("smtputf8"):
                    log.info("upstream does not offer SMTPUTF8: server=%s", conn.server)
                    self._release(clean=True)  # nothing was sent: the connection is clean
                    return NO_SMTPUTF8_ADDRESS
                args = mail_parameters(options, conn.client.esmtp_extensions)
                path = _path(b"FROM:", sender, "utf-8")
                response = await conn.client.execute_command(b"MAIL", path, *args)
            except aiosmtplib.SMTPServerDisconnected:
                self._release(clean=False)
                if reused:
                    continue
                return BROKEN
            except _IdentityRefused as exc:
                log.error("upstream refused XCLIENT: server=%s error=%s", conn.server, exc)
                self._release(clean=False)
                return IDENTITY_REFUSED
            except BaseException as exc:
                self._release(clean=False)
                return _failure(exc)
            if response.code != 250:
                await self.reset()
            return _reply(response)
        return BROKEN

    async def rcpt(self, recipient: str) -> Reply:
        """Forward one RCPT TO and return the upstream's reply to it."""
        if self.conn is None:
            return BROKEN
        if not recipient.isascii() and not self.conn.client.supports_extension("smtputf8"):
            return NO_SMTPUTF8_ADDRESS  # the transaction goes on for the other recipients
        try:
            response = await self.conn.client.execute_command(
                b"RCPT", _path(b"TO:", recipient, "utf-8")
            )
        except BaseException as exc:
            self._release(clean=False)
            return _failure(exc)
        if response.code == 421:
            self._release(clean=False)
        return _reply(response)

    async def data(self, message: bytes) -> Reply:
        """Send the message and return the upstream's final reply."""
        if self.conn is None:
            return BROKEN
        client = self.conn.client
        refusal = content_refusal(message, self.options, client.esmtp_extensions)
        if refusal is not None:
            log.info(
                "upstream cannot take the message: server=%s reply=%s", self.conn.server, refusal
            )
            await self.reset()
            return refusal
        try:
            start = await client.execute_command(b"DATA")
            if start.code != 354:
                await self.reset()  # the transaction is still open upstream
                return _reply(start)
            final = await _send_content(client, message)
        except BaseException as exc:
            # Cancelled or failed half-way: the upstream's state is unknown.
            self._release(clean=False)
            return _failure(exc)
        self._release(clean=final.code != 421)
        return _reply(final)

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
