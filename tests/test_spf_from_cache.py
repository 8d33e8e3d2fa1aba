"""An SPF check whose records are all cached runs on the event loop, with the thread's answer."""

from __future__ import annotations

import functools

from mailgate.dns import Resolver
from mailgate.dnsadapters import from_cache, install_spf_lookup
from mailgate.plugins.spf import check_spf
from mailgate.policy import Dns


def _check(resolver: Resolver, sender: str) -> functools.partial[object]:
    return functools.partial(
        check_spf, resolver, "192.0.2.7", sender, "client.example", "mx.test", 20.0
    )


def test_a_cold_cache_gives_none_and_sends_nothing_then_the_warm_answer_is_the_same(
    dns_server,
) -> None:
    install_spf_lookup()
    dns_server.add("example.org", "TXT", "v=spf1 include:_spf.example.org -all")
    dns_server.add("_spf.example.org", "TXT", "v=spf1 ip4:192.0.2.0/24 exp=why.example.org ~all")
    dns_server.add("why.example.org", "TXT", "not from %{i}")
    resolver = Resolver(Dns(nameservers=[dns_server.address]))
    check = _check(resolver, "alice@example.org")
    assert from_cache(resolver, check) is None
    assert dns_server.zone.queries == []  # a miss sends nothing
    threaded = check()  # what the plugin's thread does: fills the cache
    assert threaded.result == "pass"
    assert from_cache(resolver, check) == threaded


def test_a_cached_negative_answer_is_left_to_the_thread(dns_server) -> None:
    install_spf_lookup()
    resolver = Resolver(Dns(nameservers=[dns_server.address]))
    check = _check(resolver, "bob@nothing.example")
    assert check().result == "none"  # NXDOMAIN, cached as a negative answer
    assert from_cache(resolver, check) is None


def test_a_fail_with_an_explanation_is_the_same_from_the_cache(dns_server) -> None:
    install_spf_lookup()
    dns_server.add("strict.example", "TXT", "v=spf1 -all exp=exp.strict.example")
    dns_server.add("exp.strict.example", "TXT", "%{i} may not send for %{d}")
    resolver = Resolver(Dns(nameservers=[dns_server.address]))
    check = _check(resolver, "carol@strict.example")
    assert from_cache(resolver, check) is None
    threaded = check()
    assert threaded.result == "fail" and "192.0.2.7" in threaded.explanation
    assert from_cache(resolver, check) == threaded


def test_a_miss_that_pyspf_swallows_still_voids_the_attempt(dns_server) -> None:
    # pyspf fetches exp= under a bare except: the miss must still count.
    install_spf_lookup()
    dns_server.add("quiet.example", "TXT", "v=spf1 ip4:192.0.2.0/24 exp=gone.quiet.example -all")
    resolver = Resolver(Dns(nameservers=[dns_server.address]))
    check = _check(resolver, "dave@quiet.example")
    assert check().result == "pass"  # gone.quiet.example: NXDOMAIN, a negative cache entry
    assert from_cache(resolver, check) is None
