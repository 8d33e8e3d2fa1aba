"""A bare TCP server on loopback for test fakes that misbehave below SMTP or HTTP."""

from __future__ import annotations

import contextlib
import socket
import threading


class LoopbackTcpServer:
    """Listens on 127.0.0.1:0 and runs :meth:`handle` for each connection in a thread.

    A subclass sets its own attributes before calling ``__init__``: the server
    accepts from the moment it returns.
    """

    def __init__(self) -> None:
        self.connections = 0
        self._stopping = threading.Event()
        self._open: list[socket.socket] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def handle(self, conn: socket.socket) -> None:
        """Serve one connection (in its own thread); the server closes it at :meth:`stop`."""
        raise NotImplementedError

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            self._open.append(conn)
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def stop(self) -> None:
        """Stop listening and drop every open connection."""
        self._stopping.set()
        self._sock.close()
        for conn in self._open:
            with contextlib.suppress(OSError):
                conn.close()
        self._thread.join(5)
