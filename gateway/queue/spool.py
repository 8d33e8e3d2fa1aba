"""The spool: accepted messages on disk, durable before the client hears 250.

Layout under ``queue.directory``::

    tmp/           files being written (left-overs older than an hour are removed)
    queue/ID.msg   the message as it will be relayed (our headers added); never changes
    queue/ID.env   the envelope as JSON: sender, recipients still to do, retry state
    flush          present when ``mailgate queue flush`` asked for a retry now

A message is written to ``tmp/``, fsynced and renamed to ``ID.msg``; then its
envelope likewise to ``ID.env``; then ``queue/`` itself is fsynced. The ``.env``
rename is the commit point: a ``.msg`` without one is an interrupted write
(the client never got a 250) and is removed when found unlocked.

Whoever works on a message holds an exclusive ``flock`` on its ``.msg`` file
(the one file that is never replaced), so several gateway processes and the
``mailgate queue`` command can share one spool without delivering a message
twice at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

ID_PATTERN = re.compile(r"^[0-9A-F]{10,40}$")
_STALE_TMP = 3600.0


@dataclass(slots=True)
class Entry:
    """One spooled message's envelope and delivery state."""

    id: str
    sender: str
    recipients: list[str]
    """The recipients not yet delivered, bounced or expired."""
    options: list[str] = field(default_factory=list)
    """MAIL parameters to repeat upstream (SMTPUTF8, BODY=8BITMIME)."""
    client: dict[str, Any] | None = None
    """The original client (``ClientIdentity.to_json``), for XCLIENT/XFORWARD; None for DSNs."""
    created: float = field(default_factory=time.time)
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    size: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        """Rebuild an entry from its ``.env`` file's JSON."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def new_id() -> str:
    """A queue id: microseconds since the epoch in hex, then random hex (sorts by age)."""
    return f"{time.time_ns() // 1000:X}{secrets.token_hex(3).upper()}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Spool:
    """The spool folder; every method blocks (call from a thread in the event loop)."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.queue_dir = os.path.join(self.directory, "queue")
        self.tmp_dir = os.path.join(self.directory, "tmp")
        self.flush_marker = os.path.join(self.directory, "flush")

    def prepare(self) -> None:
        """Create the folders; remove interrupted writes nobody is working on."""
        os.makedirs(self.queue_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
        now = time.time()
        for entry in os.scandir(self.tmp_dir):
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime > _STALE_TMP:
                    os.unlink(entry.path)
        envs = set(self.ids())
        for name in os.listdir(self.queue_dir):
            queue_id, _, ext = name.partition(".")
            if ext == "msg" and queue_id not in envs and ID_PATTERN.match(queue_id):
                with self.lock(queue_id) as locked:
                    if locked and not os.path.exists(self._path(queue_id, "env")):
                        os.unlink(self._path(queue_id, "msg"))

    def _path(self, queue_id: str, ext: str) -> str:
        if not ID_PATTERN.match(queue_id):
            raise ValueError(f"not a queue id: {queue_id!r}")
        return os.path.join(self.queue_dir, f"{queue_id}.{ext}")

    def _write_env(self, entry: Entry) -> None:
        tmp = os.path.join(self.tmp_dir, f"{entry.id}.env.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, json.dumps(asdict(entry)).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self._path(entry.id, "env"))

    def store(self, entry: Entry, message: bytes) -> None:
        """Write a new message and its envelope durably (file and folder fsynced)."""
        tmp = os.path.join(self.tmp_dir, f"{entry.id}.msg")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Held until the envelope is in place, so prepare() never takes us for debris.
            fcntl.flock(fd, fcntl.LOCK_EX)
            _write_all(fd, message)
            os.fsync(fd)
            os.rename(tmp, self._path(entry.id, "msg"))
            self._write_env(entry)
            _fsync_dir(self.queue_dir)
        except BaseException:
            # The client hears 4xx, so nothing may stay behind: not even an envelope whose
            # rename succeeded before the folder fsync failed (it would never be delivered).
            for path in (self._path(entry.id, "env"), self._path(entry.id, "msg"), tmp):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise
        finally:
            os.close(fd)

    def save(self, entry: Entry) -> None:
        """Replace an entry's envelope (after a delivery attempt) durably."""
        self._write_env(entry)
        _fsync_dir(self.queue_dir)

    def ids(self) -> list[str]:
        """Every committed queue id, oldest first."""
        try:
            names = os.listdir(self.queue_dir)
        except FileNotFoundError:
            return []
        return sorted(n[:-4] for n in names if n.endswith(".env") and ID_PATTERN.match(n[:-4]))

    def load(self, queue_id: str) -> Entry | None:
        """The entry's envelope, or None if it is gone (delivered or deleted)."""
        try:
            with open(self._path(queue_id, "env"), "rb") as f:
                return Entry.from_json(json.load(f))
        except FileNotFoundError:
            return None

    def message(self, queue_id: str) -> bytes:
        """The message bytes."""
        with open(self._path(queue_id, "msg"), "rb") as f:
            return f.read()

    def remove(self, queue_id: str) -> None:
        """Forget a message: envelope first (the commit point), then the message."""
        for ext in ("env", "msg"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(queue_id, ext))
        _fsync_dir(self.queue_dir)

    @contextlib.contextmanager
    def lock(self, queue_id: str, *, wait: float = 0.0) -> Iterator[bool]:
        """Hold the message's lock; yields False if another holder kept it past ``wait`` s."""
        try:
            fd = os.open(self._path(queue_id, "msg"), os.O_RDONLY)
        except FileNotFoundError:
            yield False
            return
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    if time.monotonic() >= deadline:
                        yield False
                        return
                    time.sleep(0.05)
            yield True
        finally:
            os.close(fd)

    def request_flush(self) -> None:
        """Ask running gateways to retry every message now."""
        with open(self.flush_marker, "w"):
            pass

    def take_flush(self) -> bool:
        """True (once) if a flush was requested."""
        try:
            os.unlink(self.flush_marker)
        except FileNotFoundError:
            return False
        return True
