"""The embedded upstream: deliver accepted mail into one local Maildir.

For trying mailgate without a mail server, and for tests. A message is written
to ``tmp/``, fsynced, then renamed into ``new/`` and the folder fsynced, so a
250 means the message is on disk. The envelope is kept in headers added on
top, as a local delivery agent does: ``Return-Path`` and one ``Delivered-To``
per recipient.

A write that fails (a full disk: ENOSPC, EIO, ...) removes its file from
``tmp/`` on every path, logs one ERROR line, and answers ``451 4.3.0``: the
client (or the queue, with its backoff) tries again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time

from mailgate.verdict import Reply

_counter = itertools.count()
log = logging.getLogger("mailgate.maildir")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MaildirUpstream:
    """Deliver into ``path`` (created with ``cur``, ``new`` and ``tmp`` if missing)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(self.path, sub), exist_ok=True)

    def begin(self, identity: object = None) -> MaildirTransaction:
        """Start a transaction (the client's identity does not matter here)."""
        return MaildirTransaction(self)

    async def close(self) -> None:
        """Nothing to close."""

    def write(self, envelope_headers: bytes, message: bytes) -> str:
        """Write one message durably; return its file name in ``new/``."""
        name = f"{time.time_ns()}.P{os.getpid()}Q{next(_counter)}.{socket.gethostname()}"
        tmp = os.path.join(self.path, "tmp", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                for part in (envelope_headers, message):
                    view = memoryview(part)
                    while view:
                        view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, os.path.join(self.path, "new", name))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # Renamed: the file is complete. A failed folder fsync is reported, the file stays.
        _fsync_dir(os.path.join(self.path, "new"))
        return name


class MaildirTransaction:
    """Collects the envelope; writes the message at ``data``."""

    def __init__(self, upstream: MaildirUpstream) -> None:
        self.upstream = upstream
        self.sender = ""
        self.recipients: list[str] = []

    async def mail(self, sender: str, options: list[str]) -> Reply:
        """Record the sender."""
        self.sender = sender
        return Reply(250, "Ok", "2.1.0")

    async def rcpt(self, recipient: str) -> Reply:
        """Record a recipient."""
        self.recipients.append(recipient)
        return Reply(250, "Ok", "2.1.5")

    async def data(self, message: bytes) -> Reply:
        """Write the message (in a thread: fsync blocks) and say where it went."""
        lines = [f"Return-Path: <{self.sender}>"]
        lines += [f"Delivered-To: {rcpt}" for rcpt in self.recipients]
        # An address cannot hold CR/LF in valid SMTP; make sure it cannot start a header either.
        head = "".join(line.replace("\r", " ").replace("\n", " ") + "\r\n" for line in lines)
        try:
            name = await asyncio.to_thread(
                self.upstream.write, head.encode("utf-8", "surrogateescape"), message
            )
        except OSError as exc:
            log.error("maildir delivery to %s failed: %s", self.upstream.path, exc)
            return Reply(451, f"Local delivery failed: {exc.strerror}", "4.3.0")
        return Reply(250, f"Ok: delivered as {name}", "2.0.0")

    async def reset(self) -> None:
        """Forget the envelope."""
        self.recipients.clear()

    def abort(self) -> None:
        """Forget the envelope."""
        self.recipients.clear()
