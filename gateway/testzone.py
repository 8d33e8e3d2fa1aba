"""A DNS zone for policy test cases, served on loopback so that cases never use real DNS.

A cases file (``mailgate test --cases``) may give records under ``dns:``,
for the whole file and per case::

    dns:
      example.net:
        TXT: "v=spf1 ip4:192.0.2.0/24 -all"     # one record, or a list
        MX: "10 mx.example.net"
      mx.example.net: {A: 192.0.2.25}
      2.0.0.127.zen.example: {A: 127.0.0.2}
      broken.example: servfail                  # answers SERVFAIL
      slow.example: timeout                     # never answers

Values are zone-file record data (``dns.rdata.from_text``); a TXT value that
is not already quoted is quoted and split into 255-byte strings. A CNAME is
followed within the zone. A name with records of other types answers NODATA,
any other name NXDOMAIN. The server (UDP, and TCP for long answers, on a free
loopback port; built on dnspython) is what the dry run's resolver asks, so
every plugin that uses the shared resolver sees these records and nothing else.
The test suite's loopback DNS server (``tests/dnsserver.py``) is this server
too, run in a thread, with records added while it serves.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from typing import Literal, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

log = logging.getLogger("mailgate.testzone")

TTL = 60
SPECIAL = ("servfail", "timeout")

ZoneSpec = Mapping[str, Mapping[str, str | list[str]] | Literal["servfail", "timeout"]]
"""Name -> {TYPE: value or list of values}, or ``servfail`` / ``timeout``."""


def _txt(value: str) -> str:
    if value.startswith('"'):
        return value
    data = value.encode()
    chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
    return " ".join(
        '"' + c.decode().replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks
    )


def _rdatas(name: dns.name.Name, type_text: str, texts: list[str]) -> list[dns.rdata.Rdata]:
    try:
        rdtype = dns.rdatatype.from_text(type_text.upper())
    except dns.exception.DNSException:
        raise ValueError(f"{name}: unknown record type {type_text!r}") from None
    rdatas = []
    for text in texts:
        if rdtype == dns.rdatatype.TXT:
            text = _txt(text)
        try:
            rdata = dns.rdata.from_text(
                dns.rdataclass.IN, rdtype, text, origin=dns.name.root, relativize=False
            )
        except (dns.exception.DNSException, ValueError) as exc:
            raise ValueError(f"{name} {type_text}: bad record {text!r}: {exc}") from None
        rdatas.append(rdata)
    return rdatas


def _name(name: str | dns.name.Name) -> dns.name.Name:
    return name if isinstance(name, dns.name.Name) else dns.name.from_text(name.rstrip(".") + ".")


class Zone:
    """Records ready to answer queries; thread-safe, so a test may edit it while it serves."""

    def __init__(self, spec: ZoneSpec | None = None, ttl: int = TTL) -> None:
        self.ttl = ttl
        self.records: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}
        self.special: dict[dns.name.Name, str] = {}
        self._lock = threading.Lock()
        for raw_name, entry in (spec or {}).items():
            name = _name(raw_name)
            if isinstance(entry, str):
                if entry not in SPECIAL:
                    raise ValueError(f"{raw_name}: expected records, servfail or timeout")
                self.special[name] = entry
                continue
            for type_text, values in entry.items():
                texts = [values] if isinstance(values, str) else values
                for rdata in _rdatas(name, type_text, texts):
                    self.add(name, rdata)

    def add(self, name: str | dns.name.Name, rdata: dns.rdata.Rdata) -> None:
        """Serve one more record at ``name``."""
        name = _name(name)
        with self._lock:
            types = self.records.setdefault(name, {})
            # A new RRset, never one changed in place: an answer being sent may hold the old one.
            rdatas = [*types.get(rdata.rdtype, ()), rdata]
            types[rdata.rdtype] = dns.rrset.from_rdata_list(name, self.ttl, rdatas)

    def set_special(self, name: str | dns.name.Name, kind: Literal["servfail", "timeout"]) -> None:
        """Make ``name`` answer SERVFAIL, or never answer (``timeout``)."""
        with self._lock:
            self.special[_name(name)] = kind

    def clear(self) -> None:
        """Forget every record and special name."""
        with self._lock:
            self.records.clear()
            self.special.clear()

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        """The response to ``query``, or None to stay silent (a timeout)."""
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        with self._lock:
            return self._answer(response, question.name, question.rdtype)

    def _answer(
        self, response: dns.message.Message, name: dns.name.Name, rdtype: int
    ) -> dns.message.Message | None:
        for _hop in range(8):
            special = self.special.get(name)
            if special == "timeout":
                return None
            if special == "servfail":
                response.set_rcode(dns.rcode.SERVFAIL)
                return response
            types = self.records.get(name)
            if types is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                return response
            if rdtype == dns.rdatatype.ANY:
                response.answer.extend(types.values())
                return response
            if rdtype in types:
                response.answer.append(types[rdtype])
                return response
            cname = types.get(dns.rdatatype.CNAME)
            if cname is None:
                return response  # NODATA
            response.answer.append(cname)
            name = cname[0].target
        return response


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: ZoneServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        wire = self.server.respond(data, udp=True)
        if wire is not None and self.transport is not None:
            self.transport.sendto(wire, addr)


class ZoneServer:
    """Serves a :class:`Zone` over UDP and TCP on one loopback port; swap ``zone`` freely."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    @classmethod
    async def start(cls, zone: Zone) -> ZoneServer:
        """Listen on 127.0.0.1 with a free port (the same number for UDP and TCP)."""
        server = cls(zone)
        loop = asyncio.get_running_loop()
        for _attempt in range(20):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(server), local_addr=("127.0.0.1", 0)
            )
            port = udp.get_extra_info("sockname")[1]
            try:
                server._tcp = await asyncio.start_server(server._serve_tcp, "127.0.0.1", port)
            except OSError:
                udp.close()  # that port is taken for TCP: try another
                continue
            server._udp = udp
            return server
        raise OSError("no free loopback port for the test DNS server")

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, as the policy's ``dns.nameservers`` takes it."""
        assert self._udp is not None
        host, port = self._udp.get_extra_info("sockname")[:2]
        return f"{host}:{port}"

    def respond(self, data: bytes, udp: bool) -> bytes | None:
        """The wire response to one query, or None to stay silent."""
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        try:
            response = self.zone.answer(query)
        except Exception:
            log.exception("test DNS server: cannot answer %s", query.question)
            return None
        if response is None:
            return None
        limit = 65535
        if udp:
            limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer.clear()
            response.flags |= dns.flags.TC  # the resolver retries over TCP
            return response.to_wire()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                size = int.from_bytes(await reader.readexactly(2), "big")
                wire = self.respond(await reader.readexactly(size), udp=False)
            if wire is not None:
                writer.write(len(wire).to_bytes(2, "big") + wire)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        """Stop serving."""
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
