"""A raw-socket SMTP client for protocol tests: send exact bytes, read exact replies.

``smtplib`` fixes up what it sends (line endings, dot-stuffing) and hides
pipelining; these tests need the bytes on the wire to be exactly the test's.
"""

from __future__ import annotations

import socket
import time


class RawClient:
    """One TCP connection to an SMTP server, read line by line."""

    def __init__(
        self, port: int, *, banner: bool = True, timeout: float = 15, source: str = "127.0.0.1"
    ) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        self.reader = self.sock.makefile("rb")
        try:
            self.banner: tuple[int, bytes] | None = self.reply() if banner else None
        except BaseException:
            self.close()  # or the socket leaks into a later test's teardown as a warning
            raise

    def send(self, data: bytes) -> None:
        """Send ``data`` as it is."""
        self.sock.sendall(data)

    def reply(self) -> tuple[int, bytes]:
        """The next reply: its code and its text lines joined by ``\\n`` (EOF: code 0)."""
        lines = []
        while True:
            line = self.reader.readline()
            if not line:
                return 0, b"\n".join(lines)
            lines.append(line[4:].rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(lines)

    def cmd(self, line: bytes) -> tuple[int, bytes]:
        """Send one command line (CRLF added) and read its reply."""
        self.send(line + b"\r\n")
        return self.reply()

    def open_data(
        self, sender: bytes = b"<alice@example.net>", rcpt: bytes = b"<bob@example.com>"
    ) -> None:
        """MAIL, one RCPT and DATA, each of which must pass: the message may follow."""
        assert self.cmd(b"MAIL FROM:" + sender)[0] == 250
        assert self.cmd(b"RCPT TO:" + rcpt)[0] == 250
        assert self.cmd(b"DATA")[0] == 354

    def transaction(
        self,
        message: bytes,
        sender: bytes = b"<alice@example.net>",
        rcpt: bytes = b"<bob@example.com>",
    ) -> tuple[int, bytes]:
        """:meth:`open_data`, then ``message`` (its lines ending in CRLF, dot-stuffed if
        need be) and the final dot; the reply to the dot."""
        self.open_data(sender, rcpt)
        self.send(message + b".\r\n")
        return self.reply()

    def replies(self, count: int) -> list[tuple[int, bytes]]:
        """The next ``count`` replies (for pipelined commands)."""
        return [self.reply() for _ in range(count)]

    def closed_by_server(self) -> bool:
        """True once the server has closed the connection (reads and discards until EOF)."""
        try:
            while self.reader.readline():
                pass
        except (TimeoutError, ConnectionError):
            return False
        return True

    def close(self) -> None:
        """Close our end."""
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send_message(
    port: int,
    message: bytes,
    sender: bytes = b"<alice@example.net>",
    rcpt: bytes = b"<bob@example.com>",
) -> tuple[int, bytes]:
    """EHLO and :meth:`RawClient.transaction` on a new connection; the reply to the dot."""
    with RawClient(port) as client:
        assert client.cmd(b"EHLO client.example.net")[0] == 250
        return client.transaction(message, sender, rcpt)


def wait_for(predicate: object, timeout: float = 20.0) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` passes; return its last value."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())
