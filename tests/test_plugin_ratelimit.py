"""ratelimit over real SMTP: selectors, counting, actions, exemptions, monitor, shared Redis."""

from __future__ import annotations

import ipaddress
import smtplib
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from mailgate.context import Envelope, Session
from mailgate.plugins.ratelimit import RateLimitConfig, _CompiledRule
from mailgate.yamlsource import SourceError
from tests.redis_support import RedisServer
from tests.support import MESSAGE


def limit(*rules: dict, **extra: object) -> dict:
    return {"ratelimit": {"rules": list(rules), **extra}}


def send(gw, sender="alice@example.net", rcpts=("bob@example.com",)) -> tuple[int, bytes]:
    """One message on a new connection; the first refusal's (code, text), or (250, b'')."""
    with gw.client() as client:
        code, text = client.mail(sender)
        if code != 250:
            return code, text
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            if code != 250:
                return code, text
        code, text = client.data(MESSAGE)
        return (250, b"") if code == 250 else (code, text)


def test_messages_per_client_ip_tempfail_at_mail_and_name_the_rule(
    make_gateway, upstream, decisions
):
    gw = make_gateway(plugins=limit({"key": "client_ip", "rate": "3/1h"}))
    assert [send(gw)[0] for _ in range(3)] == [250, 250, 250]
    assert send(gw) == (450, b"4.7.1 Rate limit exceeded, try again later")
    assert len(upstream.messages) == 3
    assert upstream.mail_commands == 3  # the refused MAIL never went upstream
    last = decisions()[-1]
    assert "verdicts=ratelimit.client_ip:tempfail" in last
    assert "outcome=tempfailed stage=mail" in last


def test_reject_action_and_burst(make_gateway):
    gw = make_gateway(
        plugins=limit({"key": "sender", "rate": "100/1d", "burst": 2, "action": "reject"})
    )
    assert [send(gw)[0] for _ in range(2)] == [250, 250]
    assert send(gw) == (550, b"5.7.1 Rate limit exceeded")
    # Another sender has its own bucket; the sender is compared lower-cased.
    assert send(gw, sender="carol@example.net")[0] == 250
    assert send(gw, sender="ALICE@example.net")[0] == 550


def test_connections_are_refused_before_the_banner(make_gateway, decisions):
    gw = make_gateway(plugins=limit({"key": "client_ip", "rate": "2/1h", "count": "connections"}))
    for _ in range(2):
        with gw.client() as client:
            assert client.noop()[0] == 250
    with pytest.raises(smtplib.SMTPConnectError) as err:
        gw.client()
    assert err.value.smtp_code == 421
    assert err.value.smtp_error == b"4.7.1 Rate limit exceeded, try again later"
    assert any("ratelimit.client_ip:tempfail" in line for line in decisions())


def test_recipients_per_sender_are_counted_at_rcpt(make_gateway, upstream):
    gw = make_gateway(plugins=limit({"key": "sender", "rate": "3/1h", "count": "recipients"}))
    with gw.client() as client:
        client.mail("alice@example.net")
        codes = [client.rcpt(f"u{i}@example.com")[0] for i in range(4)]
        assert codes == [250, 250, 250, 450]
        assert client.data(MESSAGE)[0] == 250
    assert upstream.messages[0].recipients == ["u0@example.com", "u1@example.com", "u2@example.com"]


def test_combined_key_counts_each_pair_apart(make_gateway):
    gw = make_gateway(
        domains=["example.com", "example.org"],
        plugins=limit({"key": ["sender_domain", "recipient_domain"], "rate": "1/1h"}),
    )
    assert send(gw, rcpts=["a@example.com"])[0] == 250
    assert send(gw, rcpts=["b@example.org"])[0] == 250
    assert send(gw, rcpts=["c@example.com"])[0] == 450
    assert send(gw, sender="x@other.example", rcpts=["c@example.com"])[0] == 250


def test_counting_at_data_refuses_with_451(make_gateway, upstream):
    gw = make_gateway(
        plugins=limit({"key": "client_ip", "rate": "3/1h", "count": "recipients", "stage": "data"})
    )
    assert send(gw, rcpts=["a@example.com", "b@example.com"])[0] == 250
    # Two more recipients would make four: refused at end of DATA.
    assert send(gw, rcpts=["c@example.com", "d@example.com"]) == (
        451,
        b"4.7.1 Rate limit exceeded, try again later",
    )
    assert send(gw, rcpts=["e@example.com"])[0] == 250
    assert len(upstream.messages) == 2


def test_trusted_networks_exempt_networks_and_allow_lists(make_gateway):
    rule = {"key": "client_ip", "rate": "1/1h"}
    trusted = make_gateway(trusted_networks=["127.0.0.0/8"], plugins=limit(rule))
    assert [send(trusted)[0] for _ in range(3)] == [250, 250, 250]
    counted = make_gateway(
        trusted_networks=["127.0.0.0/8"], plugins=limit(rule, exempt_trusted=False)
    )
    assert [send(counted)[0] for _ in range(2)] == [250, 450]
    exempt = make_gateway(plugins=limit(rule, exempt_networks=["127.0.0.1/32"]))
    assert [send(exempt)[0] for _ in range(2)] == [250, 250]
    allowed = make_gateway(
        plugins=limit({"key": "recipient", "rate": "1/1h", "allow": ["postmaster@example.com"]})
    )
    assert [send(allowed, rcpts=["postmaster@example.com"])[0] for _ in range(2)] == [250, 250]
    assert [send(allowed, rcpts=["bob@example.com"])[0] for _ in range(2)] == [250, 450]


def test_a_rule_in_monitor_mode_never_hides_an_enforced_rule(make_gateway, decisions):
    gw = make_gateway(
        plugins=limit(
            {"key": "client_ip", "rate": "1/1h", "name": "trial"},
            {"key": "client_ip", "rate": "2/1h", "name": "real"},
            rule_modes={"ratelimit.trial": "monitor"},
        )
    )
    assert send(gw)[0] == 250
    assert send(gw)[0] == 250  # trial is over its limit, but only logs it
    assert "verdicts=ratelimit.trial:tempfail(monitor)" in decisions()[-1]
    # real still counted the second message, so the third is refused by it.
    assert send(gw)[0] == 450
    assert "ratelimit.real:tempfail" in decisions()[-1]


def test_bad_rules_are_policy_errors_with_positions(make_gateway):
    with pytest.raises(SourceError) as err:
        make_gateway(
            plugins=limit(
                {"key": "recipient", "rate": "10/1h", "stage": "mail"},
                {"key": "client_ip", "rate": "10/1h", "count": "connections", "stage": "data"},
                {"key": "sender", "rate": "ten/1h"},
                {"key": "colour", "rate": "1/1h"},
            )
        )
    text = "\n".join(err.value.messages)
    assert "plugins.ratelimit.rules.0: recipient is not known yet at stage mail" in text
    assert "rules.1: connections are counted at connect or helo, not data" in text
    assert "rules.2.rate: expected a whole number before '/'" in text
    assert "rules.3.key" in text
    assert all(message.split(":")[1].isdigit() for message in err.value.messages)
    with pytest.raises(SourceError) as err:
        make_gateway(
            plugins=limit({"key": "client_ip", "rate": "1/1h"}, {"key": "client_ip", "rate": "2/h"})
        )
    assert "two rules named client_ip: give each a name" in err.value.messages[0]


def test_there_is_no_auth_user_selector_as_there_is_no_auth():
    with pytest.raises(ValidationError) as err:
        RateLimitConfig.model_validate({"rules": [{"key": "auth_user", "rate": "1/1h"}]})
    assert "auth_user" in str(err.value)


def test_key_values_ipv6_prefix_and_null_sender():
    config = RateLimitConfig.model_validate(
        {
            "rules": [
                {"key": ["client_ip", "sender_domain"], "rate": "1/1h"},
                {"key": "recipient_domain", "rate": "1/1h", "count": "recipients",
                 "stage": "data"},
            ]
        }
    )  # fmt: skip
    ip_rule, rcpt_rule = (_CompiledRule(r) for r in config.rules)
    session = Session("s", ipaddress.ip_address("2001:db8:1:2:3::4"), 25, "mx")
    envelope = Envelope("s.1", "", recipients=["a@X.example", "b@x.example", "c@y.example"])
    values = ip_rule.values(session, envelope, None)
    assert values == {"client_ip": ["2001:db8:1:2::/64"], "sender_domain": ["<>"]}
    assert ip_rule.keys(values) == ["client_ip+sender_domain:2001:db8:1:2::/64|<>"]
    rcpt_values = rcpt_rule.values(session, envelope, None)
    assert rcpt_values == {"recipient_domain": ["x.example", "y.example"]}
    assert rcpt_rule.cost(envelope, rcpt_values) == 1  # one per domain key at DATA


# ------------------------------------------------------------------ Redis


@pytest.mark.redis
def test_two_gateways_on_one_redis_enforce_one_limit(make_gateway, redis_server, upstream):
    policy = {
        "state": redis_server.url,
        "plugins": limit({"key": "client_ip", "rate": "4/1h"}),
    }
    one, two = make_gateway(**policy), make_gateway(**policy)
    codes = [send(gw)[0] for gw in (one, two) * 4]
    assert codes == [250] * 4 + [450] * 4
    assert len(upstream.messages) == 4


def _load(gw, stop: threading.Event, results: list[tuple[float, int, bytes]]) -> None:
    """Send messages until ``stop``; record (time, code, text) of each."""
    deadline = time.monotonic() + 60
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with gw.client() as client:
                code, text = client.mail("alice@example.net")
                if code == 250:
                    client.rcpt("bob@example.com")
                    code, text = client.data(MESSAGE)
                results.append((time.monotonic(), code, text))
        except (smtplib.SMTPException, OSError) as exc:
            results.append((time.monotonic(), -1, repr(exc).encode()))


def _under_load(gw, redis_server: RedisServer) -> tuple[list, list, list, list]:
    """Send from 4 threads; stop Redis, then start it again.

    Returns the results from before the stop, while Redis was down, after it
    was back, and all of them.
    """
    stop = threading.Event()
    results: list[tuple[float, int, bytes]] = []
    threads = [threading.Thread(target=_load, args=(gw, stop, results)) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: len(results) >= 20)
        stopping = time.monotonic()
        redis_server.stop()
        down = time.monotonic()
        _wait_for(lambda: sum(1 for r in results if r[0] > down + 0.5) >= 20)
        restarting = time.monotonic()
        redis_server.start()
        up = time.monotonic()
        _wait_for(lambda: sum(1 for r in results if r[0] > up and r[1] == 250) >= 10)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    before = [r for r in results if r[0] < stopping]
    # A message in flight when Redis stopped may have been checked just before.
    during = [r for r in results if down + 0.5 < r[0] < restarting]
    after = [r for r in results if r[0] > up]
    return before, during, after, results


def _wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.mark.redis
def test_redis_stopped_under_load_tempfails_then_recovers(
    make_gateway, redis_server, upstream, decisions
):
    gw = make_gateway(
        state={"url": redis_server.url, "timeout": "2s"},
        plugins=limit({"key": "client_ip", "rate": "100000/1h"}),
    )
    before, during, after, everything = _under_load(gw, redis_server)
    assert before and all(code == 250 for _, code, _ in before)
    assert during, "no message was tried while Redis was down"
    assert {(code, text) for _, code, text in during} == {
        (451, b"4.3.0 Temporary local problem, try again later")
    }
    assert any(code == 250 for _, code, _ in after)
    assert not [r for r in everything if r[1] >= 500 or r[1] == -1]
    assert len(upstream.messages) == sum(1 for r in everything if r[1] == 250)
    assert any("ratelimit.unavailable:tempfail" in line for line in decisions())


@pytest.mark.redis
def test_redis_stopped_under_load_with_on_error_allow_lets_mail_through(
    make_gateway, redis_server, upstream, decisions, caplog
):
    gw = make_gateway(
        state={"url": redis_server.url, "timeout": "2s"},
        plugins=limit({"key": "client_ip", "rate": "100000/1h"}, on_error="allow"),
    )
    _, during, _, everything = _under_load(gw, redis_server)
    assert during
    assert {code for _, code, _ in everything} == {250}
    assert len(upstream.messages) == len(everything)
    assert any("ratelimit.unavailable:tag" in line for line in decisions())
    warnings = [r.getMessage() for r in caplog.records if "state backend failed" in r.getMessage()]
    assert warnings and len(warnings) < len(during)  # rate-limited, not one per message
    assert "redis redis://127.0.0.1" in warnings[0]


def test_connections_per_helo_name_are_counted_at_ehlo(make_gateway):
    gw = make_gateway(
        state="memory", plugins=limit({"key": "helo", "rate": "1/1h", "count": "connections"})
    )
    assert gw.runtime.state is not None and gw.runtime.state.description == "memory"
    with gw.client(helo="a.example") as client:
        assert client.noop()[0] == 250
    client = smtplib.SMTP("127.0.0.1", gw.port, timeout=10)
    try:
        code, text = client.ehlo("A.EXAMPLE")
        assert (code, text) == (450, b"4.7.1 Rate limit exceeded, try again later")
        assert client.ehlo("b.example")[0] == 250
    finally:
        client.close()


def test_the_example_policy_is_valid():
    from mailgate.runtime import Runtime

    runtime = Runtime.load(str(Path(__file__).parent.parent / "policies/examples/ratelimit.yaml"))
    assert runtime.policy.workers == 4
    assert runtime.policy.state.url == "redis://127.0.0.1:6379/0"
    assert [n for n in runtime.plugin_set.plugins if n != "relay_access"][:3] == [
        "dnsbl",
        "ratelimit",
        "greylist",
    ]
