"""What SPF + DKIM + DMARC cost per message: gateway CPU with the plugins on, against off.

Starts a DNS server on loopback (``tests.dnsserver``) serving the sender's SPF
record, DKIM key and DMARC policy, the bench sink (``bench.sink``) and two
``mailgate run`` processes on free ports: ``off`` (no plugin) and ``auth``
(``spf``, ``dkim``, ``dmarc`` with ``enforce: true``). Both relay in-line to
the sink. The messages are DKIM-signed (RSA-2048, relaxed/relaxed) at about
10 KB and 100 KB; every one passes SPF, DKIM and DMARC and is delivered.

A warm-up round fills the gateway's DNS cache (the records have a 300 s TTL),
so the measured rounds look up nothing: the figure is the plugins' own cost
(pyspf in its thread pool, dkimpy verification, DMARC alignment,
Authentication-Results). The measure is the gateway process's CPU time
(user + system, from /proc) per message, which does not depend on how fast
the clients and the sink are; messages per second are printed as well.
Configurations run interleaved, ``--rounds`` times; medians are reported.
The sink's count is checked (nothing lost or duplicated).

Run: ``python -m bench.auth_cost [--messages 600] [--clients 4] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from bench.driver import sink_count
from bench.procs import Proc, free_port, wait_banner
from bench.ratelimit_cost import Client
from tests.authsupport import make_message, publish, rsa_key, sign
from tests.dnsserver import LoopbackDnsServer

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 300.0
SENDER = "alice@example.net"
AUTH_PLUGINS = {"spf": {}, "dkim": {}, "dmarc": {"enforce": True}}


class SignedClient(Client):
    """The rate-limit bench's client, sending a given message from SENDER."""

    def send_message(self, rcpt: str, message: bytes) -> None:
        """One transaction; ``message`` is already dot-stuffed and CRLF-terminated."""
        self._cmd(f"MAIL FROM:<{SENDER}>\r\n".encode())
        self._cmd(f"RCPT TO:<{rcpt}>\r\n".encode())
        self._cmd(b"DATA\r\n", 354)
        self._cmd(message + b".\r\n")


def measure(
    proc: Proc, port: int, message: bytes, count: int, clients: int, tag: str
) -> tuple[float, float]:
    """Send ``count`` messages over ``clients`` connections: (CPU ms per message, msgs/s)."""
    per_client = count // clients
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            client = SignedClient(port)
            for n in range(per_client):
                client.send_message(f"{tag}.{index}.{n}@example.com", message)
            client.close()
        except BaseException as exc:  # reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    cpu_before, started = proc.cpu_seconds(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(RUN_TIMEOUT)
    elapsed, cpu = time.perf_counter() - started, proc.cpu_seconds() - cpu_before
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"run {tag} failed: {errors[:3]}\n{proc.log_tail()}")
    sent = per_client * clients
    return cpu * 1000 / sent, sent / elapsed


def start_gateway(
    workdir: Path, name: str, sink: int, dns: str, plugins: dict[str, object]
) -> tuple[Proc, int]:
    """``mailgate run`` with ``plugins``, relaying to the sink, resolving through ``dns``."""
    port = free_port()
    policy = {
        "hostname": "bench.test",
        "listen": [{"address": f"127.0.0.1:{port}"}],
        "upstream": f"smtp://127.0.0.1:{sink}",
        "domains": ["example.com"],
        "dns": {"nameservers": [dns], "timeout": "3s"},
        "limits": {"message_size": "1MB"},
        "log": {"level": "warning"},
        "plugins": plugins,
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(policy))
    argv = [sys.executable, "-m", "mailgate", "run", "-c", str(path)]
    proc = Proc(name, argv, workdir / f"{name}.log", cwd=str(ROOT))
    wait_banner(port, proc)
    return proc, port


def signed_message(size: int) -> bytes:
    """A DKIM-signed message of about ``size`` bytes, dot-stuffed for DATA."""
    raw = sign(make_message(SENDER, size=size), "example.net")
    return raw.replace(b"\r\n.", b"\r\n..")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=600, help="per size, config and round")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mailgate-authbench-"))
    dns = LoopbackDnsServer()
    dns.add("example.net", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    dns.add("_dmarc.example.net", "TXT", "v=DMARC1; p=reject")
    publish(dns, "example.net", "sel", rsa_key())
    messages = {"10KB": signed_message(10_000), "100KB": signed_message(100_000)}
    procs: list[Proc] = []
    try:
        sink = Proc(
            "sink", [sys.executable, "-m", "bench.sink", "0"], workdir / "sink.log", cwd=str(ROOT)
        )
        procs.append(sink)
        sink_port = _sink_port(sink)
        gateways: dict[str, tuple[Proc, int]] = {}
        for name, plugins in (("off", {}), ("auth", AUTH_PLUGINS)):
            gateways[name] = start_gateway(workdir, name, sink_port, dns.address, plugins)
            procs.append(gateways[name][0])
        sent = 0
        for size, message in messages.items():  # warm-up: imports, pools, DNS cache
            for name, (proc, port) in gateways.items():
                measure(proc, port, message, args.clients * 10, args.clients, f"warm.{size}.{name}")
                sent += args.clients * 10
        queries_before = len(dns.queries)
        cpu: dict[tuple[str, str], list[float]] = {}
        rate: dict[tuple[str, str], list[float]] = {}
        for round_ in range(args.rounds):
            for size, message in messages.items():
                for name, (proc, port) in gateways.items():
                    ms, per_s = measure(
                        proc, port, message, args.messages, args.clients, f"r{round_}.{size}.{name}"
                    )
                    cpu.setdefault((size, name), []).append(ms)
                    rate.setdefault((size, name), []).append(per_s)
                    sent += args.messages // args.clients * args.clients
        delivered = sink_count(sink_port).unique
        if delivered != sent:
            print(f"sink got {delivered} distinct messages, {sent} were sent", file=sys.stderr)
            return 1
        lookups = len(dns.queries) - queries_before
        print(f"{args.messages} messages x {args.rounds} rounds per size and config, "
              f"{args.clients} clients; all {sent} delivered; "
              f"DNS queries during the measured rounds: {lookups}")  # fmt: skip
        print(f"{'message':<8} {'config':<6} {'CPU ms/msg':>11} {'runs':>20} "
              f"{'msgs/s':>8} {'CPU ratio':>10}")  # fmt: skip
        for size in messages:
            base = statistics.median(cpu[(size, "off")])
            for name in gateways:
                values = cpu[(size, name)]
                runs = " ".join(f"{v:.2f}" for v in values)
                median = statistics.median(values)
                per_s = statistics.median(rate[(size, name)])
                print(f"{size:<8} {name:<6} {median:>11.2f} {runs:>20} "
                      f"{per_s:>8.0f} {median / base:>10.2f}")  # fmt: skip
        return 0
    finally:
        for proc in reversed(procs):
            proc.stop()
        dns.stop()


def _sink_port(sink: Proc) -> int:
    """The port the sink printed (``listening PORT``) in its log."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in sink.log_path.read_text().splitlines():
            if line.startswith("listening "):
                return int(line.split()[1])
        time.sleep(0.05)
    raise RuntimeError(f"the sink did not start:\n{sink.log_tail()}")


if __name__ == "__main__":
    sys.exit(main())
