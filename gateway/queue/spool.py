"""The spool: accepted messages on disk, durable before the client hears 250.

Layout under ``queue.directory``::

    tmp/           files being written (left-overs older than an hour are removed)
    queue/ID.msg   the message as it will be relayed (our headers added); never changes
    queue/ID.env   the envelope as JSON: sender, recipients still to do, retry state,
                   the message's length and SHA-256, and for quarantined mail the hold
    corrupt/       damaged files moved aside (never delivered): ``ID.env``, ``ID.msg``
                   and ``ID.why`` (one line: what was wrong)
    flush          present when ``mailgate queue flush`` asked for a retry now

A message is written to ``tmp/``, fsynced and renamed to ``ID.msg``; then its
envelope likewise to ``ID.env``; then ``queue/`` itself is fsynced. The ``.env``
rename is the commit point: a ``.msg`` without one is an interrupted write
(the client never got a 250) and is removed when found unlocked.

Whoever works on a message holds an exclusive ``flock`` on its ``.msg`` file
(the one file that is never replaced), so several gateway processes and the
``mailgate queue`` command can share one spool without delivering a message
twice at once.

Damage is never delivered: :meth:`Spool.load` raises :class:`Damaged` for an
envelope that is not a JSON object of the expected fields (or cannot be read),
:meth:`Spool.checked_message` for a message whose length or digest differs
from its envelope's, :meth:`Spool.stale` finds an envelope whose message is
gone; :meth:`Spool.move_corrupt` then moves the files to ``corrupt/`` and
logs one ERROR line. Every write removes its temporary file on any error.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

ID_PATTERN = re.compile(r"^[0-9A-F]{10,40}$")
_STALE_TMP = 3600.0

log = logging.getLogger("mailgate.queue")


class Damaged(Exception):
    """A spool file that cannot be trusted: the message says what is wrong with it."""


def digest(message: bytes) -> str:
    """The SHA-256 of ``message`` in hex, as envelopes record it."""
    return hashlib.sha256(message).hexdigest()


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
    digest: str = ""
    """SHA-256 of the ``.msg`` file (hex); empty only in envelopes of older versions."""
    verified: bool = False
    """The sender may get a DSN: SPF or aligned DKIM passed, or the client was trusted."""
    held: bool = False
    """Quarantined: kept until released, deleted or ``quarantine.lifetime`` is over."""
    held_since: float = 0.0
    hold_reason: str = ""
    hold_rules: list[str] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    """The transaction's verdicts as the decision log shows them (``rule:action``)."""

    @classmethod
    def from_json(cls, data: object) -> Entry:
        """Rebuild an entry from its ``.env`` file's JSON; :class:`Damaged` if it is not one."""
        if not isinstance(data, dict):
            raise Damaged(f"envelope is a JSON {type(data).__name__}, not an object")
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for name in ("id", "sender", "recipients"):
            if name not in fields:
                raise Damaged(f"envelope has no {name!r}")
        entry = cls(**fields)
        entry._check_types()
        return entry

    def _check_types(self) -> None:
        checks: tuple[tuple[str, type | tuple[type, ...]], ...] = (
            ("id", str),
            ("sender", str),
            ("created", (int, float)),
            ("attempts", int),
            ("next_attempt", (int, float)),
            ("last_error", str),
            ("size", int),
            ("digest", str),
            ("verified", bool),
            ("held", bool),
            ("held_since", (int, float)),
            ("hold_reason", str),
        )
        for name, kind in checks:
            if not isinstance(getattr(self, name), kind):
                raise Damaged(f"envelope field {name!r} has the wrong type")
        for name in ("recipients", "options", "hold_rules", "verdicts"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise Damaged(f"envelope field {name!r} is not a list of strings")
        if self.client is not None and not isinstance(self.client, dict):
            raise Damaged("envelope field 'client' is not an object")
        if not ID_PATTERN.match(self.id):
            raise Damaged("envelope field 'id' is not a queue id")


def new_id() -> str:
    """A queue id: microseconds since the epoch in hex, then random hex (sorts by age)."""
    return f"{time.time_ns() // 1000:X}{secrets.token_hex(3).upper()}"


def _oneline(text: str) -> str:
    return " ".join(text.split())


@dataclass(slots=True)
class SpoolStats:
    """Process-wide spool figures, read by ``mailgate.metrics`` at scrape time."""

    queued: int = 0
    """Messages waiting for delivery at the last scan (held ones not included)."""
    held: int = 0
    corrupt: int = 0
    """Entries in ``corrupt/`` at the last scan."""
    corrupt_moved: int = 0
    """Damaged entries this process moved to ``corrupt/``."""
    write_errors: int = 0
    """Spool writes that failed (ENOSPC, EIO, ...)."""


STATS = SpoolStats()


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
        self.corrupt_dir = os.path.join(self.directory, "corrupt")
        self.flush_marker = os.path.join(self.directory, "flush")

    def prepare(self) -> None:
        """Create the folders; remove interrupted writes nobody is working on."""
        os.makedirs(self.queue_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.corrupt_dir, mode=0o700, exist_ok=True)
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
            try:
                _write_all(fd, json.dumps(asdict(entry)).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self._path(entry.id, "env"))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # ENOSPC and friends: leave nothing behind
            raise

    def store(self, entry: Entry, message: bytes) -> None:
        """Write a new message and its envelope durably (file and folder fsynced).

        The entry's ``size`` and ``digest`` are set from ``message`` here.
        """
        entry.size, entry.digest = len(message), digest(message)
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
        """The entry's envelope, or None if it is gone (delivered or deleted).

        Raises :class:`Damaged` when the file cannot be read or is not an envelope.
        """
        try:
            with open(self._path(queue_id, "env"), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise Damaged(f"envelope cannot be read: {exc.strerror or exc}") from None
        try:
            entry = Entry.from_json(json.loads(data))
        except (ValueError, TypeError, RecursionError) as exc:
            # JSONDecodeError and UnicodeDecodeError are ValueErrors; an unknown
            # keyword is a TypeError.
            raise Damaged(f"envelope is not valid JSON: {exc}") from None
        if entry.id != queue_id:
            raise Damaged(f"envelope is for {entry.id}, not {queue_id}")
        return entry

    def message(self, queue_id: str) -> bytes:
        """The message bytes."""
        with open(self._path(queue_id, "msg"), "rb") as f:
            return f.read()

    def checked_message(self, entry: Entry) -> bytes:
        """The message bytes, after checking its length and digest; :class:`Damaged` if off."""
        try:
            message = self.message(entry.id)
        except FileNotFoundError:
            raise Damaged("message file is missing") from None
        except OSError as exc:
            raise Damaged(f"message cannot be read: {exc.strerror or exc}") from None
        if len(message) != entry.size:
            raise Damaged(f"message is {len(message)} bytes, its envelope says {entry.size}")
        if entry.digest and digest(message) != entry.digest:
            raise Damaged("message digest differs from its envelope's")
        return message

    def stale(self, queue_id: str) -> bool:
        """True if the envelope is there and its message is not: damage, never a write.

        (A message is written before its envelope and removed after it.)
        """
        msg, env = self._path(queue_id, "msg"), self._path(queue_id, "env")
        return not os.path.exists(msg) and os.path.exists(env)

    def move_corrupt(self, queue_id: str, why: str) -> None:
        """Move a damaged entry's files to ``corrupt/`` and log one ERROR line."""
        os.makedirs(self.corrupt_dir, mode=0o700, exist_ok=True)
        for ext in ("msg", "env"):  # the envelope last: it is what makes the id listed
            with contextlib.suppress(FileNotFoundError):
                os.rename(
                    self._path(queue_id, ext), os.path.join(self.corrupt_dir, f"{queue_id}.{ext}")
                )
        with open(os.path.join(self.corrupt_dir, f"{queue_id}.why"), "w") as f:
            f.write(_oneline(why) + "\n")
        _fsync_dir(self.queue_dir)
        _fsync_dir(self.corrupt_dir)
        STATS.corrupt_moved += 1
        log.error(
            "spool: %s is damaged, moved to %s: %s", queue_id, self.corrupt_dir, _oneline(why)
        )

    def corrupt(self) -> dict[str, str]:
        """Entries in ``corrupt/``: id -> what was wrong."""
        try:
            names = os.listdir(self.corrupt_dir)
        except FileNotFoundError:
            return {}
        out: dict[str, str] = {}
        for name in sorted(names):
            queue_id, _, ext = name.partition(".")
            if not ID_PATTERN.match(queue_id) or ext not in ("msg", "env", "why"):
                continue
            out.setdefault(queue_id, "")
            if ext == "why":
                with contextlib.suppress(OSError), open(os.path.join(self.corrupt_dir, name)) as f:
                    out[queue_id] = f.read().strip()
        return out

    def delete_corrupt(self, queue_id: str) -> bool:
        """Delete a damaged entry's files from ``corrupt/``; False if there were none."""
        if not ID_PATTERN.match(queue_id):
            return False
        found = False
        for ext in ("msg", "env", "why"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.corrupt_dir, f"{queue_id}.{ext}"))
                found = True
        return found

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
