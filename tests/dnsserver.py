"""A real DNS server on loopback that serves per-test zones: ``mailgate.testzone`` in a thread.

Usage in a test (through the ``dns_server`` fixture in conftest.py)::

    dns_server.add("example.com", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    dns_server.add("example.com", "MX", (10, "mx.example.com"))
    dns_server.timeout("slow.example")      # never answers
    dns_server.servfail("broken.example")   # answers SERVFAIL
    policy dns: {nameservers: [dns_server.address]}

The server is the one ``mailgate test`` uses (UDP, and TCP for long answers),
run on its own event loop in a thread so that synchronous tests can edit the
zone while it serves. Names are matched case-insensitively; a name that
exists with other types answers NOERROR with no records (NODATA), an unknown
name NXDOMAIN. CNAMEs are followed within the zone. ``queries`` records every
(name, type) asked.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SPF
import dns.rdtypes.ANY.TXT

from mailgate.testzone import Zone, ZoneServer

TTL = 300


def _rdata(rtype: str, value: Any) -> dns.rdata.Rdata:
    """One record from a Python value: text, TXT bytes or a list of strings, MX (pref, host)."""
    rdtype = dns.rdatatype.from_text(rtype)
    if rtype in ("TXT", "SPF"):
        if isinstance(value, list):
            strings = [v.encode() if isinstance(v, str) else v for v in value]
        else:
            data = value.encode() if isinstance(value, str) else value
            strings = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
        cls = dns.rdtypes.ANY.TXT.TXT if rtype == "TXT" else dns.rdtypes.ANY.SPF.SPF
        return cls(dns.rdataclass.IN, rdtype, strings)
    if rtype == "MX":
        preference, exchange = value
        value = f"{preference} {exchange}"
    if rtype in ("MX", "PTR", "CNAME", "NS") and not value.endswith("."):
        value += "."
    return dns.rdata.from_text(
        dns.rdataclass.IN, rdtype, value, origin=dns.name.root, relativize=False
    )


class RecordingZone(Zone):
    """A :class:`Zone` that keeps every (name, type) asked."""

    def __init__(self) -> None:
        super().__init__(ttl=TTL)
        self.queries: list[tuple[str, str]] = []

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        for question in query.question[:1]:
            name = question.name.to_text(omit_final_dot=True).lower()
            self.queries.append((name, dns.rdatatype.to_text(question.rdtype)))
        return super().answer(query)


class LoopbackDnsServer:
    """A :class:`mailgate.testzone.ZoneServer` on 127.0.0.1 with an editable zone."""

    def __init__(self, zone: RecordingZone | None = None) -> None:
        self.zone = zone or RecordingZone()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        start = asyncio.run_coroutine_threadsafe(ZoneServer.start(self.zone), self._loop)
        self._server = start.result(timeout=30)
        self.port: int = int(self._server.address.rpartition(":")[2])

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, as the policy's ``dns.nameservers`` takes it."""
        return self._server.address

    @property
    def queries(self) -> list[tuple[str, str]]:
        """Every (name, type) asked so far."""
        return self.zone.queries

    def add(self, name: str | dns.name.Name, rtype: str, value: Any) -> None:
        """Serve one more record."""
        self.zone.add(name, _rdata(rtype.upper(), value))

    def timeout(self, name: str) -> None:
        """Never answer queries for ``name``."""
        self.zone.set_special(name, "timeout")

    def servfail(self, name: str) -> None:
        """Answer SERVFAIL for ``name``."""
        self.zone.set_special(name, "servfail")

    def clear(self) -> None:
        """Forget every record, timeout and servfail, and the queries asked."""
        self.zone.clear()
        self.zone.queries.clear()

    def stop(self) -> None:
        """Stop serving."""
        asyncio.run_coroutine_threadsafe(self._server.close(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
