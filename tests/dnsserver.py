"""A real DNS server on loopback (dnslib over UDP) that serves per-test zones.

Usage in a test (through the ``dns_server`` fixture in conftest.py)::

    dns_server.add("example.com", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    dns_server.add("example.com", "MX", (10, "mx.example.com"))
    dns_server.timeout("slow.example")      # never answers
    dns_server.servfail("broken.example")   # answers SERVFAIL
    policy dns: {nameservers: [f"127.0.0.1:{dns_server.port}"]}

Names are matched case-insensitively; a name that exists with other types
answers NOERROR with no records (NODATA), an unknown name NXDOMAIN. CNAMEs are
followed within the zone. ``queries`` records every (name, type) asked.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

from dnslib import AAAA, CNAME, MX, NS, PTR, QTYPE, RCODE, RR, TXT, A, DNSError, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer


def _key(name: str) -> str:
    return name.lower().rstrip(".") + "."


def _rdata(rtype: str, value: Any) -> Any:
    if rtype == "A":
        return A(value)
    if rtype == "AAAA":
        return AAAA(value)
    if rtype in ("TXT", "SPF"):
        data = value.encode() if isinstance(value, str) else value
        if isinstance(data, bytes):
            data = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
        return TXT(data)
    if rtype == "MX":
        preference, exchange = value
        return MX(exchange, preference)
    if rtype == "PTR":
        return PTR(value)
    if rtype == "CNAME":
        return CNAME(value)
    if rtype == "NS":
        return NS(value)
    raise ValueError(f"unsupported record type {rtype}")


class ZoneResolver(BaseResolver):  # type: ignore[misc]
    """Answers from an in-memory zone that tests edit while the server runs."""

    def __init__(self) -> None:
        self.records: dict[str, list[tuple[str, Any]]] = defaultdict(list)
        self.timeouts: set[str] = set()
        self.servfails: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        qname = str(request.q.qname)
        qtype = QTYPE[request.q.qtype]
        key = _key(qname)
        with self.lock:
            self.queries.append((key.rstrip("."), qtype))
            if key in self.timeouts:
                raise DNSError("simulated timeout")  # the handler then sends nothing
            reply = request.reply()
            if key in self.servfails:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            self._answer(reply, key, qname, qtype, depth=0)
            return reply

    def _answer(self, reply: DNSRecord, key: str, qname: str, qtype: str, depth: int) -> None:
        entries = self.records.get(key)
        if entries is None:
            if depth == 0:
                reply.header.rcode = RCODE.NXDOMAIN
            return
        cnames = [v for t, v in entries if t == "CNAME"]
        if cnames and qtype != "CNAME" and depth < 8:
            reply.add_answer(RR(qname, QTYPE.CNAME, rdata=CNAME(cnames[0]), ttl=300))
            self._answer(reply, _key(cnames[0]), cnames[0], qtype, depth + 1)
            return
        for rtype, value in entries:
            if rtype == qtype or (qtype == "ANY"):
                reply.add_answer(
                    RR(qname, getattr(QTYPE, rtype), rdata=_rdata(rtype, value), ttl=300)
                )


class LoopbackDnsServer:
    """A dnslib UDP server on 127.0.0.1 with an editable zone."""

    def __init__(self) -> None:
        self.resolver = ZoneResolver()
        self._server = DNSServer(
            self.resolver,
            address="127.0.0.1",
            port=0,
            logger=DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data"),
        )
        self.port: int = self._server.server.server_address[1]
        # A short poll interval: stop() waits up to one interval (0.5 s by default).
        self._thread = threading.Thread(
            target=self._server.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, as the policy's ``dns.nameservers`` takes it."""
        return f"127.0.0.1:{self.port}"

    @property
    def queries(self) -> list[tuple[str, str]]:
        """Every (name, type) asked so far."""
        return self.resolver.queries

    def add(self, name: str, rtype: str, value: Any) -> None:
        """Serve one more record."""
        with self.resolver.lock:
            self.resolver.records[_key(name)].append((rtype.upper(), value))

    def timeout(self, name: str) -> None:
        """Never answer queries for ``name``."""
        self.resolver.timeouts.add(_key(name))

    def servfail(self, name: str) -> None:
        """Answer SERVFAIL for ``name``."""
        self.resolver.servfails.add(_key(name))

    def clear(self) -> None:
        """Forget every record, timeout and servfail."""
        with self.resolver.lock:
            self.resolver.records.clear()
            self.resolver.timeouts.clear()
            self.resolver.servfails.clear()
            self.resolver.queries.clear()

    def stop(self) -> None:
        """Stop serving."""
        self._server.server.shutdown()
        self._server.server.server_close()
