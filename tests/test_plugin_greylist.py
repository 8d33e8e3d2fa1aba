"""greylist over real SMTP: new triplets wait, retries pass, exemptions, SPF bypass, Redis."""

from __future__ import annotations

import time

import pytest

from tests.support import MESSAGE

GREYLISTED = (450, b"4.7.1 Greylisted, please try again in 3600 seconds")


def attempt(gw, sender="alice@example.net", rcpt="bob@example.com") -> tuple[int, bytes]:
    """One delivery attempt on a new connection: the RCPT reply, or DATA's when RCPT passed."""
    with gw.client() as client:
        assert client.mail(sender)[0] == 250
        code, text = client.rcpt(rcpt)
        if code != 250:
            return code, text
        return client.data(MESSAGE)


def retry_until_accepted(gw, timeout: float = 30, **kwargs: str) -> int:
    """Retry (like an MTA would, only faster) until accepted; return the number of attempts."""
    deadline = time.monotonic() + timeout
    tries = 0
    while True:
        tries += 1
        code, _ = attempt(gw, **kwargs)
        if code == 250:
            return tries
        assert code == 450 and time.monotonic() < deadline
        time.sleep(0.2)


def test_a_new_triplet_is_greylisted_and_so_is_an_early_retry(make_gateway, upstream, decisions):
    gw = make_gateway(plugins={"greylist": {"delay": "1h"}})
    assert attempt(gw) == GREYLISTED
    assert attempt(gw)[0] == 450
    assert attempt(gw, rcpt="carol@example.com")[0] == 450  # another triplet
    assert upstream.messages == []
    assert "verdicts=greylist.delayed:tempfail" in decisions()[-1]
    assert "rejected_rcpts=<carol@example.com>:450" in decisions()[-1]


def test_a_retry_after_the_delay_passes_and_the_triplet_is_known_afterwards(make_gateway, upstream):
    gw = make_gateway(plugins={"greylist": {"delay": "1s"}})
    assert retry_until_accepted(gw) >= 2
    # Known from now on: accepted at the first attempt, on a new connection.
    assert attempt(gw)[0] == 250
    assert len(upstream.messages) == 2
    # The other recipients and senders are still unknown.
    assert attempt(gw, sender="mallory@example.net")[0] == 450


def test_trusted_exempt_networks_and_exempt_recipients_skip_greylisting(make_gateway):
    trusted = make_gateway(trusted_networks=["127.0.0.0/8"], plugins={"greylist": {}})
    assert attempt(trusted)[0] == 250
    exempt = make_gateway(plugins={"greylist": {"exempt_networks": ["127.0.0.0/24"]}})
    assert attempt(exempt)[0] == 250
    rcpts = make_gateway(plugins={"greylist": {"exempt_recipients": ["postmaster@example.com",
                                                                     "example.org"]}},
                         domains=["example.com", "example.org"])  # fmt: skip
    assert attempt(rcpts, rcpt="Postmaster@example.com")[0] == 250
    assert attempt(rcpts, rcpt="anyone@example.org")[0] == 250
    assert attempt(rcpts, rcpt="bob@example.com")[0] == 450


def test_monitor_mode_records_but_lets_mail_through(make_gateway, decisions):
    gw = make_gateway(plugins={"greylist": {"delay": "1h", "mode": "monitor"}})
    assert attempt(gw)[0] == 250
    assert "verdicts=greylist.delayed:tempfail(monitor)" in decisions()[-1]


def test_spf_pass_bypasses_greylisting_for_listed_domains(make_gateway, dns_server):
    dns_server.add("example.net", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    dns_server.add("other.example", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    gw = make_gateway(
        dns={"nameservers": [dns_server.address]},
        plugins={
            # fail: reject makes spf decide (and publish its result) at MAIL FROM.
            "spf": {"module": "mailgate.plugins.spf:Spf", "fail": "reject"},
            "greylist": {"delay": "1h", "spf_bypass": ["EXAMPLE.NET"]},
        },
    )
    assert attempt(gw, sender="alice@example.net")[0] == 250
    assert attempt(gw, sender="carol@other.example")[0] == 450  # passes SPF, not listed


def test_invalid_windows_are_policy_errors(make_gateway):
    from mailgate.yamlsource import SourceError

    with pytest.raises(SourceError) as err:
        make_gateway(plugins={"greylist": {"delay": "1h", "retry_window": "30m"}})
    assert "plugins.greylist: retry_window must be longer than delay" in err.value.messages[0]


@pytest.mark.redis
def test_two_gateways_on_one_redis_share_the_triplets(make_gateway, redis_server, upstream):
    policy = {"state": redis_server.url, "plugins": {"greylist": {"delay": "1s"}}}
    first, second = make_gateway(**policy), make_gateway(**policy)
    assert attempt(first)[0] == 450
    # The retry goes to the other gateway, which knows the first attempt.
    assert retry_until_accepted(second) >= 1
    assert attempt(first)[0] == 250
    assert len(upstream.messages) == 2


@pytest.mark.redis
def test_redis_down_tempfails_or_allows_as_configured(make_gateway, redis_server, decisions):
    closed = make_gateway(state=redis_server.url, plugins={"greylist": {"delay": "1h"}})
    open_ = make_gateway(
        state=redis_server.url, plugins={"greylist": {"delay": "1h", "on_error": "allow"}}
    )
    assert attempt(closed)[0] == 450
    redis_server.stop()
    assert attempt(closed) == (451, b"4.3.0 Temporary local problem, try again later")
    assert attempt(open_)[0] == 250
    assert "greylist.unavailable:tag" in decisions()[-1]
