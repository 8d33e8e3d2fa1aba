"""The bench harness works in a tiny configuration: real processes on loopback, real SMTP.

No timing assertions: these only check that the pieces start, carry mail and
count it exactly (so a run that loses or duplicates mail is caught).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import driver, message
from bench.procs import Proc, free_port
from bench.run import LoadGenerator, load_run
from bench.systems import (
    ComposedPolicy,
    System,
    compose_policy,
    start_mailgate,
    start_naive,
    start_sink,
)

MESSAGE = message.big(2000)


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[tuple[Proc, int]]:
    proc, port = start_sink(tmp_path)
    yield proc, port
    proc.stop()
    assert not proc.alive()


def test_sink_counts_each_message_once_and_spots_duplicates(sink):
    _, port = sink
    driver.send_one(port, message.SENDER, ["a@example.com"], MESSAGE)
    driver.send_one(port, message.SENDER, ["b@example.com", "c@example.com"], MESSAGE)
    assert driver.sink_count(port).check(2) is None
    driver.send_one(port, message.SENDER, ["a@example.com"], MESSAGE)  # the same envelope again
    count = driver.sink_count(port)
    assert (count.messages, count.unique) == (3, 2)
    assert count.check(3) == "sent 3, sink got 3 (1 lost, 1 duplicated)"
    driver.sink_command(port, "XRESET")
    assert driver.sink_count(port) == driver.SinkCount(0, 0)


def test_asyncio_driver_delivers_exactly_what_it_sends(sink):
    _, port = sink
    elapsed, errors = asyncio.run(driver.throughput(port, 20, 4, 5, message.SENDER, MESSAGE))
    assert errors == []
    assert elapsed > 0
    assert driver.sink_count(port).check(20) is None


def _default_policy(tmp_path: Path, port: int, sink_port: int) -> ComposedPolicy:
    """The bench's default policy on ``port``, relaying to the sink (no DNS needed)."""
    return compose_policy(
        "default", tmp_path / "p.yaml", port=port, sink_port=sink_port, dns="127.0.0.1:9",
        workers=1,
    )  # fmt: skip


def test_mailgate_and_naive_relay_versus_direct_in_a_tiny_run(sink, tmp_path):
    _, sink_port = sink
    port = free_port()
    policy = _default_policy(tmp_path, port, sink_port)
    gateway = start_mailgate(tmp_path, "mg", policy.path, port)
    naive_port = free_port()
    naive = start_naive(tmp_path, naive_port, sink_port)
    try:
        gen = LoadGenerator("asyncio", tmp_path / "unused.txt", MESSAGE, concurrency=4)
        systems = [
            System("direct", "direct", sink_port),
            System("mg", "mailgate", port, gateway),
            System("naive", "naive", naive_port, naive),
        ]
        for system in systems:
            # 100 messages: enough CPU time to show in /proc's 10 ms ticks.
            run = load_run(system, "1 rcpt", 100, gen, sink_port)
            assert run.error is None, (system.key, run.error)
            assert run.rate is not None and run.rate > 0
            if system.proc is not None:
                assert run.cpu_ms is not None and run.cpu_ms > 0
        assert policy.plugins == ["helo", "headers"] and policy.dropped == {}
    finally:
        naive.stop()
        gateway.stop()
    assert not gateway.alive() and not naive.alive()
    assert "mailgate.decision" in gateway.log_path.read_text()


def test_a_lost_message_makes_the_run_invalid(sink, tmp_path):
    _, sink_port = sink
    port = free_port()
    policy = _default_policy(tmp_path, port, sink_port)
    text = policy.path.read_text().replace("domains:\n- example.com", "domains:\n- other.test")
    policy.path.write_text(text)  # now every recipient is refused: nothing arrives
    gateway = start_mailgate(tmp_path, "mg", policy.path, port)
    try:
        gen = LoadGenerator("asyncio", tmp_path / "unused.txt", MESSAGE, concurrency=2)
        run = load_run(System("mg", "mailgate", port, gateway), "1 rcpt", 5, gen, sink_port)
    finally:
        gateway.stop()
    assert run.rate is None
    assert run.error is not None and "5 lost" in run.error


@pytest.mark.parametrize("with_key", [True, False])
def test_a_full_policy_run_is_valid_only_when_every_message_passes_dkim_and_spf(
    sink, tmp_path, with_key
):
    from tests.dnsserver import LoopbackDnsServer

    _, sink_port = sink
    msg = message.build(tmp_path)
    dns = LoopbackDnsServer()
    for name, rtype, value in msg.dns_records:
        if with_key or "_domainkey" not in name:
            dns.add(name, rtype, value)
    port = free_port()
    policy = compose_policy(
        "full", tmp_path / "full.yaml", port=port, sink_port=sink_port, dns=dns.address,
        workers=1,
    )  # fmt: skip
    gateway = start_mailgate(tmp_path, "mg-full", policy.path, port)
    try:
        gen = LoadGenerator("asyncio", tmp_path / "unused.txt", msg.data, concurrency=2)
        system = System("mg-full", "mailgate full", port, gateway, verifies=True)
        run = load_run(system, "1 rcpt", 10, gen, sink_port)
    finally:
        gateway.stop()
        dns.stop()
    assert {"spf", "dkim", "dmarc"} <= set(policy.plugins)
    if with_key:
        assert run.error is None and run.rate is not None
    else:  # delivered (SPF aligns for DMARC), but DKIM did not pass: not a valid run
        assert run.rate is None
        assert run.error == "dkim=pass and spf=pass on 0 of 10 messages"
