"""pyspf and dkimpy resolve through our resolver (``mailgate.dns``), never their own.

pyspf looks names up through the module global ``spf.DNSLookup``, whose
default applies the resolv.conf search list and has no shared cache.
:func:`install_spf_lookup` replaces it, once per process, with
:func:`spf_lookup`, which uses the resolver bound to the calling thread by
:func:`bound_resolver` (the SPF plugin runs pyspf in worker threads and binds
its policy's resolver around each check, so two policies in one process, or a
reload, never mix resolvers). A DNS timeout or SERVFAIL becomes pyspf's
``TempError``, which it reports as ``temperror``.

dkimpy reports a DNS timeout as a failed signature. So DKIM and ARC keys are
fetched first, asynchronously, with :func:`fetch_keys`; a key that could not
be fetched now is a :class:`DnsTempError` in the result, which the plugins
report as temperror, and dkimpy only ever sees keys that were found
(:func:`key_lookup`).
"""

from __future__ import annotations

import asyncio
import functools
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import dns.exception
import dns.name
import spf

from mailgate.dns import DnsTempError, Resolver

_bound = threading.local()
_original_lookup = spf.DNSLookup
_install_lock = threading.Lock()


@contextmanager
def bound_resolver(resolver: Resolver) -> Iterator[None]:
    """Make pyspf in this thread resolve through ``resolver`` for the ``with`` block."""
    previous = getattr(_bound, "resolver", None)
    _bound.resolver = resolver
    try:
        yield
    finally:
        _bound.resolver = previous


class CacheMiss(BaseException):
    """A lookup :func:`from_cache` could not answer from the cache.

    A ``BaseException``, so that ``except Exception`` in the SPF check (or a
    bare ``except`` in pyspf) does not turn it into an SPF result; a miss is
    also recorded, so one that pyspf swallows still voids the attempt.
    """


T = TypeVar("T")


def from_cache(resolver: Resolver, call: Callable[[], T]) -> T | None:
    """``call()`` (which looks up through :func:`spf_lookup`) answered from the cache alone.

    None when any lookup was not a live positive answer in ``resolver``'s cache:
    then nothing was sent and the caller runs the real thing (in a thread). This
    lets a check whose records are all cached run on the event loop, without the
    thread hand-off (about 70 us of CPU for a 35 us check).
    """
    previous = getattr(_bound, "misses", None)
    misses: list[str] = []
    _bound.misses = misses
    try:
        with bound_resolver(resolver):
            result = call()
    except CacheMiss:
        return None
    finally:
        _bound.misses = previous
    return None if misses else result


def install_spf_lookup() -> None:
    """Point pyspf's ``DNSLookup`` at :func:`spf_lookup` (idempotent, process-wide)."""
    with _install_lock:
        spf.DNSLookup = spf_lookup


@functools.lru_cache(maxsize=4096)
def _valid_name(name: str) -> bool:
    try:
        dns.name.from_text(name.rstrip(".") + ".")
    except dns.exception.DNSException:
        return False
    return True


def spf_lookup(
    name: str, qtype: str, strict: Any = True, timeout: float = 20
) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's ``DNSLookup`` contract: ``[((name, qtype), value), ...]``.

    Values are shaped as pyspf's own dnspython backend shapes them: addresses
    as text, MX as ``(preference, exchange)``, PTR as a name without the final
    dot, TXT/SPF as the record's tuple of byte strings.
    """
    resolver: Resolver | None = getattr(_bound, "resolver", None)
    if resolver is None:  # pyspf called outside our plugin: keep its default behaviour
        result: list[tuple[tuple[str, str], Any]] = _original_lookup(name, qtype, strict, timeout)
        return result
    if not _valid_name(name):
        return []  # a name DNS cannot carry has no records (RFC 7208 §4.3)
    misses: list[str] | None = getattr(_bound, "misses", None)
    if misses is not None:  # from_cache(): a live positive cached answer, or give up
        answer = resolver.cached(name, qtype)
        if answer is None:
            misses.append(name)
            raise CacheMiss(name)
    else:
        lifetime = min(timeout, resolver.config.timeout) if timeout > 0 else resolver.config.timeout
        try:
            answer = resolver.query_sync(name, qtype, lifetime=max(lifetime, 0.001))
        except DnsTempError as exc:
            raise spf.TempError(f"DNS {exc}") from None
    if answer is None:
        return []
    out: list[tuple[tuple[str, str], Any]] = []
    for rdata in answer:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange.to_text(True))))
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), tuple(rdata.strings)))
    return out


# ---------------------------------------------------------------- DKIM / ARC keys

KeyRecord = bytes | None | DnsTempError
"""A fetched key: the TXT record, None when there is none, or the temporary error."""

_TAG = re.compile(rb"(?:^|;)\s*([a-zA-Z][a-zA-Z0-9_]*)\s*=\s*([^;]*)")


def signature_key_name(header_value: bytes) -> bytes | None:
    """``<s>._domainkey.<d>.`` from a DKIM-Signature/ARC value; None if it lacks s= or d=."""
    tags = {m.group(1).lower(): m.group(2) for m in _TAG.finditer(header_value)}
    selector, domain = (re.sub(rb"\s+", b"", tags.get(tag) or b"") for tag in (b"s", b"d"))
    if not selector or not domain:
        return None
    return selector + b"._domainkey." + domain.rstrip(b".") + b"."


async def _fetch(resolver: Resolver, name: bytes) -> KeyRecord:
    text = name.decode("ascii", "replace")
    if not _valid_name(text):
        return None
    try:
        records = await resolver.txt(text)
    except DnsTempError as exc:
        return exc
    return records[0] if records else None


async def fetch_keys(resolver: Resolver, names: Iterable[bytes]) -> dict[bytes, KeyRecord]:
    """Look up every key record in ``names`` at once."""
    unique = list(dict.fromkeys(n.lower() for n in names))
    if len(unique) == 1:  # the usual case: no task to create and schedule
        return {unique[0]: await _fetch(resolver, unique[0])}
    found = await asyncio.gather(*(_fetch(resolver, n) for n in unique))
    return dict(zip(unique, found, strict=True))


class KeyTempError(Exception):
    """A key could not be fetched now. Deliberately not a ``dkim.DKIMException``,
    so dkimpy does not turn it into a failed signature."""


def key_lookup(keys: dict[bytes, KeyRecord]) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` answering from ``keys`` (already fetched); no network."""

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        record = keys.get(name.lower())
        if isinstance(record, DnsTempError):
            raise KeyTempError(str(record))
        return record

    return dnsfunc
