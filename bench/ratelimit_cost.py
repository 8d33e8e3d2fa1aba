"""What one ratelimit rule costs: messages per second with no rule, on memory, on Redis.

Starts the bench sink (``bench.sink``), a redis-server on a free loopback port
(without persistence) and, for each configuration, ``mailgate run`` on a
free port. Clients are threads in this process, each on its own reused
connection, sending small messages as fast as the gateway answers. The rule
(``{key: client_ip, rate: 1000000/1s}``) is never over its limit, so every
message pays for one check and is delivered; every client shares one client
IP, so every check hits the same bucket (the worst case for contention).

Configurations run interleaved, ``--rounds`` times; the median of each is
reported, with its ratio to "no rule". Every run is bounded in messages and in
time, and the sink's count is checked (nothing lost, nothing duplicated).

Run: ``python -m bench.ratelimit_cost [--messages 3000] [--clients 8] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.driver import sink_count
from bench.procs import free_port, start_gateway_process, start_sink_process, wait_port

ROOT = Path(__file__).resolve().parent.parent
BODY = b"From: a@example.net\r\nTo: b@example.com\r\nSubject: bench\r\n\r\nhello\r\n"
RUN_TIMEOUT = 300.0


class Client:
    """A minimal blocking SMTP client on one reused connection."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")
        self._reply()
        self._cmd(b"EHLO bench.example\r\n")

    def _reply(self) -> int:
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError("connection closed")
            if line[3:4] != b"-":
                return int(line[:3])

    def _cmd(self, data: bytes, expect: int = 250) -> None:
        self.sock.sendall(data)
        code = self._reply()
        if code != expect:
            raise RuntimeError(f"{data[:20]!r}: {code}")

    def send(self, rcpt: str) -> None:
        self._cmd(b"MAIL FROM:<a@example.net>\r\n")
        self._cmd(f"RCPT TO:<{rcpt}>\r\n".encode())
        self._cmd(b"DATA\r\n", 354)
        self._cmd(BODY + b".\r\n")

    def close(self) -> None:
        self.sock.sendall(b"QUIT\r\n")
        self.sock.close()


def measure(port: int, messages: int, clients: int, tag: str) -> float:
    """Send ``messages`` over ``clients`` connections; return messages per second."""
    per_client = messages // clients
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            client = Client(port)
            for n in range(per_client):
                client.send(f"{tag}.{index}.{n}@example.com")
            client.close()
        except BaseException as exc:  # reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(RUN_TIMEOUT)
    elapsed = time.perf_counter() - started
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"run {tag} failed: {errors[:3]}")
    return per_client * clients / elapsed


def run_gateway(
    workdir: Path, name: str, sink: int, state: str, rule: bool
) -> tuple[subprocess.Popen[bytes], int]:
    """A gateway relaying to ``sink`` with ``state``, with or without one ratelimit rule."""
    policy: dict[str, object] = {
        "hostname": "bench.test",
        "upstream": f"smtp://127.0.0.1:{sink}",
        "domains": ["example.com"],
        "state": state,
        "log": {"level": "warning"},
        "plugins": {"ratelimit": {"rules": [{"key": "client_ip", "rate": "1000000/1s"}]}}
        if rule
        else {},
    }
    return start_gateway_process(workdir, name, policy)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    redis_binary = shutil.which("redis-server")
    if redis_binary is None:
        print("redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="mailgate-rlbench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sink, sink_port = start_sink_process()
        procs.append(sink)
        redis_port = free_port()
        procs.append(
            subprocess.Popen(
                [redis_binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(workdir)],
                stdout=subprocess.DEVNULL,
            )
        )  # fmt: skip
        wait_port(redis_port)
        configs = {
            "no rule": ("memory", False),
            "memory": ("memory", True),
            "redis": (f"redis://127.0.0.1:{redis_port}/0", True),
        }
        gateways = {}
        for name, (state, rule) in configs.items():
            proc, port = run_gateway(workdir, name.replace(" ", "_"), sink_port, state, rule)
            procs.append(proc)
            gateways[name] = port
        rates: dict[str, list[float]] = {name: [] for name in configs}
        for name, port in gateways.items():  # warm-up: imports, pools, script cache
            measure(port, args.clients * 20, args.clients, f"warm.{name.replace(' ', '_')}")
        sent = sum(args.clients * 20 for _ in gateways)
        for round_ in range(args.rounds):
            for name, port in gateways.items():
                tag = f"r{round_}.{name.replace(' ', '_')}"
                rates[name].append(measure(port, args.messages, args.clients, tag))
                sent += args.messages // args.clients * args.clients
        delivered = sink_count(sink_port).unique
        if delivered != sent:
            print(f"sink got {delivered} distinct messages, {sent} were sent", file=sys.stderr)
            return 1
        base = statistics.median(rates["no rule"])
        print(f"{args.messages} messages x {args.rounds} rounds, {args.clients} clients; "
              f"all {sent} delivered")  # fmt: skip
        print(f"{'config':<10} {'msgs/s (median)':>16} {'runs':>28} {'ratio':>7}")
        for name, values in rates.items():
            median = statistics.median(values)
            runs = " ".join(f"{v:.0f}" for v in values)
            print(f"{name:<10} {median:>16.0f} {runs:>28} {median / base:>7.2f}")
        return 0
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
