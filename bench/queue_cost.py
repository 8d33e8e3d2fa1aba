"""What queue mode costs against in-line relaying: accept rate and end-to-end delivery.

Starts the bench sink (``bench.sink``) and two ``mailgate run`` processes on
free ports, both delivering to the sink: ``inline`` (lockstep relay) and
``queue`` (``delivery: queue``: every message written and fsynced to a spool,
file and folder, before the 250, then delivered by the workers). For each
round and configuration it reports the rate at which clients got their 250s,
and for queue mode also the time until the sink had every message (the
queue drained). The spool lives in a temporary folder under ``--spool-dir``
(default: the system's temp folder), so the figure includes that disk's fsync
cost. The sink's count is checked (nothing lost, nothing duplicated).

Run: ``python -m bench.queue_cost [--messages 2000] [--clients 8] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.driver import sink_count
from bench.procs import start_gateway_process, start_sink_process
from bench.ratelimit_cost import measure

ROOT = Path(__file__).resolve().parent.parent


def _gateway(
    workdir: Path, name: str, sink: int, queue: bool
) -> tuple[subprocess.Popen[bytes], int]:
    policy: dict[str, object] = {
        "hostname": "bench.test",
        "upstream": f"smtp://127.0.0.1:{sink}",
        "domains": ["example.com"],
        "log": {"level": "warning"},
    }
    if queue:
        policy["delivery"] = "queue"
        policy["queue"] = {"directory": str(workdir / "spool"), "concurrency": 8}
    return start_gateway_process(workdir, name, policy)


def _drained(sink: int, expected: int, timeout: float = 300) -> float:
    """Seconds until the sink has ``expected`` distinct messages."""
    started = time.perf_counter()
    while sink_count(sink).unique < expected:
        if time.perf_counter() - started > timeout:
            raise RuntimeError("the queue did not drain")
        time.sleep(0.02)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--spool-dir", default=None, help="where the spool folder is made")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mailgate-queuebench-", dir=args.spool_dir))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sink, sink_port = start_sink_process()
        procs.append(sink)
        gateways = {}
        for name in ("inline", "queue"):
            proc, port = _gateway(workdir, name, sink_port, queue=name == "queue")
            procs.append(proc)
            gateways[name] = port
        sent = 0
        for name, port in gateways.items():  # warm-up: imports, pools
            measure(port, args.clients * 20, args.clients, f"warm.{name}")
            sent += args.clients * 20
            _drained(sink_port, sent)
        accept: dict[str, list[float]] = {name: [] for name in gateways}
        end_to_end: list[float] = []
        for round_ in range(args.rounds):
            for name, port in gateways.items():
                started = time.perf_counter()
                accept[name].append(measure(port, args.messages, args.clients, f"r{round_}.{name}"))
                sent += args.messages // args.clients * args.clients
                _drained(sink_port, sent)
                if name == "queue":
                    end_to_end.append(args.messages / (time.perf_counter() - started))
        print(f"{args.messages} messages x {args.rounds} rounds, {args.clients} clients")
        for name, rates in accept.items():
            shown = " / ".join(f"{r:.0f}" for r in rates)
            print(f"  {name:7} 250s/s median {statistics.median(rates):6.0f}  ({shown})")
        shown = " / ".join(f"{r:.0f}" for r in end_to_end)
        print(f"  queue   delivered/s median {statistics.median(end_to_end):6.0f}  ({shown})")
        delivered = sink_count(sink_port).unique
        print(f"  sink: {delivered} distinct messages, {sent} sent")
        return 0 if delivered == sent else 1
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
