"""Logs of a real ``mailgate run``: text or JSON lines, decision lines, debug verdicts, no leaks."""

from __future__ import annotations

import json
import logging
import re
import signal
import smtplib
import sys

import pytest
import yaml

from mailgate.logfields import structure
from mailgate.logformat import WORKER_ATTR, JsonFormatter, TextFormatter
from tests.ops_support import GatewayProcess, wait_until
from tests.redis_support import free_port
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
    record.fields = {"msg": "not this", "txn": "abc.1"}
    try:
        raise ValueError("inner")
    except ValueError:
        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "boom now" and entry["txn"] == "abc.1"
    assert entry["level"] == "error" and "ValueError: inner" in entry["exc"]


def test_with_json_every_line_of_a_run_is_a_json_object_with_its_fields(tmp_path, upstream):
    """Accepted and refused mail, a plugin failure, a refused connection, a bad reload."""
    policy = {
        "hostname": "mailgate.test",
        "listen": [{"address": "127.0.0.1:0"}],
        "upstream": upstream.url,
        "domains": ["example.com"],
        "limits": {"connections_per_ip": 1},
        "log": {"format": "json"},
        "plugins": {
            "boom": {
                "module": RULE,
                "hook": "on_rcpt",
                "action": "raise",
                "only_recipient": "broken@example.com",
            }
        },
    }
    path = tmp_path / "policy.yaml"
    good = yaml.safe_dump(policy, sort_keys=False)
    path.write_text(good)
    gw = GatewayProcess(path, tmp_path / "gateway.log")
    try:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=20) as client:
            client.ehlo("client.example.net")
            client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
            client.mail("alice@example.net")
            assert client.rcpt("victim@elsewhere.org")[0] == 554
            assert client.rcpt("broken@example.com")[0] == 451
            client.rset()
            # A second connection from the same address: refused by the SMTP server.
            with smtplib.SMTP(timeout=20) as second:
                assert second.connect("127.0.0.1", gw.port)[0] == 421
        path.write_text(good.replace("domains:", "domians:"))
        gw.signal(signal.SIGHUP)
        assert gw.wait_log("reload failed")
        path.write_text(good)
        gw.signal(signal.SIGHUP)
        assert gw.wait_log("policy reloaded")
    finally:
        assert gw.stop() == 0
    lines = gw.log.splitlines()
    entries = [json.loads(line) for line in lines]  # every line: one JSON object
    assert all(
        isinstance(e, dict) and {"ts", "level", "logger", "msg"} <= e.keys() for e in entries
    )
    ready = next(e for e in entries if e["msg"].startswith("mailgate ready on"))
    assert ready["host"] == "127.0.0.1" and ready["port"] == gw.port
    decisions = [e for e in entries if e["logger"] == "mailgate.decision"]
    delivered = next(e for e in decisions if e.get("outcome") == "delivered")
    assert delivered["rcpts"] == ["<bob@example.com>"] and delivered["client"] == "127.0.0.1"
    refused = next(e for e in decisions if e.get("rejected_rcpts"))
    assert refused["rejected_rcpts"] == [
        "<victim@elsewhere.org>:554",
        "<broken@example.com>:451",
    ]
    crowd = next(e for e in decisions if e.get("outcome") == "too many connections from client")
    assert crowd["client"] == "127.0.0.1" and crowd["reply"].startswith("421 ")
    failure = next(e for e in entries if e["msg"].startswith("plugin error:"))
    assert failure["level"] == "error" and failure["plugin"] == "boom"
    assert failure["hook"] == "on_rcpt" and failure["txn"] == refused["txn"]
    assert "RuntimeError: probe failure" in failure["exc"]
    reload_failed = next(e for e in entries if e["msg"].startswith("reload failed"))
    assert reload_failed["level"] == "error"
    assert reload_failed["error"].endswith("domians: unknown key")
    reloaded = next(e for e in entries if e["msg"].startswith("policy reloaded"))
    assert reloaded["file"] == str(path) and reloaded["changed"] == "nothing"


@pytest.mark.usefixtures("secret_env")
def test_text_lines_quote_values_one_way(tmp_path, upstream):
    gw = run_gateway(tmp_path, upstream, {})
    try:
        good = (tmp_path / "policy.yaml").read_text()
        (tmp_path / "policy.yaml").write_text(good.replace("domains:", "domians:"))
        gw.signal(signal.SIGHUP)
        assert gw.wait_log("reload failed")
        (tmp_path / "policy.yaml").write_text(good)
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=20) as client:
            client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
        assert gw.wait_log(" INFO mailgate.decision: ")
    finally:
        assert gw.stop() == 0
    [failed] = [line for line in gw.log.splitlines() if "reload failed" in line]
    # A value with spaces: in double quotes, as on the decision line; never Python's quotes.
    assert failed.endswith(f'error="{tmp_path / "policy.yaml"}:5:1: domians: unknown key"')
    [decision] = [line for line in gw.log.splitlines() if " mailgate.decision: " in line]
    assert ' reply="250 2.0.0 Ok: queued as ' in decision
    assert "'" not in gw.log


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("mailgate.x", logging.INFO, __file__, 1, msg, args, None)


def test_fields_come_from_the_format_string_and_values_are_quoted_one_way():
    record = _record(
        "delivery id=%s to=%s ms=%.1f retries=%d reply=%r 100%% done, %s",
        "Q1",
        "<a b@example.com>",
        2.25,
        3,
        'say "hi"',
        "free text x=y",
    )
    text, fields = structure(record)
    assert text == (
        'delivery id=Q1 to="<a b@example.com>" ms=2.2 retries=3 reply="say \\"hi\\"" '
        "100% done, free text x=y"
    )
    # Keys come from the code, never from a value: "x" is not a field.
    assert fields == {
        "id": "Q1",
        "to": "<a b@example.com>",
        "ms": 2.25,
        "retries": 3,
        "reply": 'say "hi"',
    }
    entry = json.loads(JsonFormatter().format(record))
    assert entry["ms"] == 2.25 and entry["retries"] == 3 and entry["msg"] == text
    # Lines without fields, and calls that do not fit their format, render as logging does.
    assert structure(_record("listening on %s", ("::1", 25))) == ("listening on ('::1', 25)", {})
    with pytest.raises(TypeError):  # as record.getMessage() does; the handler reports it
        structure(_record("odd id=%s %s", "only one"))
    named = logging.LogRecord("x", 20, __file__, 1, "n=%(n)d", ({"n": 4},), None)
    assert structure(named) == ("n=4", {"n": 4})


def test_with_json_queue_lines_carry_their_fields(tmp_path, upstream):
    policy = {
        "hostname": "mailgate.test",
        "listen": [{"address": "127.0.0.1:0"}],
        "upstream": upstream.url,
        "domains": ["example.com"],
        "delivery": "queue",
        "queue": {"directory": str(tmp_path / "spool"), "retry_min": "1s", "scan_interval": "1s"},
        "log": {"format": "json"},
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    upstream.behaviour.data_reply = "451 4.3.0 Try later"
    gw = GatewayProcess(path, tmp_path / "gateway.log")
    try:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=20) as client:
            client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)  # spooled: 250
        assert gw.wait_log('"msg": "queued id=')
        upstream.behaviour.data_reply = None
        assert gw.wait_log('"outcome": "sent"')
    finally:
        assert gw.stop() == 0
    entries = [json.loads(line) for line in gw.log.splitlines()]
    queued = next(e for e in entries if e["msg"].startswith("queued "))
    assert queued["from"] == "<alice@example.net>" and queued["rcpts"] == 1
    assert queued["size"] > 0 and queued["logger"] == "mailgate.queue"
    sent = next(e for e in entries if e.get("outcome") == "sent")
    assert sent["id"] == queued["id"] and sent["to"] == "<bob@example.com>"
    assert sent["reply"].startswith("250 ")


def test_with_json_and_workers_the_worker_and_plugin_warnings_are_fields(tmp_path, dns_server):
    """Two workers, JSON: each line has worker and pid keys; dnsbl's DNS timeout has its fields."""
    dns_server.timeout("1.0.0.127.slow.example")  # 127.0.0.1 reversed: never answered
    port = free_port()
    policy = {
        "hostname": "mailgate.test",
        "listen": [{"address": f"127.0.0.1:{port}"}],
        "upstream": f"maildir:{tmp_path / 'mail'}",
        "domains": ["example.com"],
        "workers": 2,
        "dns": {"nameservers": [dns_server.address], "timeout": "1s"},
        "log": {"format": "json"},
        "plugins": {"dnsbl": {"sites": ["slow.example"]}},
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    gw = GatewayProcess(path, tmp_path / "gateway.log")
    try:
        assert wait_until(lambda: gw.log.count("mailgate ready on") == 2)
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.ehlo("client.example.net")
            client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    finally:
        assert gw.stop() == 0
    entries = [json.loads(line) for line in gw.log.splitlines()]  # every line: one JSON object
    ready = [e for e in entries if e["msg"].startswith("mailgate ready on")]
    assert sorted(e["worker"] for e in ready) == [0, 1]
    assert all(isinstance(e["pid"], int) and e["pid"] > 0 for e in ready)
    assert not [e for e in entries if re.match(r"worker\d+\[", e["msg"])]  # no label in msg
    supervisor = next(e for e in entries if e["msg"].startswith("worker 0 started"))
    assert "worker" not in supervisor  # the parent's own lines carry no worker key
    warning = next(e for e in entries if e["msg"].startswith("dnsbl zone not answered"))
    assert warning["level"] == "warning" and warning["plugin"] == "dnsbl"
    assert warning["zone"] == "slow.example" and warning["client"] == "127.0.0.1"
    assert warning["error"] and warning["worker"] in (0, 1)
    decision = next(e for e in entries if e.get("outcome") == "delivered")
    assert decision["txn"].startswith(warning["txn"] + ".")  # the session's transaction
    assert decision["worker"] == warning["worker"]


def test_a_worker_label_starts_text_lines_and_is_two_keys_in_json():
    record = logging.LogRecord("mailgate.x", logging.INFO, __file__, 1, "hello n=%s", (3,), None)
    setattr(record, WORKER_ATTR, (2, 4242))
    assert TextFormatter("%(message)s").format(record) == "worker2[4242] hello n=3"
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["msg"], entry["worker"], entry["pid"], entry["n"]) == ("hello n=3", 2, 4242, 3)


def test_text_time_is_logging_formatters_across_seconds_and_with_a_datefmt():
    """The per-second cache of the date part gives ``logging.Formatter``'s text exactly."""
    ours, stdlib = (
        TextFormatter("%(asctime)s %(message)s"),
        logging.Formatter("%(asctime)s %(message)s"),
    )
    record = logging.LogRecord("mailgate.decision", logging.INFO, __file__, 1, "x", None, None)
    for created in (
        1_764_900_000.001,
        1_764_900_000.999,
        1_764_900_001.0,
        1_764_900_000.5,
        86_399.75,
    ):
        record.created, record.msecs = created, int((created - int(created)) * 1000)
        assert ours.format(record) == stdlib.format(record)
        assert ours.formatTime(record, "%H:%M") == stdlib.formatTime(record, "%H:%M")
