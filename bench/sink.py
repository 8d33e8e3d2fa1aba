"""A fast SMTP sink for the bench: accepts everything, keeps nothing but a count.

Every system under test (direct, mailgate, the naive relay, Haraka) delivers
into this one sink, so its cost is the same in every run. It speaks just
enough ESMTP (EHLO/HELO/MAIL/RCPT/DATA/RSET/NOOP/QUIT, PIPELINING-safe) and
never buffers a message body: it scans for the end-of-data marker and counts.

A message is identified by its envelope recipients (the load generators make
them unique per message), so the sink can tell lost mail from duplicated mail.
Two extra verbs are for the bench itself, on any connection:

- ``XSTAT``  -> ``250 messages=N unique=U bytes=B verified=V``, where V counts
  the messages whose header section says both ``dkim=pass`` and ``spf=pass``
  (an Authentication-Results header, or the bench's Haraka check header): the
  bench's proof that a verifying system really verified
- ``XRESET`` -> forget every count (between runs)

Run: ``python -m bench.sink PORT`` (``PORT`` 0 picks one; the chosen port is
printed on standard output as ``listening PORT``).
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

_EOD = b"\r\n.\r\n"
_HEAD_LIMIT = 16384
"""Bytes of each message kept to look for the verification results in its header."""


class SinkState:
    """The counts kept across connections."""

    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0
        self.verified = 0
        self.ids: set[bytes] = set()

    def reset(self) -> None:
        """Forget everything received so far."""
        self.messages = 0
        self.bytes = 0
        self.verified = 0
        self.ids.clear()

    def stat_line(self) -> bytes:
        """The ``XSTAT`` reply."""
        return b"250 messages=%d unique=%d bytes=%d verified=%d\r\n" % (
            self.messages,
            len(self.ids),
            self.bytes,
            self.verified,
        )


class SinkProtocol(asyncio.Protocol):
    """One client connection to the sink."""

    def __init__(self, state: SinkState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.in_data = False
        self.tail = b""  # last bytes of DATA seen, to find a marker split across reads
        self.size = 0
        self.head = b""  # the first bytes of the message, for its header section
        self.rcpts: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(b"220 sink.bench ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        if self.in_data:
            self._data(data)
            return
        self.buf += data
        self._commands()

    def _data(self, data: bytes) -> None:
        if len(self.head) < _HEAD_LIMIT and b"\r\n\r\n" not in self.head:
            self.head += data[:_HEAD_LIMIT]
        window = self.tail + data
        end = window.find(_EOD)
        if end < 0:
            self.size += len(data)
            self.tail = window[-4:]
            return
        rest = window[end + len(_EOD) :]
        self.size += len(data) - len(rest)
        self.in_data = False
        state = self.state
        state.messages += 1
        state.bytes += self.size
        state.ids.add(b" ".join(self.rcpts))
        header = self.head.partition(b"\r\n\r\n")[0].lower()
        if b"dkim=pass" in header and b"spf=pass" in header:
            state.verified += 1
        self.head = b""
        assert self.transport is not None
        self.transport.write(b"250 2.0.0 Ok: queued\r\n")
        self.rcpts = []
        if rest:
            self.buf = rest
            self._commands()

    def _commands(self) -> None:
        transport = self.transport
        assert transport is not None
        out = []
        while not self.in_data:
            line, sep, rest = self.buf.partition(b"\r\n")
            if not sep:
                break
            self.buf = rest
            verb = line[:4].upper()
            if verb == b"RCPT":
                self.rcpts.append(line[8:].strip())
                out.append(b"250 2.1.5 Ok\r\n")
            elif verb == b"MAIL":
                self.rcpts = []
                out.append(b"250 2.1.0 Ok\r\n")
            elif verb == b"DATA":
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data = True
                self.size = 0
                self.head = b""
                self.tail = b"\r\n"  # the marker may come first: an empty message
                data, self.buf = self.buf, b""
                transport.write(b"".join(out))
                out = []
                if data:
                    self._data(data)
                return
            elif verb == b"EHLO":
                out.append(
                    b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                    b"250-SMTPUTF8\r\n250 SIZE 104857600\r\n"
                )
            elif verb in (b"HELO", b"RSET", b"NOOP"):
                out.append(b"250 Ok\r\n")
            elif verb == b"QUIT":
                out.append(b"221 Bye\r\n")
                transport.write(b"".join(out))
                transport.close()
                return
            elif verb == b"XSTA":
                out.append(self.state.stat_line())
            elif verb == b"XRES":
                self.state.reset()
                out.append(b"250 reset\r\n")
            else:
                out.append(b"502 5.5.2 Unknown command\r\n")
        if out:
            transport.write(b"".join(out))


async def serve(port: int) -> None:
    """Listen on 127.0.0.1:``port`` until killed; print the real port."""
    state = SinkState()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(state), "127.0.0.1", port, backlog=4096)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Entry point: ``python -m bench.sink PORT``."""
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(port))
    else:
        uvloop.run(serve(port))


if __name__ == "__main__":
    main()
