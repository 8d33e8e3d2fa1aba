"""Quarantine: a verdict holds mail in the spool; ``mailgate queue`` shows, releases, deletes it."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from mailgate.cli import main as mailgate
from mailgate.metrics import Metrics
from mailgate.queue.spool import STATS
from tests.ops_support import wait_until
from tests.support import MESSAGE, envelopes

HOLD = "tests.queue_plugins:Hold"
MARKED = MESSAGE.replace(b"Subject: hello", b"Subject: quarantine-me")


@pytest.fixture
def policy(spool: Path) -> Callable[..., dict[str, Any]]:
    """A policy with the Hold plugin; ``mode`` is the delivery mode."""

    def make(
        mode: str = "queue", hold: dict[str, Any] | None = None, **extra: Any
    ) -> dict[str, Any]:
        queue = {"directory": str(spool), "retry_min": "1s", "scan_interval": "1s"}
        return {
            "delivery": mode,
            "queue": queue,
            "plugins": {"hold": {"module": HOLD, **(hold or {})}},
            **extra,
        }

    return make


def send(gw: Any, message: bytes = MARKED) -> tuple[int, bytes]:
    """One message from alice to bob; the reply to DATA."""
    with gw.client() as client:
        client.mail("alice@example.net")
        client.rcpt("bob@example.com")
        return client.data(message)


def held_id(reply: tuple[int, bytes]) -> str:
    """The queue id in ``250 2.0.0 Ok: held as ID``."""
    found = re.fullmatch(rb"2\.0\.0 Ok: held as ([0-9A-F]+)", reply[1])
    assert reply[0] == 250 and found, reply
    return found.group(1).decode()


@pytest.mark.parametrize("mode", ["queue", "inline"])
def test_quarantined_mail_is_held_shown_and_released(
    make_gateway, upstream, policy, spool, capsys, mode
):
    gw = make_gateway(**policy(mode))
    config = str(gw.policy_path)
    queue_id = held_id(send(gw))
    assert send(gw, MESSAGE)[0] == 250  # unmarked mail passes
    assert wait_until(lambda: len(upstream.messages) == 1)
    [env] = envelopes(spool)
    assert (env["id"], env["held"], env["hold_rules"]) == (queue_id, True, ["test.hold"])
    assert env["hold_reason"] == "carries 'quarantine-me'"
    assert "test.hold:quarantine" in env["verdicts"]
    time.sleep(1.5)  # a scan later: held mail is not delivered
    assert len(upstream.messages) == 1
    capsys.readouterr()
    assert mailgate(["queue", "-c", config, "list", "--held"]) == 0
    listing = capsys.readouterr().out
    assert f"{queue_id}  HELD" in listing and "-- 1 held message(s)" in listing
    assert "reason: carries 'quarantine-me'" in listing
    assert mailgate(["queue", "-c", config, "show", queue_id]) == 0
    shown = capsys.readouterr().out
    assert "state: held" in shown and "from: <alice@example.net>" in shown
    assert "to: <bob@example.com>" in shown and "hold rules: test.hold" in shown
    assert "verdicts: test.hold:quarantine" in shown
    assert "  Subject: quarantine-me" in shown and "Hello Bob" not in shown
    assert mailgate(["queue", "-c", config, "show", "--raw", queue_id]) == 0
    raw = capsys.readouterr().out
    assert raw.startswith("Received: ") and raw.endswith(MARKED.decode())
    assert mailgate(["queue", "-c", config, "release", queue_id]) == 0
    assert wait_until(lambda: len(upstream.messages) == 2)
    released = upstream.messages[1]
    assert released.recipients == ["bob@example.com"] and released.data.endswith(MARKED)
    assert wait_until(lambda: envelopes(spool) == [])


def test_a_later_reject_wins_over_a_quarantine(make_gateway, upstream, policy, spool):
    gw = make_gateway(**policy(hold={"score": 20}))  # past scoring.reject (15)
    code, _ = send(gw)
    assert code == 550
    assert envelopes(spool) == []


def test_scoring_threshold_quarantines(make_gateway, upstream, policy, spool):
    gw = make_gateway(
        **policy("inline", hold={"marker": "", "score": 12}),
        scoring={"quarantine": 10, "reject": 15},
    )
    queue_id = held_id(send(gw, MESSAGE))
    [env] = envelopes(spool)
    assert env["id"] == queue_id and env["hold_rules"] == ["score.quarantine"]
    assert "score 12 >= quarantine threshold 10" in env["hold_reason"]
    assert upstream.messages == []


def test_hold_delete_and_counts(make_gateway, upstream, policy, spool, capsys):
    upstream.stop()
    gw = make_gateway(**policy())
    config = str(gw.policy_path)
    assert send(gw, MESSAGE)[0] == 250  # the upstream is down: queued
    [env] = envelopes(spool)
    assert mailgate(["queue", "-c", config, "hold", env["id"]]) == 0
    held = held_id(send(gw))
    assert wait_until(lambda: STATS.held == 2)
    exposed = generate_latest(Metrics().registry).decode()
    assert 'mailgate_queue_messages{state="held"} 2.0' in exposed
    upstream.start()
    time.sleep(1.5)  # due, but held: not delivered
    assert upstream.messages == []
    assert mailgate(["queue", "-c", config, "delete", held]) == 0
    assert mailgate(["queue", "-c", config, "release", env["id"]]) == 0
    assert wait_until(lambda: len(upstream.messages) == 1)
    assert wait_until(lambda: envelopes(spool) == [] and STATS.held == 0)
    assert mailgate(["queue", "-c", config, "release", held]) == 1  # gone


def test_held_mail_survives_a_restart(make_gateway, upstream, policy, spool, capsys):
    gw = make_gateway(**policy("inline"))
    queue_id = held_id(send(gw))
    gw.stop()
    gw = make_gateway(**policy("inline"))
    time.sleep(1.5)
    assert upstream.messages == []
    [env] = envelopes(spool)
    assert env["id"] == queue_id and env["held"]
    assert mailgate(["queue", "-c", str(gw.policy_path), "release", queue_id]) == 0
    assert wait_until(lambda: len(upstream.messages) == 1)


def test_held_mail_expires_with_a_log_line_and_no_dsn(
    make_gateway, upstream, policy, spool, caplog
):
    caplog.set_level(logging.INFO, logger="mailgate.queue")
    gw = make_gateway(**policy(quarantine={"lifetime": "1s"}), trusted_networks=["127.0.0.0/8"])
    queue_id = held_id(send(gw))

    def expired() -> list[str]:
        return [r.getMessage() for r in caplog.records if "quarantine expired" in r.getMessage()]

    assert wait_until(lambda: expired() != [])  # logged just after the entry is removed
    assert envelopes(spool) == []
    [line] = expired()
    assert queue_id in line and "no DSN" in line and "rules=test.hold" in line
    time.sleep(0.5)
    assert upstream.messages == []  # no DSN, even to a verified (trusted) sender


def test_inline_mode_makes_no_spool_until_something_is_held(make_gateway, upstream, policy, spool):
    gw = make_gateway(**policy("inline"))
    assert send(gw, MESSAGE)[0] == 250
    assert not spool.exists()
    held_id(send(gw))
    assert (spool / "queue").is_dir()


def test_a_dry_run_says_it_would_hold_and_keeps_nothing(tmp_path, policy, spool, capsys):
    path = tmp_path / "p.yaml"
    doc = {"hostname": "mailgate.test", "domains": ["example.com"], **policy("inline")}
    path.write_text(json.dumps(doc))
    eml = tmp_path / "m.eml"
    eml.write_bytes(MARKED)
    assert mailgate(["test", "-c", str(path), str(eml), "--to", "bob@example.com"]) == 0
    out = capsys.readouterr().out
    assert "would be held in quarantine (dry run)" in out and "test.hold" in out
    assert not spool.exists()
