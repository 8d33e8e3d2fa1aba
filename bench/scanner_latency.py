"""``python -m bench.scanner_latency``: milliseconds per scan of the 4 KB bench message.

Starts private rspamd, spamd and clamd on loopback (configured as the tests
configure them, ``tests/scanners.py``), then runs each plugin's ``on_data``
(the whole plugin: request, answer, verdict) ``--count`` times in sequence on
the bench message (default 100, and never more than ``--seconds`` per
scanner), and prints the median, p90 and max. The daemons are stopped by PID
at the end. Figures from a shared machine are indicative.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench import message
from mailgate.context import Envelope, Message, Session
from mailgate.plugins.clamav import Clamav, ClamavConfig
from mailgate.plugins.rspamd import Rspamd, RspamdConfig
from mailgate.plugins.spamassassin import SpamAssassin, SpamAssassinConfig
from mailgate.registry import PluginSettings
from tests.scanners import Daemon, start_clamd, start_rspamd, start_spamd


async def _measure(plugin: Any, data: bytes, count: int, seconds: float) -> list[float]:
    context = SimpleNamespace(hostname="mailgate.bench", settings_of=lambda _p: PluginSettings())
    result = plugin.on_startup(context)
    if asyncio.iscoroutine(result):
        await result
    session = Session("bench", ipaddress.ip_address("127.0.0.1"), 40000, "mailgate.bench")
    session.helo = message.HELO
    times: list[float] = []
    deadline = time.monotonic() + seconds
    try:
        for n in range(count):
            envelope = Envelope(f"bench.{n}", message.SENDER, recipients=["rcpt@example.com"])
            started = time.perf_counter()
            verdict = await plugin.on_data(session, envelope, Message(data))
            times.append((time.perf_counter() - started) * 1000)
            if not verdict.rule.endswith(".clean"):
                raise RuntimeError(f"{plugin.name}: unexpected verdict {verdict}")
            if time.monotonic() > deadline:
                break
    finally:
        if hasattr(plugin, "on_shutdown"):
            await plugin.on_shutdown()
    return times


def main(argv: list[str] | None = None) -> int:
    """Start the daemons, measure, print, stop."""
    p = argparse.ArgumentParser(prog="python -m bench.scanner_latency", description=__doc__)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--seconds", type=float, default=30.0, help="per scanner, at most")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="mailgate-scanlat-"))
    root.chmod(0o755)
    data = message.build(root).data
    daemons: list[Daemon] = []
    try:
        rspamd = start_rspamd(root / "rspamd")
        daemons.append(rspamd)
        spamd = start_spamd(root / "spamd")
        daemons.append(spamd)
        clamd = start_clamd(root / "clamd")
        daemons.append(clamd)
        plugins = [
            Rspamd(RspamdConfig(servers=[rspamd.address])),
            SpamAssassin(SpamAssassinConfig(servers=[spamd.address])),
            Clamav(ClamavConfig(servers=[clamd.address])),
        ]
        print(f"{len(data)}-byte message, {args.count} scans each, one after another")
        print(f"{'plugin':14} {'scans':>5} {'median ms':>10} {'p90 ms':>8} {'max ms':>8}")
        for plugin in plugins:
            ms = asyncio.run(_measure(plugin, data, args.count, args.seconds))
            p90 = statistics.quantiles(ms, n=10, method="inclusive")[-1] if len(ms) > 1 else ms[0]
            print(
                f"{plugin.name:14} {len(ms):5d} {statistics.median(ms):10.2f} "
                f"{p90:8.2f} {max(ms):8.2f}"
            )
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
