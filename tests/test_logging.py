"""Logs of a real ``mailgate run``: text or JSON lines, decision lines, debug verdicts, no leaks."""

from __future__ import annotations

import json
import logging
import smtplib
import sys

import pytest
import yaml

from mailgate.logformat import JsonFormatter
from tests.ops_support import GatewayProcess, wait_until
from tests.support import MESSAGE

RULE = "tests.ops_plugins:Rule"
BODY_MARKER = b"body-marker-7f3a"
SUBJECT_MARKER = b"subject-marker-91c2"
SECRET = "secret-value-5d8e"


def run_gateway(tmp_path, upstream, log: dict[str, str]) -> GatewayProcess:
    policy = {
        "hostname": "mailgate.test",
        "listen": [{"address": "127.0.0.1:0"}],
        "upstream": upstream.url,
        "domains": ["example.com"],
        "log": log,
        "plugins": {
            "stamp": {
                "module": RULE,
                "hook": "on_data",
                "rule": "probe.stamp",
                "score": 1,
                "secret": {"env": "MAILGATE_TEST_SECRET"},
            }
        },
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return GatewayProcess(path, tmp_path / "gateway.log")


def send_traffic(gw: GatewayProcess) -> None:
    message = MESSAGE.replace(b"Subject: hello", b"Subject: " + SUBJECT_MARKER)
    message += BODY_MARKER + b"\r\n"
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=20) as client:
        client.ehlo("client.example.net")
        client.sendmail("alice@example.net", ["bob@example.com"], message)
        client.mail("alice@example.net")
        assert client.rcpt("victim@elsewhere.org")[0] == 554
        client.rset()


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILGATE_TEST_SECRET", SECRET)


def assert_no_leaks(log: str) -> None:
    for marker in (BODY_MARKER.decode(), SUBJECT_MARKER.decode(), SECRET):
        assert marker not in log, marker


@pytest.mark.usefixtures("secret_env")
def test_json_lines_carry_the_decision_fields(tmp_path, upstream):
    gw = run_gateway(tmp_path, upstream, {"format": "json", "level": "debug"})
    try:
        send_traffic(gw)
        assert wait_until(lambda: gw.log.count('"logger": "mailgate.decision"') == 2)
    finally:
        assert gw.stop() == 0
    entries = [json.loads(line) for line in gw.log.splitlines()]  # every line is JSON
    assert all({"ts", "level", "logger", "msg"} <= entry.keys() for entry in entries)
    delivered, refused = (e for e in entries if e["logger"] == "mailgate.decision")
    assert delivered["outcome"] == "delivered" and delivered["stage"] == "data"
    assert delivered["rcpts"] == ["<bob@example.com>"]
    assert delivered["verdicts"] == ["probe.stamp:tag"]
    assert delivered["score"] == 1 and delivered["client"] == "127.0.0.1"
    assert delivered["upstream"].startswith("250 2.0.0 Ok: queued as")
    assert delivered["msg"].startswith(f"txn={delivered['txn']} client=127.0.0.1")
    assert refused["rejected_rcpts"] == ["<victim@elsewhere.org>:554"]
    assert refused["verdicts"] == ["relay.denied:reject"]
    # Debug level: one line per verdict, naming the rule.
    verdict_lines = [e["msg"] for e in entries if e["msg"].startswith("verdict: ")]
    assert any("rule=relay.denied action=reject enforced=True" in m for m in verdict_lines)
    assert any("rule=probe.stamp action=tag" in m for m in verdict_lines)
    assert_no_leaks(gw.log)


@pytest.mark.usefixtures("secret_env")
def test_text_lines_by_default_and_no_debug_lines_at_info(tmp_path, upstream):
    gw = run_gateway(tmp_path, upstream, {})
    try:
        send_traffic(gw)
        assert wait_until(lambda: gw.log.count(" INFO mailgate.decision: ") == 2)
    finally:
        assert gw.stop() == 0
    decisions = [line for line in gw.log.splitlines() if " mailgate.decision: " in line]
    assert "verdicts=probe.stamp:tag score=1 outcome=delivered stage=data" in decisions[0]
    assert "rejected_rcpts=<victim@elsewhere.org>:554 verdicts=relay.denied:reject" in decisions[1]
    assert "verdict: " not in gw.log
    assert not any(line.lstrip().startswith("{") for line in gw.log.splitlines())
    assert_no_leaks(gw.log)


def test_json_formatter_keeps_exceptions_and_never_lets_fields_override_its_own():
    record = logging.LogRecord("mailgate.x", logging.ERROR, __file__, 1, "boom %s", ("now",), None)
    record.decision = {"msg": "not this", "txn": "abc.1"}
    try:
        raise ValueError("inner")
    except ValueError:
        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "boom now" and entry["txn"] == "abc.1"
    assert entry["level"] == "error" and "ValueError: inner" in entry["exc"]
