"""One DNS resolver per process, shared by every plugin that looks things up.

Built on dnspython. Names are always queried as absolute names with no search
list (a resolv.conf ``search``/``ndots`` must never turn ``example.com`` into
``example.com.corp.internal``). The async and the blocking resolver share one
TTL-respecting cache, so pyspf (which runs in a thread) and async plugins warm
it for each other.

Outcomes are explicit: an answer, ``None`` for "no such name or no such
record" (NXDOMAIN, NODATA), or :class:`DnsTempError` for a timeout, SERVFAIL
or a network error, which checks must treat as "try again later", never as a
failure of the thing being checked.
"""

from __future__ import annotations

from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from mailgate.policy import Dns as DnsConfig
from mailgate.policy import split_host_port


class DnsTempError(Exception):
    """A lookup that could not be answered now (timeout, SERVFAIL, network error)."""


def _configure(
    resolver: dns.resolver.Resolver | dns.asyncresolver.Resolver,
    config: DnsConfig,
    cache: dns.resolver.LRUCache,
) -> None:
    if config.nameservers:
        servers = [split_host_port(entry, 53) for entry in config.nameservers]
        resolver.nameservers = [host for host, _ in servers]
        resolver.nameserver_ports = {host: port for host, port in servers}
    resolver.lifetime = config.timeout
    resolver.timeout = config.timeout
    resolver.search = []
    resolver.use_search_by_default = False
    resolver.cache = cache


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name.rstrip(".") + ".")


class Resolver:
    """Async and blocking lookups through one configuration and one cache."""

    def __init__(self, config: DnsConfig) -> None:
        self.config = config
        self.cache = dns.resolver.LRUCache(max(config.cache_size, 1))
        self._keys: dict[tuple[str, str], tuple[dns.name.Name, Any, Any]] = {}
        # configure=False when nameservers are given: do not read resolv.conf at all.
        configure = not config.nameservers
        self._async = dns.asyncresolver.Resolver(configure=configure)
        self._sync = dns.resolver.Resolver(configure=configure)
        for resolver in (self._async, self._sync):
            _configure(resolver, config, self.cache)

    def cached(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The cached answer with records for ``name``/``rdtype``, as dnspython would return it.

        dnspython answers a cache hit only after parsing the name and setting up
        a resolution (about 10 us); the cache key is kept here per (name, type).
        Anything but a live positive answer (a miss, an expired or negative
        entry, a name dnspython refuses) is left to dnspython.
        """
        key = self._keys.get((name, rdtype))
        if key is None:
            try:
                key = (_absolute(name), dns.rdatatype.from_text(rdtype), dns.rdataclass.IN)
            except dns.exception.DNSException:
                return None
            if len(self._keys) >= 4096:
                self._keys.clear()
            self._keys[name, rdtype] = key
        answer = self.cache.get(key)
        return answer if answer is not None and answer.rrset is not None else None

    async def query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """Look up ``name``/``rdtype``; None for NXDOMAIN or no such record."""
        cached = self.cached(name, rdtype)
        if cached is not None:
            return cached
        try:
            return await self._async.resolve(_absolute(name), rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except (dns.exception.DNSException, OSError) as exc:
            # Timeout, SERVFAIL from every server, a network error: "try again later".
            raise DnsTempError(f"{name}/{rdtype}: {exc}") from exc

    def query_sync(
        self, name: str, rdtype: str, lifetime: float | None = None
    ) -> dns.resolver.Answer | None:
        """Blocking :meth:`query`, for libraries that run in a worker thread.

        ``lifetime`` caps this lookup below the configured timeout (a caller
        with a budget for several lookups, such as an SPF check, passes what is left).
        """
        cached = self.cached(name, rdtype)
        if cached is not None:
            return cached
        try:
            return self._sync.resolve(_absolute(name), rdtype, search=False, lifetime=lifetime)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except (dns.exception.DNSException, OSError) as exc:
            # Timeout, SERVFAIL from every server, a network error: "try again later".
            raise DnsTempError(f"{name}/{rdtype}: {exc}") from exc

    async def txt(self, name: str) -> list[bytes] | None:
        """The TXT records of ``name``, each with its strings joined; None if there are none."""
        answer = await self.query(name, "TXT")
        if answer is None:
            return None
        return [b"".join(rdata.strings) for rdata in answer]

    async def addresses(self, name: str, rdtype: str = "A") -> list[str] | None:
        """The A (or AAAA) addresses of ``name`` as text; None if there are none."""
        answer = await self.query(name, rdtype)
        if answer is None:
            return None
        return [rdata.to_text() for rdata in answer]
