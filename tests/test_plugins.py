"""Plugins over real SMTP: sync, async, raising, slow and monitor-mode plugins; scoring."""

from __future__ import annotations

import smtplib
import time

import pytest

from tests.sample_plugins import Recorder
from tests.support import MESSAGE


def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_sync_plugin_rejects_at_mail_and_nothing_goes_upstream(make_gateway, upstream, decisions):
    gw = make_gateway(
        plugins={"block": {"module": "tests.sample_plugins:BlockSender", "sender": "bad@spam.test"}}
    )
    with gw.client() as client:
        code, text = client.mail("bad@spam.test")
        assert (code, text) == (550, b"5.7.1 sender bad@spam.test is blocked")
        client.sendmail("good@example.net", ["bob@example.com"], MESSAGE)
    assert upstream.mail_commands == 1
    refused, delivered = decisions()
    assert "verdicts=block.sender:reject" in refused and "outcome=rejected stage=mail" in refused
    assert "outcome=delivered" in delivered


def test_async_plugin_tags_and_the_score_crosses_the_tag_threshold(make_gateway, upstream):
    gw = make_gateway(
        plugins={
            "subj": {"module": "tests.sample_plugins:SubjectScore", "word": "hello", "score": 6}
        },
        scoring={"tag": 5, "reject": 15},
    )
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    data = upstream.messages[0].data
    assert b"\r\nX-Subject-Word: hello\r\n" in data
    assert b"\r\nX-Spam-Flag: YES\r\n" in data
    assert b"\r\nX-Spam-Score: 6\r\n" in data


def test_score_over_reject_threshold_refuses_and_resets_upstream(make_gateway, upstream, decisions):
    gw = make_gateway(
        plugins={
            "subj": {"module": "tests.sample_plugins:SubjectScore", "word": "hello", "score": 20}
        },
    )
    with gw.client() as client, pytest.raises(smtplib.SMTPDataError) as err:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert err.value.smtp_code == 550
    assert err.value.smtp_error.startswith(b"5.7.1")
    assert upstream.messages == []
    assert upstream.rsets == 1
    [line] = decisions()
    assert "verdicts=subject.word:tag,score.reject:reject score=20" in line
    assert "outcome=rejected stage=data" in line


def test_monitor_mode_logs_but_never_changes_the_reply(make_gateway, upstream, decisions):
    gw = make_gateway(
        plugins={
            "block": {
                "module": "tests.sample_plugins:BlockSender",
                "sender": "bad@spam.test",
                "mode": "monitor",
            }
        }
    )
    with gw.client() as client:
        client.sendmail("bad@spam.test", ["bob@example.com"], MESSAGE)
    assert len(upstream.messages) == 1
    [line] = decisions()
    assert "verdicts=block.sender:reject(monitor)" in line
    assert "outcome=delivered" in line


def test_rule_modes_put_one_rule_in_monitor(make_gateway, upstream, decisions):
    gw = make_gateway(
        plugins={
            "subj": {
                "module": "tests.sample_plugins:SubjectScore",
                "word": "hello",
                "score": 20,
                "rule_modes": {"subject.word": "monitor"},
            }
        }
    )
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert b"X-Subject-Word" not in upstream.messages[0].data
    assert "subject.word:tag(monitor)" in decisions()[0]


def test_raising_plugin_gives_451_and_a_log_line_with_the_traceback(
    make_gateway, upstream, caplog, decisions
):
    gw = make_gateway(plugins={"boom": {"module": "tests.sample_plugins:Raising"}})
    with gw.client() as client, pytest.raises(smtplib.SMTPDataError) as err:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert err.value.smtp_code == 451
    assert err.value.smtp_error.startswith(b"4.3.0")
    assert b"secret" not in err.value.smtp_error
    assert upstream.messages == []
    [error] = [r for r in caplog.records if r.name == "mailgate.plugins"]
    txn_id = decisions()[0].split()[0].removeprefix("txn=")
    assert f"txn={txn_id} plugin=boom hook=on_data raised RuntimeError" in error.getMessage()
    assert error.exc_info is not None


def test_raising_plugin_in_monitor_mode_does_not_block_mail(make_gateway, upstream):
    gw = make_gateway(
        plugins={"boom": {"module": "tests.sample_plugins:Raising", "mode": "monitor"}}
    )
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert len(upstream.messages) == 1


def test_slow_plugin_times_out_with_451(make_gateway, upstream, caplog):
    gw = make_gateway(plugins={"slow": {"module": "tests.sample_plugins:Slow", "timeout": "0.3s"}})
    with gw.client() as client:
        client.mail("alice@example.net")
        code, text = client.rcpt("bob@example.com")
    assert code == 451
    assert text.startswith(b"4.3.0")
    assert any("timed out after 0.3s" in r.getMessage() for r in caplog.records)


def test_accept_at_rcpt_pre_empts_relay_control(make_gateway, upstream):
    gw = make_gateway(
        plugins={
            "allow": {
                "module": "tests.sample_plugins:AllowList",
                "recipients": ["partner@elsewhere.org"],
            }
        }
    )
    with gw.client() as client:
        client.mail("alice@example.net")
        assert client.rcpt("partner@elsewhere.org")[0] == 250
        assert client.rcpt("stranger@elsewhere.org")[0] == 554


def test_hooks_run_in_smtp_order_with_the_right_arguments(make_gateway, upstream):
    Recorder.calls.clear()
    gw = make_gateway(plugins={"rec": {"module": "tests.sample_plugins:Recorder"}})
    with gw.client(helo="sender.example.net") as client:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    _wait_for(lambda: "disconnect" in Recorder.calls)
    calls = Recorder.calls
    assert calls[0] == "connect:127.0.0.1"
    assert calls[1:5] == [
        "helo:sender.example.net",
        "mail:alice@example.net",
        "rcpt:bob@example.com",
        f"data:{len(MESSAGE)}",
    ]
    assert calls[5].startswith("delivered:")
    assert calls[-1] == "disconnect"


def test_connect_refusal_replaces_the_banner(make_gateway, upstream):
    gw = make_gateway(plugins={"no": {"module": "tests.sample_plugins:RefuseConnect"}})
    with pytest.raises(smtplib.SMTPConnectError) as err:
        smtplib.SMTP("127.0.0.1", gw.port, timeout=5)
    assert err.value.smtp_code == 554
    assert err.value.smtp_error == b"5.7.1 Go away"


def test_plugins_run_in_policy_order(make_gateway, upstream, decisions):
    gw = make_gateway(
        plugins={
            "first": {"module": "tests.sample_plugins:SubjectScore", "word": "hello", "score": 1},
            "second": {"module": "tests.sample_plugins:BlockSender", "sender": "x@y.test"},
            "third": {"module": "tests.sample_plugins:Recorder"},
        }
    )
    assert gw.runtime.plugin_set.call_order("on_data") == ["first", "third", "auth_results"]
    assert gw.runtime.plugin_set.call_order("on_rcpt") == ["third", "relay_access"]
