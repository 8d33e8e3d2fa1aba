"""Processes the bench starts: start, watch (CPU, RSS) and stop, always by PID.

Every server the bench runs is a :class:`Proc`. Its process tree (the process
and its descendants, e.g. Haraka's cluster workers or mailgate's ``workers``)
is found from ``/proc``; CPU time and memory are summed over that tree.
Stopping sends SIGTERM to the process, waits, then SIGKILLs by PID whatever of
the tree is still alive. Nothing is ever killed by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

_TICKS = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _stat_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class Proc:
    """One started server process and its descendants."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def tree(self) -> list[int]:
        """This process and every live descendant."""
        children = _children_map()
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            if not Path(f"/proc/{pid}").exists():
                continue
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def alive(self) -> bool:
        """True while the main process runs."""
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU time of the live tree."""
        total = 0.0
        for pid in self.tree():
            with contextlib.suppress(OSError):
                total += _stat_cpu(pid)
        return total

    def rss_kb(self) -> int:
        """Resident memory of the live tree, in KiB."""
        total = 0
        for pid in self.tree():
            with contextlib.suppress(OSError):
                total += _status_kb(pid, "VmRSS")
        return total

    def reset_peak(self) -> None:
        """Reset the peak-RSS mark (VmHWM) of every process in the tree."""
        for pid in self.tree():
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")

    def peak_kb(self) -> int:
        """Sum of the tree's peak RSS (VmHWM) since the last :meth:`reset_peak`, in KiB."""
        total = 0
        for pid in self.tree():
            with contextlib.suppress(OSError):
                total += _status_kb(pid, "VmHWM")
        return total

    def log_tail(self, lines: int = 15) -> str:
        """The end of the process's output, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process, wait up to ``grace`` seconds, then SIGKILL what is left of it."""
        pids = self.tree() if self.alive() else []
        if pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
            deadline = time.monotonic() + 2
            while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in pids:  # seconds-old PIDs of our own tree: no reuse to fear
                if _running(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._log.close()


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_banner(port: int, proc: Proc | None = None, timeout: float = 30.0) -> None:
    """Wait until 127.0.0.1:``port`` answers with a 220 banner; raise if it never does."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited at startup:\n{proc.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    tail = proc.log_tail() if proc else ""
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port} ({last})\n{tail}")


def wait_port(port: int, timeout: float = 30.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``; raise if nothing does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def start_sink_process() -> tuple[subprocess.Popen[bytes], int]:
    """``bench.sink`` on a free port, and that port (it prints ``listening PORT``)."""
    sink = subprocess.Popen(
        [sys.executable, "-m", "bench.sink", "0"], cwd=ROOT, stdout=subprocess.PIPE
    )
    assert sink.stdout is not None
    return sink, int(sink.stdout.readline().split()[1])


def start_gateway_process(
    workdir: Path, name: str, policy: dict[str, object]
) -> tuple[subprocess.Popen[bytes], int]:
    """``mailgate run`` with ``policy`` (its ``listen`` set to a free port), once it listens."""
    port = free_port()
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**policy, "listen": [{"address": f"127.0.0.1:{port}"}]}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailgate", "run", "-c", str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc, port
