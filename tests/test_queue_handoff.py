"""Queue mode's lockstep handoff over real SMTP: 5xx pass through per stage, 4xx/down/slow spool."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from mailgate.queue.handoff import RefusalCache
from mailgate.verdict import Reply
from tests.ops_support import wait_until
from tests.support import envelopes, transaction


@pytest.fixture
def queue_policy(queue_policy: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Lockstep handoff with a 2 s budget."""
    return functools.partial(queue_policy, handoff_timeout="2s")


# ------------------------------------------------------------------ upstream answers


def test_accepted_in_lockstep_is_upstream_and_never_spooled(
    make_gateway, upstream, queue_policy, spool
):
    gw = make_gateway(**queue_policy())
    replies = transaction(gw, ["bob@example.com"])
    assert [code for code, _ in replies] == [250, 250, 250]
    assert replies[-1][1] == b"2.0.0 Ok: queued as 1"  # the upstream's own reply
    assert len(upstream.messages) == 1  # already there when the client heard 250
    assert envelopes(spool) == [] and upstream.mail_commands == 1
    time.sleep(1.5)  # a scan later: nothing was left to deliver twice
    assert len(upstream.messages) == 1


def test_permanent_refusals_reach_the_client_at_their_stage(
    make_gateway, upstream, queue_policy, spool
):
    gw = make_gateway(**queue_policy())
    upstream.behaviour.mail_reply = "554 5.7.1 Sender refused"
    assert transaction(gw, ["bob@example.com"]) == [(554, b"5.7.1 Sender refused")]
    upstream.behaviour.mail_reply = None

    upstream.behaviour.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user"
    replies = transaction(gw, ["bob@example.com", "nobody@example.com"])
    assert replies[2] == (550, b"5.1.1 No such user")  # per recipient
    assert [code for code, _ in replies] == [250, 250, 550, 250]
    assert upstream.messages[-1].recipients == ["bob@example.com"]

    upstream.behaviour.data_reply = "554 5.6.0 Content refused"
    replies = transaction(gw, ["bob@example.com"])
    assert replies[-1] == (554, b"5.6.0 Content refused")
    upstream.behaviour.data_reply = None

    upstream.behaviour.data_command_reply = "554 5.5.1 No DATA for you"
    replies = transaction(gw, ["bob@example.com"])
    assert replies[-1] == (554, b"5.5.1 No DATA for you")
    upstream.behaviour.data_command_reply = None

    time.sleep(1.5)
    assert envelopes(spool) == []  # refused mail is never spooled, so it never bounces
    assert len(upstream.messages) == 1


@pytest.mark.parametrize(
    "fault",
    ["mail_4xx", "data_4xx", "data_command_4xx", "down", "slow", "drop_at_data"],
)
def test_what_the_upstream_cannot_take_now_is_spooled(
    make_gateway, upstream, queue_policy, spool, fault
):
    gw = make_gateway(**queue_policy(handoff_timeout="500ms"))
    b = upstream.behaviour
    if fault == "mail_4xx":
        b.mail_reply = "451 4.3.0 Try later"
    elif fault == "data_4xx":
        b.data_reply = "451 4.3.0 Try later"
    elif fault == "data_command_4xx":
        b.data_command_reply = "451 4.3.0 Not now"
    elif fault == "down":
        upstream.stop()
    elif fault == "slow":
        b.data_delay = 1.5
    else:
        b.drop_at_data = True
    started = time.monotonic()
    replies = transaction(gw, ["bob@example.com"])
    elapsed = time.monotonic() - started
    assert [code for code, _ in replies] == [250, 250, 250], replies
    assert re.fullmatch(rb"2\.0\.0 Ok: queued as [0-9A-F]+", replies[-1][1])
    if fault == "slow":
        assert elapsed < 1.4  # the budget, not the upstream, decided when the client heard 250
    [envelope] = envelopes(spool)
    assert envelope["recipients"] == ["bob@example.com"]
    # The upstream recovers: the queue delivers the spooled copy.
    if fault == "down":
        upstream.start()
    b.mail_reply = b.data_reply = b.data_command_reply = None
    b.data_delay, b.drop_at_data = 0.0, False
    assert wait_until(lambda: envelopes(spool) == [])
    # A slow upstream may still take the copy it was given: a duplicate, never a loss.
    expected = (1, 2) if fault in ("slow", "drop_at_data") else (1,)
    assert wait_until(lambda: len(upstream.messages) in expected)


def test_a_recipient_deferred_by_the_upstream_is_spooled_the_rest_delivered_now(
    make_gateway, upstream, queue_policy, spool
):
    upstream.behaviour.rcpt_replies["later@example.com"] = "452 4.2.2 Mailbox full"
    gw = make_gateway(**queue_policy(retry_min="1h"))
    replies = transaction(gw, ["bob@example.com", "later@example.com"])
    assert [code for code, _ in replies] == [250, 250, 250, 250]
    assert re.fullmatch(rb"2\.0\.0 Ok: delivered, the rest queued as [0-9A-F]+", replies[-1][1])
    assert upstream.messages[0].recipients == ["bob@example.com"]
    [envelope] = envelopes(spool)
    assert envelope["recipients"] == ["later@example.com"]


# ------------------------------------------------------------------ refusals remembered


def test_a_refused_recipient_is_refused_during_an_outage(
    make_gateway, upstream, queue_policy, spool
):
    upstream.behaviour.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user"
    # No pooled connection outlives the stop below: the upstream is really gone.
    up = {"url": upstream.url, "pool_size": 0}
    gw = make_gateway(**queue_policy(retry_min="1h"), upstream=up)
    assert transaction(gw, ["nobody@example.com"])[1] == (550, b"5.1.1 No such user")
    upstream.stop()
    replies = transaction(gw, ["nobody@example.com", "bob@example.com", "new@example.com"])
    assert replies[1] == (550, b"5.1.1 No such user")  # remembered, not spooled
    assert [code for code, _ in replies[2:]] == [250, 250, 250]
    [envelope] = envelopes(spool)
    # A recipient never seen before is spooled: the upstream decides when it is back.
    assert envelope["recipients"] == ["bob@example.com", "new@example.com"]


def test_refusal_cache_expires_and_is_cleared_by_an_accept():
    cache = RefusalCache(ttl=0.2)
    refusal = Reply(550, "5.1.1 No such user")
    cache.remember("Nobody@Example.com", refusal)
    assert cache.get("nobody@example.com") == refusal
    cache.forget("NOBODY@example.com")
    assert cache.get("nobody@example.com") is None
    cache.remember("nobody@example.com", refusal)
    time.sleep(0.3)
    assert cache.get("nobody@example.com") is None
    off = RefusalCache(ttl=0)
    off.remember("nobody@example.com", refusal)
    assert off.get("nobody@example.com") is None
    small = RefusalCache(ttl=60, size=2)
    for name in ("a", "b", "c"):
        small.remember(f"{name}@example.com", refusal)
    assert small.get("a@example.com") is None and small.get("c@example.com") == refusal


# ------------------------------------------------------------------ DSNs: no backscatter


def test_no_dsn_to_an_unverified_sender(make_gateway, upstream, queue_policy, spool, caplog):
    caplog.set_level("WARNING", logger="mailgate.queue")
    upstream.stop()  # spooled: the refusal comes later, from the queue
    upstream.behaviour.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user"
    gw = make_gateway(**queue_policy())
    assert [c for c, _ in transaction(gw, ["nobody@example.com"])] == [250, 250, 250]
    upstream.start()
    assert wait_until(lambda: envelopes(spool) == [])
    time.sleep(0.5)
    assert upstream.messages == []  # no DSN to a sender that may be forged
    assert any("dsn suppressed" in r.getMessage() for r in caplog.records)


def test_dsn_of_an_unverified_sender_goes_to_the_fallback(
    make_gateway, upstream, queue_policy, spool
):
    upstream.stop()
    upstream.behaviour.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user"
    gw = make_gateway(**queue_policy(dsn_fallback="postmaster@example.com"))
    transaction(gw, ["nobody@example.com"])
    upstream.start()
    assert wait_until(lambda: len(upstream.messages) == 1)
    [dsn] = upstream.messages
    assert (dsn.sender, dsn.recipients) == ("<>", ["postmaster@example.com"])
    assert b"Final-Recipient: rfc822; nobody@example.com" in dsn.data


def test_handoff_timeout_zero_spools_first(make_gateway, upstream, queue_policy, spool):
    upstream.behaviour.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user"
    gw = make_gateway(**queue_policy(handoff_timeout=0))
    replies = transaction(gw, ["nobody@example.com"])
    assert [code for code, _ in replies] == [250, 250, 250]  # the old spool-first path
    assert re.fullmatch(rb"2\.0\.0 Ok: queued as [0-9A-F]+", replies[-1][1])
