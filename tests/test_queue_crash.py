"""kill -9 of a gateway subprocess in the middle of a lockstep handoff loses nothing.

(kill -9 during delivery from the queue is ``tests/test_queue.py``'s crash test.)
"""

from __future__ import annotations

import smtplib
import threading
from pathlib import Path

from tests.ops_support import GatewayProcess, wait_until
from tests.support import MESSAGE, message_ids, queue_policy_file, queued_ids


def test_kill_9_during_handoff_loses_nothing(upstream, tmp_path: Path):
    spool = tmp_path / "spool"
    upstream.behaviour.data_delay = 0.4  # each handoff waits here: the kill lands inside one
    policy = queue_policy_file(tmp_path / "queue.yaml", upstream, handoff_timeout="5s")
    log = tmp_path / "gateway.log"
    gw = GatewayProcess(policy, log)
    accepted: list[str] = []
    cut = False
    try:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as client:
            client.ehlo("client.example.net")
            for i in range(8):
                mid = f"<handoff{i}@example.net>"
                body = MESSAGE.replace(b"<1@example.net>", mid.encode())
                if i == 5:  # the sixth message: kill while the upstream holds its DATA
                    threading.Timer(0.2, gw.kill).start()
                try:
                    client.sendmail("alice@example.net", ["bob@example.com"], body)
                except (smtplib.SMTPException, OSError):
                    cut = True
                    break
                accepted.append(mid)
                # Lockstep: the 250 came from the upstream, so the message is there now.
                assert mid in message_ids(upstream)
    finally:
        gw.stop()
    assert cut and len(accepted) == 5
    assert queued_ids(spool) == []  # nothing was spooled: every 250 was the upstream's
    upstream.behaviour.data_delay = 0.0
    gw = GatewayProcess(policy, log)
    try:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as client:
            client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
        assert wait_until(lambda: "<1@example.net>" in message_ids(upstream))
        assert set(accepted) <= set(message_ids(upstream))
        assert queued_ids(spool) == []
    finally:
        gw.stop()


def test_kill_9_with_spooled_handoffs_loses_nothing(upstream, tmp_path: Path):
    """The upstream defers every handoff (451 at DATA): all mail is spooled; kill; restart."""
    spool = tmp_path / "spool"
    upstream.behaviour.data_reply = "451 4.3.0 Try later"
    policy = queue_policy_file(tmp_path / "queue.yaml", upstream, scan_interval="1s")
    log = tmp_path / "gateway.log"
    gw = GatewayProcess(policy, log)
    accepted: list[str] = []
    try:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as client:
            client.ehlo("client.example.net")
            for i in range(10):
                mid = f"<spooled{i}@example.net>"
                body = MESSAGE.replace(b"<1@example.net>", mid.encode())
                client.sendmail("alice@example.net", ["bob@example.com"], body)
                accepted.append(mid)
        gw.kill()
    finally:
        gw.stop()
    assert len(queued_ids(spool)) == 10 and upstream.messages == []
    upstream.behaviour.data_reply = None
    gw = GatewayProcess(policy, log)
    try:
        assert wait_until(lambda: set(accepted) <= set(message_ids(upstream)), timeout=60)
        assert wait_until(lambda: queued_ids(spool) == [])
    finally:
        gw.stop()
