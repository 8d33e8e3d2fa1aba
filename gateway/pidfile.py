"""The pid file: written by ``mailgate run``, read by ``mailgate reload``.

The file holds the process id and a newline. It is written atomically (a
temporary file renamed into place) and removed when the gateway exits. A pid
file whose process is still alive stops a second gateway from starting with
the same file; a stale one (its process gone) is replaced.
"""

from __future__ import annotations

import contextlib
import os


class PidFileError(Exception):
    """The pid file cannot be used: missing, unreadable, stale, or in use."""


def read_pid(path: str) -> int:
    """The pid in ``path``; raises :class:`PidFileError` if there is no usable one."""
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
    except FileNotFoundError:
        raise PidFileError(f"{path}: no pid file (is mailgate running?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PidFileError(f"{path}: cannot read the pid file: {exc}") from None
    if not text.isdigit() or int(text) <= 1:
        raise PidFileError(f"{path}: expected a process id, found {text[:20]!r}")
    return int(text)


def alive(pid: int) -> bool:
    """True when a process with this id exists (even one we may not signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_pid(path: str) -> None:
    """Write our pid to ``path``; refuse if the file names another live process."""
    try:
        pid = read_pid(path)
    except PidFileError:
        pid = os.getpid()  # no usable pid file: nothing to protect
    if pid != os.getpid() and alive(pid):
        raise PidFileError(f"{path}: mailgate is already running with pid {pid}")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise PidFileError(f"{path}: cannot write the pid file: {exc.strerror}") from None


def remove_pid(path: str) -> None:
    """Remove ``path`` if it still holds our pid."""
    with contextlib.suppress(PidFileError, OSError):
        if read_pid(path) == os.getpid():
            os.unlink(path)
