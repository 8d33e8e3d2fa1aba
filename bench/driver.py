"""Our own SMTP load clients: one session per message, idle connections, big
messages, and an asyncio throughput driver (used when Postfix's smtp-source is
not installed).

Each message gets envelope recipients no other message of the run has, so the
sink can tell lost mail from duplicated mail. ``data`` is always a CRLF
message with no line starting with a dot; the clients add the end marker.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass


class SmtpError(Exception):
    """The server gave a reply the client did not expect."""


@dataclass(frozen=True)
class SinkCount:
    """What the sink has received since its last reset."""

    messages: int
    unique: int
    verified: int = 0
    """Messages whose header says dkim=pass and spf=pass (see bench/sink.py)."""

    def check(self, sent: int) -> str | None:
        """None when exactly ``sent`` distinct messages arrived; else what went wrong."""
        if self.messages == sent and self.unique == sent:
            return None
        lost = sent - self.unique
        duplicated = self.messages - self.unique
        return f"sent {sent}, sink got {self.messages} ({lost} lost, {duplicated} duplicated)"


def sink_command(port: int, verb: str) -> str:
    """Send one control verb (XSTAT, XRESET) to the sink and return its reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(verb.encode() + b"\r\n")
        reply = f.readline().decode().strip()
        sock.sendall(b"QUIT\r\n")
        return reply


def sink_count(port: int) -> SinkCount:
    """The sink's counters."""
    fields = dict(kv.split("=") for kv in sink_command(port, "XSTAT").split()[1:])
    return SinkCount(int(fields["messages"]), int(fields["unique"]), int(fields.get("verified", 0)))


def recipients(n: int, count: int, tag: str = "r") -> list[str]:
    """``count`` recipient addresses unique to message ``n``."""
    return [f"{tag}{n}x{k}@example.com" for k in range(count)]


# ---------------------------------------------------------------- blocking clients


class _Conn:
    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    def reply(self, expect: str) -> None:
        while True:
            line = self.file.readline()
            if not line:
                raise SmtpError(f"connection closed, expected {expect}")
            if line[3:4] != b"-":
                break
        if not line.startswith(expect.encode()):
            raise SmtpError(f"expected {expect}, got {line.decode(errors='replace').strip()}")

    def cmd(self, line: bytes, expect: str) -> None:
        self.sock.sendall(line)
        self.reply(expect)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def send_one(port: int, sender: str, rcpts: list[str], data: bytes, timeout: float = 60) -> None:
    """One whole SMTP session for one message: connect, EHLO, MAIL, RCPT..., DATA, QUIT."""
    conn = _Conn(port, timeout)
    try:
        conn.reply("220")
        conn.cmd(b"EHLO client.bench\r\n", "250")
        conn.cmd(f"MAIL FROM:<{sender}>\r\n".encode(), "250")
        for rcpt in rcpts:
            conn.cmd(f"RCPT TO:<{rcpt}>\r\n".encode(), "250")
        conn.cmd(b"DATA\r\n", "354")
        conn.cmd(data + b".\r\n", "250")
        conn.cmd(b"QUIT\r\n", "221")
    finally:
        conn.close()


def send_many(port: int, count: int, sender: str, data: bytes, tag: str) -> None:
    """Send ``count`` messages one after another, one session each (a warm-up)."""
    for n in range(count):
        send_one(port, sender, recipients(n, 1, tag), data)


def hold_idle(port: int, count: int) -> list[socket.socket]:
    """Open ``count`` connections and read each banner; the caller closes them."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            socks.append(sock)
            if not sock.recv(512).startswith(b"220"):
                raise SmtpError("no 220 banner on an idle connection")
    except BaseException:
        close_all(socks)
        raise
    return socks


def close_all(socks: list[socket.socket]) -> None:
    """Close every socket."""
    for sock in socks:
        sock.close()


def parallel_big(port: int, count: int, sender: str, data: bytes, tag: str) -> list[str]:
    """Send ``count`` messages at once, one thread each; return the errors."""
    errors: list[str] = []

    def one(n: int) -> None:
        try:
            send_one(port, sender, recipients(n, 1, tag), data, timeout=300)
        except (OSError, SmtpError) as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return errors


# ---------------------------------------------------------------- asyncio throughput driver


async def _session(port: int, sender: str, rcpts: list[str], data: bytes, budget: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(budget):

            async def reply(expect: bytes) -> None:
                while True:
                    line = await reader.readline()
                    if not line:
                        raise SmtpError("connection closed")
                    if line[3:4] != b"-":
                        break
                if not line.startswith(expect):
                    raise SmtpError(f"expected {expect.decode()}, got {line!r}")

            await reply(b"220")
            for line, expect in (
                (b"EHLO client.bench\r\n", b"250"),
                (f"MAIL FROM:<{sender}>\r\n".encode(), b"250"),
                *((f"RCPT TO:<{r}>\r\n".encode(), b"250") for r in rcpts),
                (b"DATA\r\n", b"354"),
                (data + b".\r\n", b"250"),
                (b"QUIT\r\n", b"221"),
            ):
                writer.write(line)
                await reply(expect)
    finally:
        writer.close()


async def throughput(
    port: int,
    messages: int,
    concurrency: int,
    rcpts: int,
    sender: str,
    data: bytes,
    budget: float = 120.0,
) -> tuple[float, list[str]]:
    """Send ``messages`` messages over ``concurrency`` parallel clients, one session each.

    ``budget`` bounds the whole run in seconds. Returns the elapsed seconds and
    the errors (a message that failed is not retried).
    """
    queue = iter(range(messages))
    errors: list[str] = []
    deadline = time.monotonic() + budget

    async def client() -> None:
        for n in queue:
            left = deadline - time.monotonic()
            if left <= 0:
                errors.append("time limit reached")
                return
            try:
                await _session(port, sender, recipients(n, rcpts), data, left)
            except (OSError, SmtpError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - start, errors
