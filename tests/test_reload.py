"""Reload and shutdown of a real ``mailgate run`` process: SIGHUP, ``mailgate reload``, SIGTERM."""

from __future__ import annotations

import signal
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailgate.policy import Policy
from mailgate.reload import changed_keys, restart_only
from tests.ops_support import GatewayProcess, mailgate, wait_until
from tests.support import MESSAGE, RecordingUpstream

RULE = "tests.ops_plugins:Rule"


def policy_text(upstream: RecordingUpstream, pid_file: Path, **extra: Any) -> str:
    policy = {
        "hostname": "mailgate.test",
        "listen": [{"address": "127.0.0.1:0"}],
        "upstream": upstream.url,
        "pid_file": str(pid_file),
        "domains": ["example.com"],
        **extra,
    }
    return yaml.safe_dump(policy, sort_keys=False)


def stamp(value: str) -> dict[str, Any]:
    """A plugin that adds ``X-Policy: value`` to every message."""
    return {"stamp": {"module": RULE, "hook": "on_data", "headers": {"X-Policy": value}}}


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for process in started:
        process.stop()


def start(started: list[GatewayProcess], policy: Path, tmp_path: Path) -> GatewayProcess:
    process = GatewayProcess(policy, tmp_path / f"gateway{len(started)}.log")
    started.append(process)
    return process


def connect(process: GatewayProcess) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", process.port, timeout=20)
    client.ehlo("client.example.net")
    return client


def test_sighup_swaps_the_policy_while_a_session_finishes_on_the_old_one(
    upstream, tmp_path, gateway_process
):
    pid_file = tmp_path / "mailgate.pid"
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(upstream, pid_file, plugins=stamp("one")))
    gw = start(gateway_process, policy, tmp_path)
    assert pid_file.read_text() == f"{gw.proc.pid}\n"

    old = connect(gw)  # mid-transaction when the reload happens
    old.mail("alice@example.net")
    assert old.rcpt("bob@example.com")[0] == 250

    policy.write_text(
        policy_text(upstream, pid_file, domains=["example.org"], plugins=stamp("two"))
    )
    result = mailgate("reload", "-c", str(policy))
    assert result.returncode == 0, result.stderr
    assert f"pid {gw.proc.pid}" in result.stdout
    assert gw.wait_log("policy reloaded: file=")
    assert "changed=domains,plugins.stamp" in gw.log

    # The session in flight finishes on the policy it started with ...
    assert old.data(MESSAGE)[0] == 250
    # ... and keeps it for its next transaction too.
    old.sendmail("alice@example.net", ["carol@example.com"], MESSAGE)
    # A new connection gets the new policy.
    new = connect(gw)
    new.mail("alice@example.net")
    assert new.rcpt("bob@example.com")[0] == 554
    assert new.rcpt("dave@example.org")[0] == 250
    assert new.data(MESSAGE)[0] == 250
    new.quit()
    assert [m.recipients for m in upstream.messages] == [
        ["bob@example.com"],
        ["carol@example.com"],
        ["dave@example.org"],
    ]
    stamps = [m.data.split(b"X-Policy: ")[1][:3] for m in upstream.messages]
    assert stamps == [b"one", b"one", b"two"]

    # The old policy is stopped once its last session has gone.
    assert "previous policy stopped" not in gw.log
    old.quit()
    assert gw.wait_log("previous policy stopped")


def test_an_invalid_policy_is_refused_and_the_old_one_keeps_serving(
    upstream, tmp_path, gateway_process
):
    pid_file = tmp_path / "mailgate.pid"
    policy = tmp_path / "policy.yaml"
    good = policy_text(upstream, pid_file)
    policy.write_text(good)
    gw = start(gateway_process, policy, tmp_path)
    client = connect(gw)
    client.mail("alice@example.net")

    broken = good.replace("domains:", "domians:")
    policy.write_text(broken)
    line = broken.splitlines().index("domians:") + 1
    # mailgate reload checks first and does not signal a gateway with a bad policy ...
    result = mailgate("reload", "-c", str(policy))
    assert result.returncode == 2
    assert f"{policy}:{line}:1: domians: unknown key" in result.stderr
    # ... and a SIGHUP sent anyway (no -c: nothing checked) is refused by the gateway.
    assert mailgate("reload", "--pid-file", str(pid_file)).returncode == 0
    assert gw.wait_log("reload failed")
    assert f"{policy}:{line}:1: domians: unknown key" in gw.log
    assert "policy reloaded" not in gw.log

    # Still serving the old policy, on the session that was open and on new ones.
    assert client.rcpt("bob@example.com")[0] == 250
    assert client.data(MESSAGE)[0] == 250
    client.quit()
    with connect(gw) as again:
        again.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert len(upstream.messages) == 2


def test_sigterm_lets_the_transaction_in_flight_finish(upstream, tmp_path, gateway_process):
    pid_file = tmp_path / "mailgate.pid"
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(upstream, pid_file, shutdown_timeout="60s"))
    gw = start(gateway_process, policy, tmp_path)
    client = connect(gw)
    client.mail("alice@example.net")
    client.rcpt("bob@example.com")

    gw.signal(signal.SIGTERM)
    assert gw.wait_log("waiting up to 60s for 1 transaction")

    def refused() -> bool:
        try:
            smtplib.SMTP("127.0.0.1", gw.port, timeout=5).close()
        except OSError:
            return True
        return False

    assert wait_until(refused)  # no new connections
    assert gw.proc.poll() is None  # but still running for the client in flight
    assert client.data(MESSAGE)[0] == 250
    client.close()
    assert gw.proc.wait(30) == 0
    assert len(upstream.messages) == 1
    assert not pid_file.exists()
    assert "unfinished" not in gw.log


def test_sigterm_gives_up_on_a_stuck_transaction_at_the_deadline(
    upstream, tmp_path, gateway_process
):
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(upstream, tmp_path / "mailgate.pid", shutdown_timeout="1s"))
    gw = start(gateway_process, policy, tmp_path)
    client = connect(gw)
    client.mail("alice@example.net")  # and then nothing more
    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(30) == 0
    assert "stopping with 1 transaction(s) unfinished" in gw.log
    assert upstream.messages == []
    client.close()


def test_a_second_gateway_with_the_same_live_pid_file_does_not_start(
    upstream, tmp_path, gateway_process
):
    pid_file = tmp_path / "mailgate.pid"
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(upstream, pid_file))
    gw = start(gateway_process, policy, tmp_path)
    result = mailgate("run", "-c", str(policy), timeout=30)
    assert result.returncode == 1
    assert f"already running with pid {gw.proc.pid}" in result.stderr
    assert pid_file.read_text() == f"{gw.proc.pid}\n"


def test_reload_without_a_running_gateway_says_so(tmp_path):
    missing = mailgate("reload", "--pid-file", str(tmp_path / "none.pid"))
    assert missing.returncode == 1 and "no pid file" in missing.stderr
    stale = tmp_path / "stale.pid"
    stale.write_text("999999999\n")  # above any pid_max: no such process
    result = mailgate("reload", "--pid-file", str(stale))
    assert result.returncode == 1 and "no process 999999999" in result.stderr
    nothing = mailgate("reload")
    assert nothing.returncode == 1 and "--pid-file" in nothing.stderr


def test_a_second_sigterm_stops_without_waiting(upstream, tmp_path, gateway_process):
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(upstream, tmp_path / "mailgate.pid", shutdown_timeout="10m"))
    gw = start(gateway_process, policy, tmp_path)
    client = connect(gw)
    client.mail("alice@example.net")
    gw.signal(signal.SIGTERM)
    assert gw.wait_log("waiting up to 600s for 1 transaction")
    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(30) == 0
    assert "stopping with 1 transaction(s) unfinished" in gw.log
    client.close()


def test_a_reload_names_what_changed_and_what_needs_a_restart():
    def parse(**keys: Any) -> Policy:
        return Policy.model_validate({"domains": ["example.com"], **keys})

    old = parse(plugins={"a": {}, "b": {"x": 1}, "c": None})
    new = parse(
        listen=[{"address": "127.0.0.1:2600"}],
        log={"level": "debug"},
        plugins={"b": {"x": 2}, "c": None, "d": {}},
    )
    changed = changed_keys(old, new)
    assert changed == [
        "listen",
        "log",
        "plugins.b",
        "plugins.d (added)",
        "plugins.a (removed)",
    ]
    assert restart_only(changed) == ["listen"]
    assert changed_keys(old, old) == []
    reordered = parse(plugins={"c": None, "b": {"x": 1}, "a": {}})
    assert changed_keys(old, reordered) == ["plugins (order)"]
