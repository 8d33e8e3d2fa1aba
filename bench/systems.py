"""The systems under test: the sink, mailgate (from bench/policies/*.yaml), the naive relay.

Haraka lives in ``bench/haraka.py``. Every system listens on 127.0.0.1 on a
port of its own and delivers into the one sink.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.procs import Proc, free_port, wait_banner

REPO = Path(__file__).resolve().parent.parent
POLICIES = Path(__file__).resolve().parent / "policies"


@dataclass
class System:
    """One thing the load is sent to."""

    key: str
    label: str
    port: int
    proc: Proc | None = None
    """None for the direct run (the load goes straight to the sink)."""
    processes: int = 1
    notes: list[str] = field(default_factory=list)
    verifies: bool = False
    """Checks SPF and DKIM: every message must reach the sink with dkim=pass and spf=pass."""


def start_sink(scratch: Path) -> tuple[Proc, int]:
    """Start the sink; return it and its port."""
    port = free_port()
    proc = Proc(
        "sink", [sys.executable, "-m", "bench.sink", str(port)], scratch / "sink.log", cwd=str(REPO)
    )
    wait_banner(port, proc)
    return proc, port


def available_plugins() -> set[str]:
    """Names of the plugins this build of mailgate ships."""
    from mailgate.registry import BUILTINS

    return set(BUILTINS)


def supports(key: str) -> bool:
    """True when this build's policy has the top-level key ``key``."""
    from mailgate.policy import Policy

    return key in Policy.model_fields


@dataclass
class ComposedPolicy:
    """A bench policy made runnable, and what had to be left out of it."""

    path: Path
    plugins: list[str]
    dropped: dict[str, str]
    """Plugin name -> why it is not in the run."""


def compose_policy(
    template: str,
    out: Path,
    *,
    port: int,
    sink_port: int,
    dns: str,
    workers: int,
    servers: dict[str, str] | None = None,
) -> ComposedPolicy:
    """Fill in ``bench/policies/TEMPLATE.yaml``; drop plugins this build lacks or rejects.

    ``servers`` gives the content-scanner plugins their daemon's address.
    """
    from mailgate.runtime import Runtime
    from mailgate.yamlsource import SourceError

    source = Path(template) if template.endswith(".yaml") else POLICIES / f"{template}.yaml"
    data: dict[str, Any] = yaml.safe_load(source.read_text())
    data["listen"] = [{"address": f"127.0.0.1:{port}"}]
    data["upstream"]["url"] = f"smtp://127.0.0.1:{sink_port}"
    data["dns"] = {"nameservers": [dns]}
    if workers > 1:
        data["workers"] = workers
    if "state" in data and not supports("state"):
        del data["state"]
    from mailgate.policy import Limits

    for key in [k for k in data.get("limits", {}) if k not in Limits.model_fields]:
        del data["limits"][key]  # a key this build does not have yet
    plugins: dict[str, Any] = data.get("plugins") or {}
    for name, address in (servers or {}).items():
        if name in plugins:
            plugins[name]["servers"] = [address]
    known = available_plugins()
    dropped = {name: "not in this build" for name in plugins if name not in known}
    for name in dropped:
        del plugins[name]
    for _attempt in range(len(plugins) + 1):
        out.write_text(yaml.safe_dump(data, sort_keys=False))
        try:
            Runtime.load(str(out))
        except SourceError as exc:
            bad = {
                name for name in plugins for message in exc.messages if f"plugins.{name}" in message
            }
            if not bad:
                raise
            for name in bad:
                dropped[name] = "its config was refused: " + "; ".join(
                    m for m in exc.messages if f"plugins.{name}" in m
                )
                del plugins[name]
            continue
        return ComposedPolicy(out, list(plugins), dropped)
    raise RuntimeError(f"could not make {template}.yaml valid")


def start_mailgate(scratch: Path, key: str, policy: Path, port: int) -> Proc:
    """Run ``mailgate run -c POLICY`` and wait for its banner."""
    argv = [sys.executable, "-m", "mailgate", "run", "-c", str(policy)]
    proc = Proc(key, argv, scratch / f"{key}.log", cwd=str(REPO))
    wait_banner(port, proc)
    return proc


def start_naive(scratch: Path, port: int, sink_port: int) -> Proc:
    """Run the naive relay and wait for its banner."""
    argv = [sys.executable, "-m", "bench.naive_relay", str(port), str(sink_port)]
    proc = Proc("naive", argv, scratch / "naive.log", cwd=str(REPO))
    wait_banner(port, proc)
    return proc


HAPROXY_CONFIG = """\
global
    nbthread 2
    maxconn 2000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend smtp
    bind 127.0.0.1:{port}
    default_backend sink
backend sink
    server sink 127.0.0.1:{sink_port}
"""


def haproxy_binary() -> str | None:
    """The path of ``haproxy`` (Debian puts it in /usr/sbin), or None."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def start_haproxy(scratch: Path, binary: str, port: int, sink_port: int) -> Proc:
    """HAProxy in TCP mode between the load and the sink, two threads; wait for the banner.

    It parses no SMTP and checks nothing: each client connection gets its own
    connection to the sink, and bytes are copied both ways. What a proxy
    written in C costs on this machine, the floor for any gateway in the path.
    """
    config = scratch / "haproxy-tcp.cfg"
    config.write_text(HAPROXY_CONFIG.format(port=port, sink_port=sink_port))
    proc = Proc("haproxy-tcp", [binary, "-f", str(config)], scratch / "haproxy-tcp.log")
    wait_banner(port, proc)
    return proc
