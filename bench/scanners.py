"""The content scanners of the bench's content row: private rspamd and clamd on loopback.

They are configured as the tests configure them (``tests/scanners.py``: no
network modules, DNS at a dead port, one clamd signature) and run as bench
:class:`~bench.procs.Proc` processes, so they are stopped by PID with
everything else. rspamd's folder is kept in the scratch folder between bench
runs, so only the first run pays its ~9 s cold start.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from bench.procs import Proc
from tests.scanners import clamd_setup, rspamd_setup

BINARIES = {"rspamd": "rspamd", "clamav": "clamd"}


def missing() -> list[str]:
    """The scanner daemons this machine lacks."""
    found = [b for b in BINARIES.values() if shutil.which(b) or Path(f"/usr/sbin/{b}").exists()]
    return [b for b in BINARIES.values() if b not in found]


def start(scratch: Path, run_dir: Path, procs: list[Proc]) -> dict[str, str]:
    """Start rspamd and clamd (appended to ``procs``); return plugin name -> address."""
    servers: dict[str, str] = {}
    for plugin, setup in (
        ("rspamd", rspamd_setup(scratch / "scanners" / "rspamd")),
        ("clamav", clamd_setup(scratch / "scanners" / "clamd")),
    ):
        proc = Proc(setup.name, setup.argv, run_dir / f"{setup.name}.log")
        procs.append(proc)
        deadline = time.monotonic() + 60
        while not setup.ready():
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{setup.name} did not start: see {setup.log}")
            time.sleep(0.05)
        servers[plugin] = f"127.0.0.1:{setup.port}"
    return servers
