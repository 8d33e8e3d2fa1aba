"""Lockstep handoff for ``routes`` over real SMTP: each transaction locks onto one route.

Two recording upstreams: ``upstream`` (the default route) and ``second`` (a
``routes`` entry). A recipient of another route than the transaction's gets
``452 4.5.3`` (RFC 5321 §4.5.3.1.10) and goes in a later transaction.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.ops_support import wait_until
from tests.support import MESSAGE, envelopes, transaction

OTHER_ROUTE = (452, b"4.5.3 Too many recipients for this transaction")


@pytest.fixture
def make_gateway(make_gateway: Callable[..., Any]) -> Callable[..., Any]:
    """Gateways that take mail for the routed domain too (no relaying)."""
    return functools.partial(make_gateway, domains=["example.com", "partner.org"])


@pytest.fixture
def queue_policy(queue_policy: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Lockstep handoff with a 2 s budget."""
    return functools.partial(queue_policy, handoff_timeout="2s")


def codes(replies: list[tuple[int, bytes]]) -> list[int]:
    return [code for code, _ in replies]


# ------------------------------------------------------------------ permanent refusals


def test_a_routed_domain_refusal_reaches_the_client_at_rcpt_and_never_bounces(
    make_gateway, upstream, second, queue_policy, spool
):
    second.behaviour.rcpt_replies["nobody@partner.org"] = "550 5.1.1 No such user"
    # A trusted client's sender would get a DSN if the refusal came from the queue later.
    gw = make_gateway(
        **queue_policy(), routes={"partner.org": second.url}, trusted_networks=["127.0.0.0/8"]
    )
    replies = transaction(gw, ["nobody@partner.org", "carol@partner.org"])
    assert replies[1] == (550, b"5.1.1 No such user")  # the route's server's own reply
    assert codes(replies) == [250, 550, 250, 250]
    assert replies[-1][1] == b"2.0.0 Ok: queued as 1"  # second's reply: handed over in lockstep
    assert [m.recipients for m in second.messages] == [["carol@partner.org"]]
    assert envelopes(spool) == []
    time.sleep(1.5)  # a scan later: nothing to deliver, no DSN to alice@example.net
    assert upstream.messages == [] and upstream.mail_commands == 0
    assert len(second.messages) == 1


def test_a_routed_server_refusing_mail_refuses_the_rcpt(
    make_gateway, upstream, second, queue_policy, spool
):
    second.behaviour.mail_reply = "554 5.7.1 Sender refused"
    gw = make_gateway(**queue_policy(), routes={"partner.org": second.url})
    # MAIL goes to the route's server when the first RCPT names the route.
    replies = transaction(gw, ["carol@partner.org", "dave@partner.org"])
    assert replies == [(250, b"2.1.0 Ok")] + [(554, b"5.7.1 Sender refused")] * 2
    assert second.mail_commands == 1 and envelopes(spool) == []
    second.behaviour.mail_reply = None
    # A refused MAIL is not a refused recipient: the next transaction asks again.
    assert codes(transaction(gw, ["carol@partner.org"])) == [250, 250, 250]
    assert [m.recipients for m in second.messages] == [["carol@partner.org"]]


def test_a_star_route_refusal_reaches_the_client_at_rcpt(
    make_gateway, upstream, second, queue_policy, spool
):
    second.behaviour.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user"
    gw = make_gateway(**queue_policy(), routes={"*": second.url}, trusted_networks=["127.0.0.0/8"])
    replies = transaction(gw, ["bob@example.com", "nobody@example.com", "x@other.org"])
    assert replies[2] == (550, b"5.1.1 No such user")
    assert codes(replies) == [250, 250, 550, 250, 250]
    assert second.messages[0].recipients == ["bob@example.com", "x@other.org"]
    assert envelopes(spool) == []
    second.behaviour.data_reply = "554 5.6.0 Content refused"
    assert transaction(gw, ["bob@example.com"])[-1] == (554, b"5.6.0 Content refused")
    time.sleep(1.5)
    assert envelopes(spool) == [] and len(second.messages) == 1  # no DSN either
    assert upstream.mail_commands == 0


# ------------------------------------------------------------------ two routes


def test_a_recipient_of_another_route_gets_452_and_goes_in_a_later_transaction(
    make_gateway, upstream, second, queue_policy, spool
):
    # limits.errors 2: three 452s would close the connection if they counted as errors.
    gw = make_gateway(**queue_policy(), routes={"partner.org": second.url}, limits={"errors": 2})
    later = ["c1@partner.org", "c2@partner.org", "c3@partner.org"]
    replies = transaction(gw, ["bob@example.com", *later, "dave@example.com"])
    assert replies[2:5] == [OTHER_ROUTE] * 3
    assert codes(replies) == [250, 250, 452, 452, 452, 250, 250]
    assert [m.recipients for m in upstream.messages] == [["bob@example.com", "dave@example.com"]]
    assert second.mail_commands == 0 and envelopes(spool) == []
    # What a client does with those 452s (RFC 5321 §4.5.3.1.10): another transaction.
    assert codes(transaction(gw, later)) == [250, 250, 250, 250, 250]
    assert [m.recipients for m in second.messages] == [later]
    assert envelopes(spool) == []


def test_smtplib_sendmail_delivers_the_rest_after_a_452(
    make_gateway, upstream, second, queue_policy, spool
):
    gw = make_gateway(**queue_policy(), routes={"partner.org": second.url})
    with gw.client() as client:
        refused = client.sendmail(
            "alice@example.net", ["bob@example.com", "c@partner.org"], MESSAGE
        )
        assert refused == {"c@partner.org": OTHER_ROUTE}
        assert client.sendmail("alice@example.net", list(refused), MESSAGE) == {}
    assert [m.recipients for m in upstream.messages] == [["bob@example.com"]]
    assert [m.recipients for m in second.messages] == [["c@partner.org"]]


def test_the_route_follows_the_first_accepted_recipient(
    make_gateway, upstream, second, queue_policy, spool
):
    upstream.behaviour.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user"
    gw = make_gateway(**queue_policy(), routes={"partner.org": second.url})
    replies = transaction(gw, ["nobody@example.com", "carol@partner.org", "bob@example.com"])
    # Nothing was accepted for the default route yet: the transaction moves to partner.org.
    assert replies[1:4] == [(550, b"5.1.1 No such user"), (250, b"2.1.5 Recipient ok"), OTHER_ROUTE]
    assert [m.recipients for m in second.messages] == [["carol@partner.org"]]
    assert upstream.messages == [] and upstream.rsets >= 1  # the first route was RSET


# ------------------------------------------------------------------ what the route cannot take now


def test_a_down_route_spools_every_routes_recipients(
    make_gateway, upstream, second, queue_policy, spool
):
    second.stop()
    gw = make_gateway(**queue_policy(), routes={"partner.org": second.url})
    replies = transaction(gw, ["carol@partner.org", "bob@example.com"])
    assert codes(replies) == [250, 250, 250, 250]
    assert re.fullmatch(rb"2\.0\.0 Ok: queued as [0-9A-F]+", replies[-1][1])
    # The queue may deliver bob at once (his route is up): read the spool no sooner.
    second.start()
    assert wait_until(lambda: envelopes(spool) == [])
    assert [m.recipients for m in second.messages] == [["carol@partner.org"]]
    assert [m.recipients for m in upstream.messages] == [["bob@example.com"]]
    assert upstream.mail_commands == 1  # the queue's delivery only: no lockstep MAIL


def test_a_route_answering_4xx_after_data_is_spooled(
    make_gateway, upstream, second, queue_policy, spool
):
    second.behaviour.data_reply = "451 4.3.0 Try later"
    gw = make_gateway(**queue_policy(), routes={"partner.org": second.url})
    replies = transaction(gw, ["carol@partner.org"])
    assert codes(replies) == [250, 250, 250]
    assert re.fullmatch(rb"2\.0\.0 Ok: queued as [0-9A-F]+", replies[-1][1])
    [envelope] = envelopes(spool)
    assert envelope["recipients"] == ["carol@partner.org"]
    second.behaviour.data_reply = None
    assert wait_until(lambda: envelopes(spool) == [])
    assert [m.recipients for m in second.messages] == [["carol@partner.org"]]


def test_a_routed_refusal_is_remembered_during_the_routes_outage(
    make_gateway, upstream, second, queue_policy, spool
):
    second.behaviour.rcpt_replies["nobody@partner.org"] = "550 5.1.1 No such user"
    route = {"url": second.url, "pool_size": 0}  # no pooled connection outlives the stop
    gw = make_gateway(**queue_policy(retry_min="1h"), routes={"partner.org": route})
    assert transaction(gw, ["nobody@partner.org"])[1] == (550, b"5.1.1 No such user")
    second.stop()
    replies = transaction(gw, ["nobody@partner.org", "carol@partner.org"])
    assert replies[1] == (550, b"5.1.1 No such user")  # remembered, not spooled
    assert codes(replies) == [250, 550, 250, 250]
    [envelope] = envelopes(spool)
    assert envelope["recipients"] == ["carol@partner.org"]
