"""Queue mode over real SMTP: spool before 250, routes, retries, DSNs, restart, CLI, crash."""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import smtplib
import time
from pathlib import Path
from typing import Any

import pytest

from mailgate.cli import main as mailgate
from mailgate.queue import route_key
from mailgate.queue.delivery import backoff
from tests.ops_support import REPO, GatewayProcess, wait_until
from tests.support import (
    MESSAGE,
    message_ids,
    queue_policy_file,
    queued_ids,
)
from tests.upstreams import XclientUpstream


def test_250_means_spooled_and_delivery_follows(make_gateway, upstream, spool, queue_policy):
    upstream.stop()
    gw = make_gateway(**queue_policy())
    with gw.client() as client:
        client.mail("alice@example.net", ["BODY=8BITMIME"])
        client.rcpt("bob@example.com")
        code, text = client.data(MESSAGE)
    assert code == 250
    queue_id = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-F]+)", text).group(1).decode()
    # Both files are on disk (fsynced before the reply) while the upstream is down.
    envelope = json.loads((spool / "queue" / f"{queue_id}.env").read_text())
    assert envelope["sender"] == "alice@example.net"
    assert envelope["recipients"] == ["bob@example.com"]
    assert envelope["options"] == ["BODY=8BITMIME"]
    stored = (spool / "queue" / f"{queue_id}.msg").read_bytes()
    assert stored.startswith(b"Received: from client.example.net ([127.0.0.1])")
    assert stored.endswith(MESSAGE)
    upstream.start()
    assert wait_until(lambda: len(upstream.messages) == 1)
    [msg] = upstream.messages
    assert (msg.sender, msg.recipients, msg.data) == (
        "alice@example.net",
        ["bob@example.com"],
        stored,
    )
    assert wait_until(lambda: queued_ids(spool) == [])


def test_routes_make_one_transaction_per_route(make_gateway, upstream, second, queue_policy, spool):
    routes = {"example.com": upstream.url, "*": second.url}
    # Spool first (no lockstep, which would take one route per transaction): the queue
    # groups the spooled recipients by route.
    policy = queue_policy(handoff_timeout=0)
    gw = make_gateway(**policy, routes=routes, trusted_networks=["127.0.0.0/8"])
    rcpts = ["a@example.com", "b@EXAMPLE.com", "c@other.org", "d@example.com"]
    with gw.client() as client:
        client.sendmail("alice@example.net", rcpts, MESSAGE)
    assert wait_until(lambda: len(upstream.messages) == 1 and len(second.messages) == 1)
    assert upstream.messages[0].recipients == ["a@example.com", "b@EXAMPLE.com", "d@example.com"]
    assert second.messages[0].recipients == ["c@other.org"]
    assert upstream.mail_commands == 1 and second.mail_commands == 1


def test_backoff_doubles_from_retry_min_up_to_retry_max():
    assert [backoff(n, 300, 3600) for n in range(1, 7)] == [300, 600, 1200, 2400, 3600, 3600]


def test_backoff_after_very_many_attempts_stays_at_retry_max():
    # retry_max 60s over the default 5-day lifetime is ~7200 attempts; 2 ** 1024 used to
    # overflow a float, so the attempt was never recorded and delivered recipients got it again.
    assert backoff(1025, 1.0, 60.0) == 60.0
    assert backoff(10_000, 300.0, 3600.0) == 3600.0


def test_route_lookup_order():
    routes = {"example.com": 1, ".example.org": 2, "*": 3}
    assert route_key(routes, "a@example.com") == "example.com"
    assert route_key(routes, "a@mail.example.com") == "*"  # a domain key is that domain only
    assert route_key(routes, "a@x.y.example.org") == ".example.org"
    assert route_key(routes, "a@example.org") == "*"
    assert route_key({}, "a@example.com") == ""  # no routes: the upstream


def test_connections_to_a_route_are_reused(make_gateway, upstream, queue_policy, spool):
    gw = make_gateway(**queue_policy(concurrency=1))
    with gw.client() as client:
        for i in range(5):
            client.sendmail("alice@example.net", [f"u{i}@example.com"], MESSAGE)
    assert wait_until(lambda: len(upstream.messages) == 5)
    assert upstream.connections == 1


def _dsn_parts(data: bytes) -> tuple[Any, str, str]:
    """The DSN's message object, its delivery-status text and its returned headers."""
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    text, status, headers = msg.get_payload()
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    status_text = "".join(str(block) for block in status.get_payload())
    return msg, status_text, headers.get_payload()


def test_refused_recipient_bounces_with_a_dsn(make_gateway, upstream, queue_policy, spool):
    # Spool first (no lockstep), and a trusted client, whose senders may get DSNs.
    upstream.behaviour.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user"
    gw = make_gateway(**queue_policy(handoff_timeout=0), trusted_networks=["127.0.0.0/8"])
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com", "nobody@example.com"], MESSAGE)
    assert wait_until(lambda: len(upstream.messages) == 2)
    delivered, dsn = upstream.messages
    assert delivered.recipients == ["bob@example.com"]
    assert (dsn.sender, dsn.recipients) == ("<>", ["alice@example.net"])  # the null sender
    msg, status, headers = _dsn_parts(dsn.data)
    assert msg["To"] == "<alice@example.net>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert "Reporting-MTA: dns; mailgate.test" in status
    assert "Final-Recipient: rfc822; nobody@example.com" in status
    assert "Action: failed" in status and "Status: 5.1.1" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1 No such user" in status
    assert "Message-ID: <1@example.net>" in headers
    assert b"Hello Bob" not in dsn.data  # headers only, never the body
    assert wait_until(lambda: queued_ids(spool) == [])


def test_null_sender_never_gets_a_dsn(make_gateway, upstream, queue_policy, spool):
    upstream.behaviour.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user"
    gw = make_gateway(**queue_policy(handoff_timeout=0), trusted_networks=["127.0.0.0/8"])
    with gw.client() as client:
        client.sendmail("", ["nobody@example.com"], MESSAGE)
    assert wait_until(lambda: queued_ids(spool) == [])
    time.sleep(0.5)  # a DSN, if one were wrongly made, would be queued by now
    assert upstream.messages == [] and queued_ids(spool) == []


def test_temporary_failures_are_retried_with_backoff(make_gateway, upstream, queue_policy, spool):
    upstream.behaviour.mail_reply = "451 4.3.0 Try later"
    gw = make_gateway(**queue_policy(retry_min="1s", retry_max="1h"))
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    [queue_id] = queued_ids(spool)
    env_file = spool / "queue" / f"{queue_id}.env"

    def attempts() -> int:
        # The envelope is rewritten after each attempt's reply: poll it, not the upstream.
        try:
            return int(json.loads(env_file.read_text())["attempts"])
        except (FileNotFoundError, json.JSONDecodeError):
            return 0

    assert wait_until(lambda: attempts() >= 2)
    envelope = json.loads(env_file.read_text())
    assert envelope["attempts"] >= 2
    assert envelope["last_error"] == "451 4.3.0 Try later"
    assert envelope["next_attempt"] - time.time() <= backoff(envelope["attempts"], 1, 3600)
    upstream.behaviour.mail_reply = None
    assert wait_until(lambda: len(upstream.messages) == 1, timeout=60)
    assert wait_until(lambda: queued_ids(spool) == [])


def test_expiry_sends_a_dsn_and_drops_the_message(
    make_gateway, upstream, second, queue_policy, spool
):
    upstream.behaviour.mail_reply = "451 4.3.0 Try later"
    gw = make_gateway(
        **queue_policy(lifetime="2s"),
        routes={"example.com": upstream.url, "*": second.url},
        trusted_networks=["127.0.0.0/8"],  # a trusted client's sender may get a DSN
    )
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert wait_until(lambda: len(second.messages) == 1, timeout=60)
    [dsn] = second.messages
    assert dsn.recipients == ["alice@example.net"]
    _, status, _ = _dsn_parts(dsn.data)
    assert "Final-Recipient: rfc822; bob@example.com" in status
    assert "Status: 4.4.7" in status
    assert "Diagnostic-Code: smtp; 451 4.3.0 Try later" in status
    assert b"delivery time expired" in dsn.data
    assert wait_until(lambda: queued_ids(spool) == [])
    assert upstream.messages == []


def test_restart_resumes_the_spool(make_gateway, upstream, queue_policy, spool):
    upstream.stop()
    gw = make_gateway(**queue_policy())
    with gw.client() as client:
        for i in range(3):
            client.sendmail("alice@example.net", [f"u{i}@example.com"], MESSAGE)
    gw.stop()
    assert len(queued_ids(spool)) == 3
    upstream.start()
    make_gateway(**queue_policy())
    assert wait_until(lambda: len(upstream.messages) == 3)
    assert sorted(m.recipients[0] for m in upstream.messages) == [
        f"u{i}@example.com" for i in range(3)
    ]
    assert wait_until(lambda: queued_ids(spool) == [])


def test_queue_list_delete_and_flush(make_gateway, upstream, queue_policy, spool, capsys):
    upstream.stop()
    gw = make_gateway(**queue_policy(retry_min="1h"))
    with gw.client() as client:
        client.sendmail("alice@example.net", ["keep@example.com"], MESSAGE)
        client.sendmail("alice@example.net", ["drop@example.com"], MESSAGE)
    assert wait_until(lambda: len(queued_ids(spool)) == 2)
    keep, drop = queued_ids(spool)
    config = str(gw.policy_path)
    assert wait_until(lambda: json.loads((spool / "queue" / f"{drop}.env").read_text())["attempts"])
    capsys.readouterr()
    assert mailgate(["queue", "-c", config, "list"]) == 0
    listing = capsys.readouterr().out
    assert f"{keep} " in listing and "<keep@example.com>" in listing
    assert "<drop@example.com>" in listing and "last error: 451 4.4.1" in listing
    assert "-- 2 message(s)" in listing
    assert mailgate(["queue", "-c", config, "delete", drop]) == 0
    assert mailgate(["queue", "-c", config, "delete", drop]) == 1
    assert mailgate(["queue", "-c", config, "delete", "../../etc/passwd"]) == 1
    assert queued_ids(spool) == [keep]
    # The retry is an hour away; flush makes the running gateway try now.
    upstream.start()
    assert mailgate(["queue", "-c", config, "flush"]) == 0
    assert wait_until(lambda: len(upstream.messages) == 1)
    assert upstream.messages[0].recipients == ["keep@example.com"]
    assert wait_until(lambda: queued_ids(spool) == [])


def test_the_original_client_is_announced_at_delivery(
    make_gateway, loop_thread, queue_policy, spool
):
    up = XclientUpstream(loop_thread)
    try:
        gw = make_gateway(**queue_policy(), upstream={"url": up.url, "client_identity": "xclient"})
        with gw.client(helo="orig.example.net") as client:
            client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
        assert wait_until(lambda: len(up.messages) == 1)
        assert up.seen[0]["xclient"]["HELO"] == "orig.example.net"
        assert up.seen[0]["xclient"]["ADDR"] == "127.0.0.1"
    finally:
        up.close()


def test_spool_write_failure_gives_4xx(make_gateway, upstream, queue_policy, spool):
    gw = make_gateway(**queue_policy(handoff_timeout=0))
    # Tests run as root, which ignores modes: put a file where the queue folder was.
    os.rename(spool / "queue", spool / "queue.away")
    (spool / "queue").write_text("not a folder")
    try:
        with gw.client() as client:
            client.mail("alice@example.net")
            client.rcpt("bob@example.com")
            code, text = client.data(MESSAGE)
        assert (code, text[:5]) == (451, b"4.3.0")
    finally:
        (spool / "queue").unlink()
        os.rename(spool / "queue.away", spool / "queue")
    assert upstream.messages == []


def test_a_failed_store_leaves_no_envelope_behind(tmp_path, monkeypatch):
    """Unit test: the folder fsync fails after the envelope's rename (the commit point)."""
    from mailgate.queue import spool as spool_module

    store = spool_module.Spool(str(tmp_path / "spool"))
    store.prepare()

    def failing_fsync(path: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_module, "_fsync_dir", failing_fsync)
    entry = spool_module.Entry(id=spool_module.new_id(), sender="a@example.net", recipients=["b@x"])
    with pytest.raises(OSError):
        store.store(entry, MESSAGE)
    # The client heard 4xx: an envelope left here would be listed and retried forever,
    # its .msg gone.
    assert store.ids() == []
    assert os.listdir(store.queue_dir) == []


def test_a_stray_file_in_the_queue_folder_does_not_stop_the_start(tmp_path):
    """Unit test: ``prepare`` used to raise ValueError (not a queue id) for ``notes.msg``."""
    from mailgate.queue.spool import Spool

    store = Spool(str(tmp_path / "spool"))
    store.prepare()
    stray = Path(store.queue_dir) / "notes.msg"
    stray.write_text("an operator's file")
    store.prepare()
    assert stray.exists()  # not ours: left alone
    assert store.ids() == []


# ------------------------------------------------------------- kill -9 with mail in the queue


def test_kill_9_loses_nothing_accepted(upstream, tmp_path, spool):
    """Accept mail while delivering, kill -9, restart: every accepted message arrives.

    Prints the measured duplicates and losses (run with ``-s`` to see them).
    """
    total, kill_after = 80, 40
    upstream.behaviour.data_delay = 0.02  # deliveries are in flight when the kill lands
    # Spool first, so that deliveries from the queue are in flight at the kill.
    policy = queue_policy_file(
        tmp_path / "queue.yaml", upstream, scan_interval="1s", handoff_timeout=0
    )
    log = tmp_path / "gateway.log"
    gw = GatewayProcess(policy, log)
    accepted: list[str] = []
    try:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as client:
            client.ehlo("client.example.net")
            for i in range(total):
                body = MESSAGE.replace(b"<1@example.net>", f"<crash{i}@example.net>".encode())
                try:
                    client.sendmail("alice@example.net", ["bob@example.com"], body)
                except (smtplib.SMTPException, OSError):
                    break
                accepted.append(f"<crash{i}@example.net>")
                if len(accepted) == kill_after:
                    gw.kill()
    finally:
        gw.stop()
    in_spool = len(queued_ids(spool))
    delivered_before = len(upstream.messages)
    gw = GatewayProcess(policy, log)
    try:
        assert wait_until(lambda: set(accepted) <= set(message_ids(upstream)), timeout=90), gw.log
        assert wait_until(lambda: queued_ids(spool) == [], timeout=30)
    finally:
        gw.stop()
    delivered = message_ids(upstream)
    lost = set(accepted) - set(delivered)
    duplicates = len(delivered) - len(set(delivered))
    print(
        f"\ncrash test: accepted={len(accepted)} delivered_before_kill={delivered_before} "
        f"left_in_spool={in_spool} delivered_total={len(delivered)} unique={len(set(delivered))} "
        f"duplicates={duplicates} lost={len(lost)} unacknowledged_but_delivered="
        f"{len(set(delivered) - set(accepted))}"
    )
    assert len(accepted) == kill_after  # the kill really cut the client off
    assert in_spool > 0  # and the gateway held accepted, undelivered mail when it died
    assert lost == set()


@pytest.mark.parametrize("name", ["queue.yaml", "behind-haproxy.yaml"])
def test_example_policies_are_valid(name, capsys):
    assert mailgate(["check", "-c", str(REPO / "policies" / "examples" / name)]) == 0


def test_routes_need_queue_mode(tmp_path, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text("routes:\n  example.com: smtp://127.0.0.1:25\n")
    assert mailgate(["check", "-c", str(policy)]) == 2
    assert "routes need delivery: queue" in capsys.readouterr().err
