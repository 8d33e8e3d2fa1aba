"""Haraka for the side-by-side runs: installed from npm into a scratch folder, never the repo.

``install(scratch)`` runs ``npm install Haraka`` (pinned) plus its ``headers``
plugin in ``SCRATCH/haraka``. ``instance(...)`` writes a Haraka config folder:
``rcpt_to.in_host_list`` (accept mail for example.com, like mailgate's relay
control) and ``queue/smtp_forward`` to the bench sink, optionally the
``headers`` plugin, ``nodes`` 0 (one process) or N (cluster), log level
``notice`` (one summary line per connection, like mailgate's decision line).

Two things are changed from stock, both in Haraka's favour, both documented in
bench/README.md:

- a 3-line ``bench_rdns`` plugin answers the ``lookup_rdns`` hook at once.
  Stock Haraka asks DNS for every client's PTR; mailgate does no rDNS, and the
  bench must not send DNS queries off the machine.
- a ``--require`` preload points Node's resolver at a closed loopback port, so
  any other lookup fails at once instead of leaving the machine; with
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

_PRELOAD = """\
const dns = require('node:dns')
dns.setServers(['127.0.0.1:9'])  // discard port: nothing listens, lookups fail locally
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


def available() -> str | None:
    """None when node and npm are installed; otherwise why Haraka cannot run."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not installed" if missing else None


def install(scratch: Path) -> Path:
    """Install Haraka under ``scratch/haraka`` (once); return that folder."""
    home = scratch / "haraka"
    marker = home / "node_modules" / "Haraka" / "package.json"
    if not marker.exists():
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
            ],
            cwd=home,
            check=True,
            timeout=600,
            capture_output=True,
        )
    (home / "bench_preload.js").write_text(_PRELOAD)
    return home


def instance(
    home: Path, name: str, port: int, sink_port: int, *, nodes: int, headers: bool
) -> Path:
    """Write a Haraka config folder ``home/NAME`` and return it."""
    folder = home / name
    config = folder / "config"
    (folder / "plugins").mkdir(parents=True, exist_ok=True)
    config.mkdir(exist_ok=True)
    (folder / "plugins" / "bench_rdns.js").write_text(_RDNS_PLUGIN)
    plugins = ["bench_rdns", "rcpt_to.in_host_list", *(["headers"] if headers else [])]
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


def start(home: Path, folder: Path, log: Path, *, nodelay: bool) -> Proc:
    """Start Haraka on the config folder."""
    env = dict(os.environ)
    env["NODE_OPTIONS"] = f"--expose-gc --require {home / 'bench_preload.js'}"
    env["BENCH_NODELAY"] = "1" if nodelay else "0"
    argv = ["node", str(home / "node_modules" / "Haraka" / "bin" / "haraka"), "-c", str(folder)]
    return Proc(folder.name, argv, log, env=env, cwd=str(folder))


def collect_garbage(proc: Proc) -> None:
    """Ask a Haraka process started by :func:`start` for a full GC (by PID)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGUSR2)
