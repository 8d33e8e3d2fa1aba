"""``workers: N``: ``mailgate run`` as a real process tree sharing one port and one Redis."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.redis_support import RedisServer, free_port
from tests.support import MESSAGE, RecordingUpstream, write_policy

ROOT = Path(__file__).resolve().parent.parent


class MailgateProcess:
    """``python -m mailgate run`` in its own session; :meth:`kill` ends the whole tree."""

    def __init__(self, policy: Path, log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mailgate", "run", "-c", str(policy)],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> its latest pid, from the supervisor's log."""
        started = re.findall(r"worker (\d+) started: pid (\d+)", self.text())
        return {int(index): int(pid) for index, pid in started}

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def wait_for(condition: Callable[[], object], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: its parent just has not reaped it.
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split(")")[-1].split()[0] != "Z"


@pytest.fixture
def two_workers(
    tmp_path: Path, upstream: RecordingUpstream, redis_server: RedisServer
) -> Iterator[tuple[MailgateProcess, int]]:
    port = free_port()
    policy = write_policy(
        tmp_path / "workers.yaml",
        {
            "listen": [{"address": f"127.0.0.1:{port}"}],
            "upstream": upstream.url,
            "domains": ["example.com"],
            "workers": 2,
            "state": redis_server.url,
            "plugins": {"ratelimit": {"rules": [{"key": "client_ip", "rate": "10/1h"}]}},
        },
    )
    gateway = MailgateProcess(policy, tmp_path / "mailgate.log")
    try:
        wait_for(lambda: gateway.text().count("mailgate ready on") >= 2)
        yield gateway, port
    finally:
        gateway.kill()


def send(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("client.example.net")
        code, _ = client.mail("alice@example.net")
        if code != 250:
            return code
        client.rcpt("bob@example.com")
        return client.data(MESSAGE)[0]


@pytest.mark.redis
def test_two_workers_share_the_port_and_one_redis_limit(two_workers, upstream):
    gateway, port = two_workers
    codes = [send(port) for _ in range(24)]
    assert codes == [250] * 10 + [450] * 14
    assert len(upstream.messages) == 10
    # Both workers served connections (the kernel spreads them; 24 all on one: p = 2**-23).
    served = set(re.findall(r"mailgate\.decision: (worker\d)\[\d+\] txn=", gateway.text()))
    assert served == {"worker0", "worker1"}


@pytest.mark.redis
def test_a_dead_worker_is_restarted_and_sigterm_stops_them_all(two_workers):
    gateway, port = two_workers
    pids = gateway.worker_pids()
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: gateway.worker_pids()[0] != pids[0])
    wait_for(lambda: gateway.text().count("mailgate ready on") >= 3)
    assert "worker 0 (pid" in gateway.text()
    assert send(port) == 250
    gateway.process.send_signal(signal.SIGHUP)  # passed on: each worker reloads the policy
    wait_for(lambda: "SIGHUP: passing it on to the workers" in gateway.text())
    assert send(port) == 250
    workers = list(gateway.worker_pids().values())
    assert len(workers) == 2 and all(alive(pid) for pid in workers)
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(60) == 0
    wait_for(lambda: not any(alive(pid) for pid in workers))
    assert "stopping 2 workers" in gateway.text()


def test_workers_need_fixed_ports(tmp_path: Path):
    policy = write_policy(tmp_path / "p.yaml", {"upstream": "smtp://127.0.0.1:2600", "workers": 2})
    result = subprocess.run(
        [sys.executable, "-m", "mailgate", "check", "-c", str(policy)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "workers > 1 needs fixed listen ports" in result.stderr
