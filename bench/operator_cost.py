"""What the operator tools cost: metrics per transaction, a reload, a dry run.

1. Observer cost: the events one delivered transaction reports (session
   open/close, five stages with a verdict each, three upstream replies, the
   transaction's end), fed to the runtime's fan-out with the Prometheus
   ``Metrics`` subscribed and with nothing subscribed. Microseconds per
   transaction, median of ``--rounds``.
2. Reload: ``mailgate run`` on the default policy (loopback port, Maildir in
   a temporary folder); time from ``kill -HUP`` to the ``policy reloaded``
   line in its JSON log, ``--reloads`` times, median and maximum.
3. Dry runs: wall time of ``mailgate test --cases`` over every shipped
   ``policies/**/*.cases.yaml`` (one process: start-up included), and the
   time per case.
4. End to end: messages per second through ``mailgate run`` (in-line relay to
   ``bench.sink``, the clients of ``bench.ratelimit_cost``) without and with
   ``metrics:``, interleaved, ``--rounds`` times, median; the sink's count is
   checked.

Run: ``python -m bench.operator_cost [--rounds 5] [--reloads 10] [--messages 3000]``
"""

from __future__ import annotations

import argparse
import glob
import ipaddress
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

from bench.driver import sink_count
from bench.procs import free_port, start_gateway_process, start_sink_process
from bench.ratelimit_cost import measure
from mailgate.context import Envelope, Session, VerdictRecord
from mailgate.metrics import Metrics
from mailgate.observer import Observers
from mailgate.stages import StageOutcome
from mailgate.verdict import Reply

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("on_connect", "on_helo", "on_mail", "on_rcpt", "on_data")


def observer_cost(subscribe: bool, transactions: int) -> float:
    """Microseconds of observer work per transaction."""
    fan_out = Observers()
    if subscribe:
        fan_out.add(Metrics())
    session = Session("s", ipaddress.ip_address("192.0.2.1"), 1, "mx.test")
    envelope = Envelope("s.1", "a@example.net")
    ok = Reply(250, "Ok", "2.0.0")
    outcomes = {
        stage: StageOutcome(
            records=[VerdictRecord("p", stage, f"p.{stage}", "tag", "r", True, 1.0)]
        )
        for stage in STAGES
    }
    started = time.perf_counter()
    for _ in range(transactions):
        fan_out.session_opened(session)
        for stage in STAGES:
            fan_out.stage_done(stage, outcomes[stage], 0.001)
        for command in ("mail", "rcpt", "data"):
            fan_out.upstream_replied(command, ok, 0.002)
        fan_out.transaction_done(session, envelope, "data", ok)
        fan_out.session_closed(session)
    return (time.perf_counter() - started) / transactions * 1e6


def reload_latency(reloads: int) -> list[float]:
    """Seconds from SIGHUP to the ``policy reloaded`` log line, per reload."""
    with tempfile.TemporaryDirectory() as tmp:
        policy = yaml.safe_load((ROOT / "policies" / "default.yaml").read_text())
        policy["listen"] = [{"address": f"127.0.0.1:{free_port()}"}]
        policy["upstream"] = f"maildir:{tmp}/mail"
        policy["log"] = {"format": "json"}
        path = Path(tmp) / "policy.yaml"
        path.write_text(yaml.safe_dump(policy))
        log_path = Path(tmp) / "log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mailgate", "run", "-c", str(path)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_for(log_path, "mailgate ready on", 1)
            latencies = []
            for n in range(1, reloads + 1):
                sent = time.time()
                os.kill(proc.pid, signal.SIGHUP)
                line = _wait_for(log_path, "policy reloaded", n)
                latencies.append(datetime.fromisoformat(json.loads(line)["ts"]).timestamp() - sent)
            return latencies
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def _wait_for(log_path: Path, text: str, count: int, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in log_path.read_text().splitlines() if text in line]
        if len(lines) >= count:
            return lines[count - 1]
        time.sleep(0.005)
    raise RuntimeError(f"{text!r} not logged within {timeout}s")


def dry_runs() -> tuple[int, float]:
    """(cases, seconds) for ``mailgate test --cases`` over the shipped cases."""
    files = sorted(glob.glob(str(ROOT / "policies" / "**" / "*.cases.yaml"), recursive=True))
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mailgate", "test", "--cases", *files, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    elapsed = time.perf_counter() - started
    report = json.loads(result.stdout)
    return report["passed"] + report["failed"], elapsed


def end_to_end(messages: int, clients: int, rounds: int) -> dict[str, list[float]]:
    """Messages per second without and with ``metrics:``, per round."""
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sink, sink_port = start_sink_process()
            procs.append(sink)
            ports = {}
            for name, extra in (("no metrics", {}), ("metrics", {"metrics": "127.0.0.1:0"})):
                policy = {
                    "hostname": "bench.test",
                    "upstream": f"smtp://127.0.0.1:{sink_port}",
                    "domains": ["example.com"],
                    "log": {"level": "warning"},
                    **extra,
                }
                proc, port = start_gateway_process(Path(tmp), name.replace(" ", "_"), policy)
                procs.append(proc)
                ports[name] = port
            sent = 0
            for port in ports.values():  # warm-up: imports, the upstream pool
                measure(port, clients * 20, clients, f"w.{port}")
                sent += clients * 20
            rates: dict[str, list[float]] = {name: [] for name in ports}
            for round_ in range(rounds):
                for name, port in ports.items():
                    rates[name].append(measure(port, messages, clients, f"r{round_}.{port}"))
                    sent += messages // clients * clients
            delivered = sink_count(sink_port).unique
            if delivered != sent:
                raise RuntimeError(f"sink got {delivered} distinct messages, {sent} were sent")
            return rates
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(15)


def main() -> None:
    """Print the three measurements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--transactions", type=int, default=20000)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    for label, subscribe in (("nothing subscribed", False), ("Metrics subscribed", True)):
        runs = [observer_cost(subscribe, args.transactions) for _ in range(args.rounds)]
        print(
            f"observer, {label}: {statistics.median(runs):.1f} us/transaction "
            f"(runs: {' '.join(f'{r:.1f}' for r in runs)})"
        )
    ms = [latency * 1000 for latency in reload_latency(args.reloads)]
    print(
        f"reload (SIGHUP to 'policy reloaded'): median {statistics.median(ms):.0f} ms, "
        f"max {max(ms):.0f} ms over {len(ms)}"
    )
    cases, seconds = dry_runs()
    print(
        f"mailgate test --cases: {cases} cases in {seconds:.2f} s "
        f"({seconds / cases * 1000:.0f} ms per case, process start-up included)"
    )
    rates = end_to_end(args.messages, args.clients, args.rounds)
    base = statistics.median(rates["no metrics"])
    for name, values in rates.items():
        runs = " ".join(f"{v:.0f}" for v in values)
        median = statistics.median(values)
        print(f"end to end, {name}: {median:.0f} msgs/s (runs: {runs}), ratio {median / base:.2f}")


if __name__ == "__main__":
    main()
