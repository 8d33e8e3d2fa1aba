"""Log targets of a real ``mailgate run``: syslog (over UDP, to a listener on loopback) and a
file that survives logrotate; bad targets are clear errors."""

from __future__ import annotations

import json
import logging
import os
import re
import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailgate.logformat import configure_logging
from mailgate.policy import Logging
from tests.ops_support import GatewayProcess, mailgate, wait_until
from tests.redis_support import free_port
from tests.support import MESSAGE
from tests.support import write_policy as harness_policy

MAIL_INFO = 2 * 8 + 6  # facility mail (2), severity info (6): <22>


def write_policy(tmp_path: Path, port: int, upstream_url: str, log: dict[str, Any]) -> Path:
    """A policy listening on ``port`` whose ``log`` section is ``log``."""
    policy = {"listen": [{"address": f"127.0.0.1:{port}"}], "upstream": upstream_url}
    return harness_policy(
        tmp_path / "policy.yaml", {**policy, "domains": ["example.com"], "log": log}
    )


def start(policy: Path, tmp_path: Path) -> GatewayProcess:
    """``mailgate run`` whose log goes elsewhere than standard error (so no ready line there)."""
    return GatewayProcess(policy, tmp_path / "stderr.log", ready=False)


@pytest.fixture
def syslog_listener() -> Iterator[socket.socket]:
    """A UDP socket on loopback standing in for a syslog daemon."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    yield sock
    sock.close()


def receive(sock: socket.socket, until: str, into: list[str], timeout: float = 30) -> bool:
    """Collect datagrams into ``into`` until one contains ``until``."""

    def got() -> bool:
        try:
            into.append(sock.recv(65536).decode())
        except TimeoutError:
            return False
        return until in into[-1]

    return any(until in line for line in into) or wait_until(got, timeout)


def send_mail(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
        client.mail("alice@example.net")
        assert client.rcpt("victim@elsewhere.org")[0] == 554


def run_to_syslog(
    tmp_path: Path, upstream_url: str, listener: socket.socket, **log: str
) -> tuple[GatewayProcess, int, list[str]]:
    """Run a gateway that logs to ``listener``, send :func:`send_mail`'s two transactions
    and stop it: the gateway, its port and the datagrams received so far."""
    port = free_port()
    log = {"target": "syslog", "syslog_address": f"127.0.0.1:{listener.getsockname()[1]}", **log}
    gw = start(write_policy(tmp_path, port, upstream_url, log), tmp_path)
    lines: list[str] = []
    try:
        assert receive(listener, "mailgate ready on", lines), (lines, gw.log)
        send_mail(port)
        assert receive(listener, "rejected_rcpts", lines)
    finally:
        assert gw.stop() == 0
    return gw, port, lines


def test_syslog_gets_every_line_with_the_mail_facility(tmp_path, upstream, syslog_listener):
    gw, port, lines = run_to_syslog(tmp_path, upstream.url, syslog_listener)
    receive(syslog_listener, "INFO mailgate: stopped", lines, timeout=5)
    pid = gw.proc.pid
    for line in lines:  # <PRI>mailgate[PID]: LEVEL LOGGER: MESSAGE, NUL-terminated
        assert re.fullmatch(rf"<\d+>mailgate\[{pid}\]: [A-Z]+ [\w.]+: .+\x00", line, re.S), line
    decisions = [line for line in lines if " mailgate.decision: " in line]
    assert len(decisions) == 2
    assert all(line.startswith(f"<{MAIL_INFO}>") for line in decisions)
    assert "outcome=delivered" in decisions[0] and "verdicts=relay.denied:reject" in decisions[1]
    assert f"<{MAIL_INFO}>mailgate[{pid}]: INFO mailgate: mailgate ready on 127.0.0.1:{port}" in (
        "".join(lines)
    )
    assert "mailgate ready" not in gw.log  # syslog instead of standard error


def test_syslog_with_json_and_another_facility(tmp_path, upstream, syslog_listener):
    gw, _, lines = run_to_syslog(
        tmp_path, upstream.url, syslog_listener, syslog_facility="local3", format="json"
    )
    local3_info = 19 * 8 + 6
    for line in lines:
        prefix = f"<{local3_info}>mailgate[{gw.proc.pid}]: "
        assert line.startswith(prefix) and line.endswith("\x00"), line
        entry = json.loads(line.removeprefix(prefix).removesuffix("\x00"))
        assert {"ts", "level", "logger", "msg"} <= entry.keys()
    assert any('"outcome": "delivered"' in line for line in lines)


def test_a_log_file_survives_logrotate(tmp_path, upstream):
    port = free_port()
    logfile = tmp_path / "log" / "mailgate.log"
    logfile.parent.mkdir()
    log = {"target": "file", "file": str(logfile)}
    gw = start(write_policy(tmp_path, port, upstream.url, log), tmp_path)
    try:
        assert wait_until(lambda: logfile.exists() and "mailgate ready on" in logfile.read_text())
        send_mail(port)
        assert wait_until(lambda: logfile.read_text().count("mailgate.decision") == 2)
        # logrotate (without copytruncate): move the file away; the gateway is not told.
        rotated = logfile.with_name("mailgate.log.1")
        os.rename(logfile, rotated)
        send_mail(port)
        assert wait_until(lambda: logfile.exists() and "mailgate.decision" in logfile.read_text())
        assert wait_until(lambda: logfile.read_text().count("mailgate.decision") == 2)
    finally:
        assert gw.stop() == 0
    old, new = rotated.read_text(), logfile.read_text()
    assert old.count("mailgate.decision") == 2 and "mailgate ready on" in old
    assert new.count("mailgate.decision") == 2 and "mailgate ready on" not in new
    assert "INFO mailgate: stopped" in new
    assert gw.log == ""


def test_bad_log_targets_are_clear_errors(tmp_path, upstream):
    port = free_port()
    path = write_policy(tmp_path, port, upstream.url, {"target": "file"})
    result = mailgate("check", "-c", str(path))
    assert result.returncode == 2
    assert f"{path}:7:1: log: target: file needs file: PATH" in result.stderr
    path = write_policy(tmp_path, port, upstream.url, {"file": "/tmp/x.log"})
    assert "file: is used only with target: file" in mailgate("check", "-c", str(path)).stderr
    path = write_policy(tmp_path, port, upstream.url, {"syslog_facility": "kern"})
    assert "log.syslog_facility: " in mailgate("check", "-c", str(path)).stderr
    missing = tmp_path / "no-syslog-here"
    path = write_policy(
        tmp_path, port, upstream.url, {"target": "syslog", "syslog_address": str(missing)}
    )
    result = mailgate("run", "-c", str(path))
    assert result.returncode == 1
    assert f"mailgate: log: cannot reach syslog at {missing}" in result.stderr
    assert "Traceback" not in result.stderr
    unwritable = tmp_path / "no-such-dir" / "mailgate.log"
    path = write_policy(tmp_path, port, upstream.url, {"target": "file", "file": str(unwritable)})
    result = mailgate("run", "-c", str(path))
    assert result.returncode == 1 and "mailgate: log: " in result.stderr
    assert str(unwritable) in result.stderr and "Traceback" not in result.stderr


def test_a_reload_moves_the_log_and_a_bad_target_keeps_the_old_one(tmp_path):
    """``configure_logging`` in this process: switch file -> file, then fail to open syslog."""
    root = logging.getLogger()
    before = list(root.handlers), root.level
    first, second = tmp_path / "one.log", tmp_path / "two.log"
    log = logging.getLogger("mailgate.test_targets")
    try:
        configure_logging(Logging(target="file", file=str(first)))
        log.info("to the first file: n=%d", 1)
        configure_logging(Logging(target="file", file=str(second), format="json"))
        log.info("to the second file: n=%d", 2)
        with pytest.raises(OSError, match="cannot reach syslog"):
            configure_logging(
                Logging(target="syslog", syslog_address=str(tmp_path / "none")), install=False
            )
        log.info("still the second file: n=%d", 3)
        ours = [h for h in root.handlers if h.name == "mailgate"]
        assert len(ours) == 1
    finally:
        for handler in root.handlers:
            if handler not in before[0]:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(before[1])
    assert first.read_text().endswith("INFO mailgate.test_targets: to the first file: n=1\n")
    lines = [json.loads(line) for line in second.read_text().splitlines()]
    assert [(e["msg"], e["n"]) for e in lines] == [
        ("to the second file: n=2", 2),
        ("still the second file: n=3", 3),
    ]
