"""Shared fixtures: loop thread, recording upstream, DNS server, gateway factory."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailgate.logformat import HANDLER_NAME
from tests.dnsserver import LoopbackDnsServer
from tests.redis_support import redis_server  # noqa: F401 - fixture for the Redis state tests
from tests.scanners import clamd, fake_scanner, rspamd, scanner_root, spamd  # noqa: F401
from tests.support import LoopThread, RecordingUpstream, RunningGateway, write_policy
from tests.tlscerts import certs  # noqa: F401 - fixture: certificates made at test time

MakeGateway = Callable[..., RunningGateway]


@pytest.fixture(autouse=True)
def _no_stderr_log_handler_left() -> Iterator[None]:
    """Remove the stderr handler that in-process ``mailgate`` commands install on the root
    logger, so that later tests' background log lines do not land in the pytest output."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.name == HANDLER_NAME]:
        root.removeHandler(handler)


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    """An event loop in a thread, for the gateway and the upstream."""
    thread = LoopThread()
    yield thread
    thread.stop()


@pytest.fixture
def upstream(loop_thread: LoopThread) -> Iterator[RecordingUpstream]:
    """A recording SMTP upstream on 127.0.0.1:0."""
    server = RecordingUpstream(loop_thread)
    yield server
    server.close()


@pytest.fixture
def dns_server() -> Iterator[LoopbackDnsServer]:
    """A DNS server on 127.0.0.1:0 serving the records a test adds."""
    server = LoopbackDnsServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def empty_dns() -> Iterator[LoopbackDnsServer]:
    """A loopback DNS server with no records: every name is NXDOMAIN."""
    server = LoopbackDnsServer()
    yield server
    server.stop()


@pytest.fixture
def make_gateway(
    loop_thread: LoopThread,
    upstream: RecordingUpstream,
    empty_dns: LoopbackDnsServer,
    tmp_path: Path,
) -> Iterator[MakeGateway]:
    """Start gateways from policy dicts; upstream defaults to the recording upstream.

    DNS defaults to an empty loopback server, so no test ever asks the
    machine's resolver (whose server is not on loopback).
    """
    started: list[RunningGateway] = []

    def make(**policy: Any) -> RunningGateway:
        policy.setdefault("upstream", upstream.url)
        policy.setdefault("domains", ["example.com"])
        policy.setdefault("dns", {"nameservers": [empty_dns.address]})
        path = write_policy(tmp_path / f"policy{len(started)}.yaml", policy)
        gw = RunningGateway(loop_thread, path)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture
def second(loop_thread: LoopThread) -> Iterator[RecordingUpstream]:
    """Another recording upstream: the server of a route."""
    server = RecordingUpstream(loop_thread)
    yield server
    server.close()


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    """The spool folder of the queue policies (``queue_policy``)."""
    return tmp_path / "spool"


@pytest.fixture
def queue_policy(spool: Path) -> Callable[..., dict[str, Any]]:
    """Policy keys for queue mode on ``spool`` with fast retries; keywords override ``queue``.

    A test module that wants other defaults overrides this fixture with a
    ``functools.partial`` of it.
    """

    def make(**queue: Any) -> dict[str, Any]:
        settings = {
            "directory": str(spool),
            "retry_min": "1s",
            "retry_max": "2s",
            "scan_interval": "1s",
            **queue,
        }
        return {"delivery": "queue", "queue": settings}

    return make


@pytest.fixture
def decisions(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """The decision log lines written so far."""
    caplog.set_level(logging.INFO, logger="mailgate")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "mailgate.decision"]

    return lines
