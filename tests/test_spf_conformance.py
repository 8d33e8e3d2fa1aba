"""The RFC 7208 conformance suite (openspf.org), run through our SPF code path.

Each scenario's zone is served by a real DNS server on loopback; each test
runs ``mailgate.plugins.spf.check_spf``, the function the plugin runs: our pyspf
``DNSLookup`` adapter, the shared resolver with its cache, then pyspf.

The suite is vendored, unchanged, in ``tests/data/spf/rfc7208-tests.yml``
(its origin, digest and BSD licence are in ``tests/data/spf/README.md``).
The driver follows pyspf's own
(``test/testspf.py``): SPF records are also served as TXT unless the name
has TXT data of its own (``TXT: NONE`` only suppresses that), ``TIMEOUT``
makes queries time out for every type not listed before it, and an expected
explanation ``DEFAULT`` means the checker's default explanation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.name
import dns.rdatatype
import pytest
import yaml

from mailgate.dns import Resolver
from mailgate.dnsadapters import install_spf_lookup
from mailgate.plugins.spf import check_spf
from mailgate.policy import Dns
from tests.dnsserver import LoopbackDnsServer, RecordingZone

SUITE = Path(__file__).resolve().parent / "data" / "spf" / "rfc7208-tests.yml"
SUITE_SHA256 = "901f561a6e2b1c1590a40a61b1ac7601226fd7045a7aae591a4d25421358d6f9"
DEFAULT_EXPLANATION = "SPF fail - not authorized"

# Cases our code path cannot pass, each with the reason.
XFAIL: dict[str, str] = {
    "ptr-cname-loop": (
        "over real DNS a CNAME loop is a resolver failure (dnspython: 'CNAME chain is too "
        "long', as a recursive resolver answers SERVFAIL), so the A lookup of the PTR name "
        "is a TempError; RFC 7208 5.5 says to skip that name, but pyspf 2.0.14's "
        "validated_ptrs() lets the TempError end the check: temperror, not neutral. The "
        "suite's own driver passes it only because it resolves CNAMEs inside pyspf."
    ),
}


def _scenarios() -> list[dict[str, Any]]:
    with SUITE.open("rb") as f:
        return [s for s in yaml.safe_load_all(f) if s]


def _cases() -> Iterator[Any]:
    for scenario in _scenarios():
        for name, test in scenario["tests"].items():
            marks = [pytest.mark.xfail(reason=XFAIL[name], strict=True)] if name in XFAIL else []
            yield pytest.param(scenario, test, id=name, marks=marks)


class _SuiteZone(RecordingZone):
    """The test zone plus the suite's per-type TIMEOUT: name -> the types still answered."""

    def __init__(self) -> None:
        super().__init__()
        self.typed_timeouts: dict[dns.name.Name, set[str]] = {}

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        if query.question:
            question = query.question[0]
            answered = self.typed_timeouts.get(question.name)
            if answered is not None and dns.rdatatype.to_text(question.rdtype) not in answered:
                return None  # never answers
        return super().answer(query)


def _raw(value: Any) -> Any:
    """The suite writes bytes as \\xNN escapes in YAML strings: keep them as those bytes."""
    if isinstance(value, str):
        return value.encode("latin-1")
    if isinstance(value, list):
        return [_raw(v) for v in value]
    return value


def _load_zone(server: LoopbackDnsServer, zone: _SuiteZone, zonedata: dict[str, list[Any]]) -> None:
    for raw_name, entries in zonedata.items():
        name = dns.name.from_text(raw_name.encode("latin-1"))  # the raw bytes, no IDNA
        records: list[tuple[str, Any]] = []
        timeout_after: set[str] | None = None
        for entry in entries:
            if entry == "TIMEOUT":
                timeout_after = {t for t, v in records if v != "NONE"}
                break
            [(rtype, value)] = entry.items()
            records.append((rtype, value))
        has_txt = any(t == "TXT" for t, _ in records)
        for rtype, value in records:
            if value == "NONE":
                continue
            if rtype in ("TXT", "SPF"):
                value = _raw(value)
                if isinstance(value, list) and not value:
                    continue  # a TXT record with no strings cannot be encoded; pyspf skips it
                if rtype == "SPF" and not has_txt:
                    server.add(name, "TXT", value)
            elif rtype == "MX":
                value = (value[0], value[1])
            server.add(name, rtype, value)
        if timeout_after is not None:
            served = set(timeout_after)
            if "SPF" in served and not has_txt:
                served.add("TXT")
            zone.typed_timeouts[name] = served


@pytest.fixture(scope="module")
def suite_server() -> Iterator[tuple[LoopbackDnsServer, _SuiteZone]]:
    zone = _SuiteZone()
    server = LoopbackDnsServer(zone)
    yield server, zone
    server.stop()


@pytest.fixture
def suite_dns(suite_server):
    server, zone = suite_server
    server.clear()
    zone.typed_timeouts.clear()
    return server, zone


def test_the_suite_is_there_unchanged_with_its_licence():
    assert hashlib.sha256(SUITE.read_bytes()).hexdigest() == SUITE_SHA256
    assert "Redistributions of source code" in (SUITE.parent / "rfc7208-tests.LICENSE").read_text()
    assert SUITE_SHA256 in (SUITE.parent / "README.md").read_text()
    assert sum(len(s["tests"]) for s in _scenarios()) > 200


@pytest.mark.parametrize(("scenario", "test"), list(_cases()))
def test_rfc7208(scenario, test, suite_dns):
    server, zone = suite_dns
    _load_zone(server, zone, scenario["zonedata"])
    install_spf_lookup()
    resolver = Resolver(Dns(nameservers=[server.address], timeout=0.5))
    result = check_spf(resolver, test["host"], test["mailfrom"], test["helo"], "mx.test", 5.0)
    expected = test["result"] if isinstance(test["result"], list) else [test["result"]]
    assert result.result in expected, test.get("description", "")
    if "explanation" in test:
        wanted = test["explanation"]
        assert result.explanation == (DEFAULT_EXPLANATION if wanted == "DEFAULT" else wanted)
