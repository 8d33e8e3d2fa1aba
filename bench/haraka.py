"""Haraka for the side-by-side runs: installed from npm into a scratch folder, never the repo.

``install(scratch)`` runs ``npm install Haraka`` (pinned) plus its ``headers``
plugin in ``SCRATCH/haraka``. ``instance(...)`` writes a Haraka config folder:
``rcpt_to.in_host_list`` (accept mail for example.com, like mailgate's relay
control) and ``queue/smtp_forward`` to the bench sink, optionally the
``headers`` plugin, or for the full comparison ``spf``, ``headers`` and
``dkim`` (verification on, Haraka's bundled haraka-plugin-spf and
haraka-plugin-dkim), ``nodes`` 0 (one process) or N (cluster), log level
``notice`` (one summary line per connection, like mailgate's decision line).

For the full comparison two more bench plugins run: ``bench_public`` marks
the client as not private (Haraka's SPF plugin skips private addresses, and
the bench's clients are on 127.0.0.1; mailgate checks them), and
``bench_verified``, after ``dkim`` at ``data_post``, adds
``X-Bench-Verified: dkim=<result> spf=<result>`` from the plugins' own
results, so that the sink can count the messages that really passed (Haraka
builds its Authentication-Results header before ``data_post``, where DKIM is
verified, so that header never shows the DKIM result). Node's resolver is
pointed at the bench's loopback DNS server (``BENCH_DNS``), which serves the
message's SPF and DKIM records; Haraka has no DNS cache of its own, so it
asks that server for them on every message, as it would ask a local resolver.

Two things are changed from stock, both in Haraka's favour, both documented in
bench/README.md:

- a 3-line ``bench_rdns`` plugin answers the ``lookup_rdns`` hook at once.
  Stock Haraka asks DNS for every client's PTR; mailgate does no rDNS, and the
  bench must not send DNS queries off the machine.
- a ``--require`` preload points Node's resolver at a closed loopback port (or,
  for the full comparison, at the bench's loopback DNS server), so any other
  lookup fails at once or stays local instead of leaving the machine; with
  ``BENCH_NODELAY=1`` it also sets TCP_NODELAY on every outgoing socket (stock
  Haraka leaves Nagle on for its upstream connection). On SIGUSR2 it runs a
  full garbage collection, so the memory run compares settled heaps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

from bench.procs import Proc

HARAKA_VERSION = "3.3.4"
HEADERS_VERSION = "1.2.0"
SPF_VERSION = "1.3.0"
DKIM_VERSION = "1.3.1"
"""The versions Haraka 3.3.4 bundles (its optional dependencies), pinned."""

_PRELOAD = """\
const dns = require('node:dns')
// The discard port (nothing listens: lookups fail locally), or the bench's loopback DNS server.
const servers = [process.env.BENCH_DNS || '127.0.0.1:9']
dns.setServers(servers)
dns.promises.setServers(servers)
// The bench sends SIGUSR2 for a full GC before it reads RSS (needs --expose-gc).
if (global.gc) process.on('SIGUSR2', () => global.gc())
if (process.env.BENCH_NODELAY === '1') {
    const net = require('node:net')
    const connect = net.connect
    net.connect = net.createConnection = function (...args) {
        const socket = connect.apply(this, args)
        socket.setNoDelay(true)
        return socket
    }
}
"""

_RDNS_PLUGIN = """\
// mailgate bench: skip the per-connection PTR lookup (mailgate does none).
exports.hook_lookup_rdns = function (next, connection) {
    next(OK, 'localhost')
}
"""

_PUBLIC_PLUGIN = """\
// mailgate bench: the clients are on 127.0.0.1; check them as mailgate does
// (haraka-plugin-spf skips private addresses).
exports.hook_connect_init = function (next, connection) {
    connection.remote.is_private = false
    connection.remote.is_local = false
    next()
}
"""

_VERIFIED_PLUGIN = """\
// mailgate bench: say in a header what spf and dkim found, for the sink to count.
exports.hook_data_post = function (next, connection) {
    const txn = connection.transaction
    if (!txn) return next()
    const dkim = (txn.notes.dkim_results || []).some((r) => r.result === 'pass') ? 'pass' : 'none'
    const spf = String(txn.notes.spf_mail_result || 'none').toLowerCase()
    txn.add_header('X-Bench-Verified', `dkim=${dkim} spf=${spf}`)
    next()
}
"""


def available() -> str | None:
    """None when node and npm are installed; otherwise why Haraka cannot run."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not installed" if missing else None


def install(scratch: Path) -> Path:
    """Install Haraka under ``scratch/haraka`` (once); return that folder."""
    home = scratch / "haraka"
    modules = home / "node_modules"
    wanted = ("Haraka", "haraka-plugin-headers", "haraka-plugin-spf", "haraka-plugin-dkim")
    if not all((modules / name / "package.json").exists() for name in wanted):
        home.mkdir(parents=True, exist_ok=True)
        if not (home / "package.json").exists():
            (home / "package.json").write_text('{"name": "mailgate-bench-haraka", "private": true}')
        subprocess.run(
            [
                "npm",
                "install",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                f"Haraka@{HARAKA_VERSION}",
                f"haraka-plugin-headers@{HEADERS_VERSION}",
                f"haraka-plugin-spf@{SPF_VERSION}",
                f"haraka-plugin-dkim@{DKIM_VERSION}",
            ],
            cwd=home,
            check=True,
            timeout=600,
            capture_output=True,
        )
    (home / "bench_preload.js").write_text(_PRELOAD)
    return home


def instance(
    home: Path,
    name: str,
    port: int,
    sink_port: int,
    *,
    nodes: int,
    headers: bool,
    full: bool = False,
) -> Path:
    """Write a Haraka config folder ``home/NAME`` and return it.

    ``full``: SPF, headers and DKIM verification, as mailgate's full policy.
    """
    folder = home / name
    config = folder / "config"
    (folder / "plugins").mkdir(parents=True, exist_ok=True)
    config.mkdir(exist_ok=True)
    (folder / "plugins" / "bench_rdns.js").write_text(_RDNS_PLUGIN)
    plugins = ["bench_rdns", "rcpt_to.in_host_list", *(["headers"] if headers else [])]
    if full:
        (folder / "plugins" / "bench_public.js").write_text(_PUBLIC_PLUGIN)
        (folder / "plugins" / "bench_verified.js").write_text(_VERIFIED_PLUGIN)
        plugins = ["bench_rdns", "bench_public", "spf", "rcpt_to.in_host_list", "headers"]
        plugins += ["dkim", "bench_verified"]
        (config / "dkim.ini").write_text("[sign]\nenabled=false\n\n[verify]\nenabled=true\n")
    (config / "plugins").write_text("\n".join([*plugins, "queue/smtp_forward", ""]))
    smtp = f"listen=127.0.0.1:{port}\n" + (f"nodes={nodes}\n" if nodes else "")
    (config / "smtp.ini").write_text(smtp)
    (config / "host_list").write_text("example.com\n")
    (config / "me").write_text("haraka.bench\n")
    (config / "smtp_forward.ini").write_text(f"host=127.0.0.1\nport={sink_port}\n")
    (config / "log.ini").write_text("[main]\nlevel=notice\ntimestamps=false\nformat=default\n")
    # Haraka reads connection.ini from the instance only (as `haraka -i` lays it out).
    shutil.copy(home / "node_modules" / "Haraka" / "config" / "connection.ini", config)
    return folder


def start(home: Path, folder: Path, log: Path, *, nodelay: bool, dns: str | None = None) -> Proc:
    """Start Haraka on the config folder; ``dns`` (HOST:PORT) is the server Node asks."""
    env = dict(os.environ)
    if dns:
        env["BENCH_DNS"] = dns
    env["NODE_OPTIONS"] = f"--expose-gc --require {home / 'bench_preload.js'}"
    env["BENCH_NODELAY"] = "1" if nodelay else "0"
    argv = ["node", str(home / "node_modules" / "Haraka" / "bin" / "haraka"), "-c", str(folder)]
    return Proc(folder.name, argv, log, env=env, cwd=str(folder))


def collect_garbage(proc: Proc) -> None:
    """Ask a Haraka process started by :func:`start` for a full GC (by PID)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGUSR2)
