"""``workers: N``: N gateway processes on the same ports, supervised by the parent.

The parent validates the policy, then forks N workers and only supervises:
each worker opens its own listening sockets with ``SO_REUSEPORT`` (so the
kernel spreads new connections across them) and runs the whole gateway on its
own event loop, using its own core. What the workers share is the policy's
``state:``: with ``redis://`` every worker enforces one limit; with ``memory``
each worker counts on its own (a warning says so at start). The memory budget
for messages in flight (``limits.memory``) is split evenly: each worker may
hold :func:`worker_share` of it, so together they hold no more than the policy says.

Signals to the parent:

- SIGTERM or SIGINT: every worker gets SIGTERM and stops as a single gateway
  does; a worker still running after ``STOP_GRACE`` seconds is killed. The
  parent then exits 0.
- SIGHUP: passed on to every worker.

A worker that dies is started again (a fresh fork that reads the policy file
again), at once if it had run for ``STABLE_AFTER`` seconds, else after a
back-off that doubles from 1 s up to 30 s, so a crash loop does not spin. A
worker whose parent is gone (killed with SIGKILL) stops by itself within a
second. Unix only (``fork``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailgate.logformat import label_worker

log = logging.getLogger("mailgate.workers")

STOP_GRACE = 30.0
STABLE_AFTER = 10.0
MAX_BACKOFF = 30.0
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


@dataclass(slots=True)
class _Slot:
    index: int
    pid: int = 0
    started: float = 0.0
    start_at: float = 0.0
    backoff: float = 0.0


def _watch_parent(parent: int) -> None:
    """In a worker: stop (SIGTERM to ourselves) once the parent is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _child(index: int, serve: Callable[[], int], parent: int) -> None:
    """Run in the forked worker; never returns."""
    code = 1
    try:
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        # A reload passed on while this worker starts must not end it: it reads the file anyway.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        label_worker(index)  # text lines start with workerN[PID]; JSON has worker and pid
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
        code = serve()
    except BaseException:
        log.exception("worker %d failed", index)
    finally:
        logging.shutdown()
        os._exit(code)


class Supervisor:
    """Forks, watches and stops the workers (in the parent process)."""

    def __init__(self, count: int, serve: Callable[[], int]) -> None:
        self.serve = serve
        self.slots = [_Slot(i) for i in range(count)]

    def _spawn(self, slot: _Slot) -> None:
        pid = os.fork()
        if pid == 0:
            _child(slot.index, self.serve, os.getppid())
        slot.pid, slot.started = pid, time.monotonic()
        log.info("worker %d started: pid %d", slot.index, pid)

    def _reap(self, stopping: bool) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for slot in self.slots:
                if slot.pid != pid:
                    continue
                slot.pid = 0
                code = os.waitstatus_to_exitcode(status)
                if stopping:
                    log.info("worker %d stopped (status %d)", slot.index, code)
                    continue
                ran = time.monotonic() - slot.started
                slot.backoff = (
                    0.0 if ran >= STABLE_AFTER else min(max(1.0, slot.backoff * 2), MAX_BACKOFF)
                )
                slot.start_at = time.monotonic() + slot.backoff
                log.error(
                    "worker %d (pid %d) exited with status %d after %.1fs; restarting in %.0fs",
                    slot.index, pid, code, ran, slot.backoff,
                )  # fmt: skip

    def _signal_all(self, sig: int) -> None:
        for slot in self.slots:
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, sig)

    def _stop(self) -> None:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while any(slot.pid for slot in self.slots):
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("workers still running after %.0fs: killing them", STOP_GRACE)
                self._signal_all(signal.SIGKILL)
                deadline = time.monotonic() + STOP_GRACE
            signal.sigtimedwait({signal.SIGCHLD}, min(max(left, 0.01), 1.0))
            self._reap(stopping=True)

    def run(self) -> int:
        """Start every worker and supervise them until SIGTERM or SIGINT; return 0."""
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            for slot in self.slots:
                self._spawn(slot)
            while True:
                now = time.monotonic()
                for slot in self.slots:
                    if not slot.pid and slot.start_at <= now:
                        self._spawn(slot)
                waits = [s.start_at - now for s in self.slots if not s.pid]
                info = signal.sigtimedwait(_SIGNALS, max(0.01, min([1.0, *waits])))
                if info is None or info.si_signo == signal.SIGCHLD:
                    self._reap(stopping=False)
                elif info.si_signo == signal.SIGHUP:
                    log.info("SIGHUP: passing it on to the workers")
                    self._signal_all(signal.SIGHUP)
                else:
                    log.info("stopping %d workers", len(self.slots))
                    self._stop()
                    log.info("stopped")
                    return 0
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def probe_listen(addresses: list[tuple[str, int]]) -> str | None:
    """Bind each address as a worker will (``SO_REUSEPORT``), then let go: the first error.

    The parent checks before forking, so an address in use is one clear line and
    exit 1 rather than N workers failing and restarting in a loop.
    """
    from mailgate.listener import address_text, os_reason

    for host, port in addresses:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            for family, kind, proto, _name, sockaddr in infos:
                with socket.socket(family, kind, proto) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind(sockaddr)
                    if port:
                        sock.listen()
        except OSError as exc:
            return f"cannot listen on {address_text(host, port)}: {os_reason(exc)}"
    return None


def worker_share(total: int, workers: int) -> int:
    """One worker's part of a per-gateway figure (``limits.memory``): ``total // workers``."""
    return total // max(workers, 1)


def supervise(count: int, serve: Callable[[], int], state_url: str = "memory") -> int:
    """Run ``serve`` (one whole gateway; returns an exit status) in ``count`` worker processes."""
    if state_url == "memory":
        log.warning(
            "workers: %d with state: memory: each worker keeps its own rate limits and "
            "greylist; use state: redis://... to share them",
            count,
        )
    return Supervisor(count, serve).run()
