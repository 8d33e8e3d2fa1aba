"""A real redis-server on a free loopback port, started and stopped by the tests.

``redis_server`` (imported into conftest.py) starts one per test, without
persistence (``--save '' --appendonly no``). When redis-server is not installed
the test is skipped with a reason that says so, except under CI (``CI`` set),
where that is a failure: ``.ci/run`` installs redis-server from Debian packages.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ops_support import need_binary

START_TIMEOUT = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on 127.0.0.1; :meth:`stop` and :meth:`start` keep the port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        """The policy's ``state:`` value for this server, database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start redis-server and wait until it answers PING."""
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--daemonize", "no",
                "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not _ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop redis-server (SIGKILL: nothing to save) and wait for it to exit."""
        if self.process is not None:
            process, self.process = self.process, None
            process.kill()
            process.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server on a free loopback port."""
    binary = need_binary("redis-server", "redis-server")
    try:
        server = RedisServer(binary, tmp_path)
    except RuntimeError:
        # The free port may have been taken in between: try once more on another.
        server = RedisServer(binary, tmp_path)
    yield server
    server.stop()
