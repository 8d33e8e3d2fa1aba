"""``python -m bench``: mailgate against the ceiling, a naive relay and Haraka, in one run.

What one run does (all on 127.0.0.1; every process it starts is stopped by
PID at the end, whatever happens):

1. builds a 4 KB DKIM-signed message and serves its SPF/DKIM/DMARC records
   from a DNS server on loopback;
2. starts the sink, mailgate (default policy, workers 1 and 2; full policy;
   content policy, with private rspamd and clamd), the naive relay, HAProxy
   as a TCP pass-through (when installed: the floor for any proxy) and
   Haraka (nodes 0 and 2; Nagle as shipped and with TCP_NODELAY forced; with
   its ``headers`` plugin for the full comparison);
3. memory, before any load: RSS added by 1,000 idle connections;
4. throughput: for each system, ``--reps`` interleaved rounds of
   ``--messages`` messages from ``--concurrency`` parallel clients, one SMTP
   session per message, with 1 recipient and with 5; the same load straight
   to the sink gives the ceiling. Every run checks that the sink got exactly
   the messages sent; a run that lost or duplicated mail is INVALID;
5. latency: one sequential client, one session per message, taking the
   systems (and the sink directly) in turn; the difference from the direct
   run is the added latency;
6. memory: peak RSS while 20 messages of 10 MB arrive at once;
7. prints the results (markdown) and writes them, with the raw figures as
   JSON, to the scratch folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import driver, haraka, message, report, scanners, systems
from bench.procs import Proc, free_port, wait_banner
from bench.systems import System

WORKLOADS = {"1 rcpt": 1, "5 rcpt": 5}


@dataclass
class LoadRun:
    """One throughput run of one system."""

    system: str
    workload: str
    messages: int
    seconds: float
    rate: float | None
    """Messages per second; None when the run is INVALID."""
    cpu_ms: float | None
    """CPU milliseconds per message of the system's processes (None for direct)."""
    error: str | None = None
    machine: dict[str, float] = field(default_factory=dict)
    """Shares (%) of the machine's CPU time during the run: user, system, softirq, idle."""


@dataclass
class Results:
    """Everything one bench run measured."""

    machine: dict[str, str] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)
    systems: dict[str, dict[str, object]] = field(default_factory=dict)
    runs: list[LoadRun] = field(default_factory=list)
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    memory: dict[str, dict[str, object]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- load generation


class LoadGenerator:
    """Sends the throughput load with smtp-source, or with our asyncio driver."""

    def __init__(self, kind: str, message_file: Path, data: bytes, concurrency: int) -> None:
        self.kind = kind
        self.message_file = message_file
        self.data = data
        self.concurrency = concurrency

    def send(
        self, port: int, messages: int, rcpts: int, timeout: float
    ) -> tuple[float, str | None]:
        """Send the load; return elapsed seconds and an error (None when all went through)."""
        if self.kind == "smtp-source":
            argv = [
                "smtp-source", "-s", str(self.concurrency), "-m", str(messages),
                "-r", str(rcpts), "-N", "-F", str(self.message_file),
                "-f", message.SENDER, "-t", "rcpt@example.com", "-M", message.HELO,
                f"127.0.0.1:{port}",
            ]  # fmt: skip
            start = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                return time.perf_counter() - start, f"smtp-source still running after {timeout}s"
            elapsed = time.perf_counter() - start
            if proc.returncode != 0:
                return elapsed, err.decode(errors="replace").strip()[-300:] or "smtp-source failed"
            return elapsed, None
        elapsed, errors = asyncio.run(
            driver.throughput(
                port, messages, self.concurrency, rcpts, message.SENDER, self.data, timeout
            )
        )
        return elapsed, (f"{len(errors)} errors, first: {errors[0]}" if errors else None)


def settled_count(sink_port: int, expected: int, wait: float = 5.0) -> driver.SinkCount:
    """The sink's count, once it reaches ``expected`` (waiting ``wait`` seconds at most)."""
    deadline = time.monotonic() + wait
    count = driver.sink_count(sink_port)
    while count.messages < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        count = driver.sink_count(sink_port)
    return count


_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_ticks() -> dict[str, int]:
    """The machine's CPU time so far by kind (the ``cpu`` line of /proc/stat), in ticks."""
    with contextlib.suppress(OSError):
        with open("/proc/stat") as stat:
            values = stat.readline().split()[1:]
        return dict(zip(_STAT_FIELDS, map(int, values), strict=False))
    return {}


def machine_shares(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """user, system, softirq and idle as % of all the CPU time between two readings.

    The kernel's loopback TCP work done in softirq context is in no process's
    CPU time; this is where it shows.
    """
    spent = {k: after[k] - before[k] for k in before if k in after}
    total = sum(spent.values())
    if total <= 0:
        return {}
    kinds = {"user": ("user", "nice"), "system": ("system",), "softirq": ("softirq", "irq")}
    shares = {kind: 100 * sum(spent.get(k, 0) for k in ks) / total for kind, ks in kinds.items()}
    shares["idle"] = 100 * (spent.get("idle", 0) + spent.get("iowait", 0)) / total
    return shares


def load_run(
    system: System, workload: str, messages: int, gen: LoadGenerator, sink_port: int
) -> LoadRun:
    """One throughput run with the exactly-once check."""
    rcpts = WORKLOADS[workload]
    driver.sink_command(sink_port, "XRESET")
    cpu0 = system.proc.cpu_seconds() if system.proc else 0.0
    ticks = machine_ticks()
    seconds, error = gen.send(system.port, messages, rcpts, timeout=max(120.0, messages / 20))
    machine = machine_shares(ticks, machine_ticks())
    count = settled_count(sink_port, messages)
    cpu_ms = (system.proc.cpu_seconds() - cpu0) * 1000 / messages if system.proc else None
    unverified = None
    if system.verifies and count.verified != messages:
        unverified = f"dkim=pass and spf=pass on {count.verified} of {messages} messages"
    problem = "; ".join(p for p in (error, count.check(messages), unverified) if p) or None
    rate = None if problem else messages / seconds
    return LoadRun(system.key, workload, messages, seconds, rate, cpu_ms, problem, machine)


# ---------------------------------------------------------------- the run


@contextlib.contextmanager
def started(procs: list[Proc]) -> Iterator[None]:
    """Stop every process in ``procs`` (by PID) when the block ends, however it ends."""
    try:
        yield
    finally:
        for proc in reversed(procs):
            proc.stop()


def machine_info() -> dict[str, str]:
    """What the figures came from."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    node = ""
    if shutil.which("node"):
        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout
    versions = {}
    for dist in ("aiosmtpd", "aiosmtplib", "uvloop", "pluggy"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[dist] = version(dist)
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // 2**30} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node": node.strip() or "-",
        "libraries": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=1000, help="messages per throughput run")
    p.add_argument("--concurrency", type=int, default=20, help="parallel clients")
    p.add_argument("--reps", type=int, default=5, help="interleaved rounds; medians are quoted")
    p.add_argument(
        "--latency-messages", type=int, default=1000, help="per system, at most 30 s each"
    )
    p.add_argument("--idle", type=int, default=1000, help="idle connections for the RSS figure")
    p.add_argument("--big-count", type=int, default=20)
    p.add_argument("--big-mb", type=int, default=10)
    p.add_argument(
        "--big-rounds", type=int, default=2, help="rounds of big messages; the highest peak counts"
    )
    p.add_argument("--driver", choices=("auto", "smtp-source", "asyncio"), default="auto")
    p.add_argument("--no-haraka", action="store_true", help="skip the Haraka runs")
    p.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    p.add_argument(
        "--memory-only",
        action="store_true",
        help="only the peak RSS with concurrent big messages (no throughput, latency, idle)",
    )
    p.add_argument("--only", default="", help="comma-separated system keys to run (and direct)")
    p.add_argument(
        "--scratch",
        type=Path,
        default=Path("/tmp/mailgate-bench"),
        help="work folder (not the repo)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the harness works")
    args = p.parse_args(argv)
    if args.quick:
        args.messages, args.reps, args.latency_messages = 100, 1, 30
        args.idle, args.big_count, args.big_mb, args.big_rounds = 50, 2, 1, 1
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the bench; print and save the results."""
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    run_dir = args.scratch / time.strftime("run-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    results = Results(machine=machine_info())
    procs: list[Proc] = []
    dns = None
    started_at = time.monotonic()
    try:
        with started(procs):
            from tests.dnsserver import LoopbackDnsServer

            dns = LoopbackDnsServer()
            msg = message.build(args.scratch)
            for name, rtype, value in msg.dns_records:
                dns.add(name, rtype, value)
            kind = args.driver
            if kind == "auto":
                kind = "smtp-source" if shutil.which("smtp-source") else "asyncio"
            gen = LoadGenerator(
                kind, msg.write_lf_file(run_dir / "message.txt"), msg.data, args.concurrency
            )
            results.settings = {
                "load generator": kind,
                "concurrency": args.concurrency,
                "messages per run": args.messages,
                "rounds": args.reps,
                "message bytes": len(msg.data),
            }
            sink, sink_port = systems.start_sink(run_dir)
            procs.append(sink)
            sys_list = start_systems(args, run_dir, sink_port, dns.address, procs, results)
            print(f"started {len(sys_list)} systems", flush=True)
            if not (args.no_memory or args.memory_only):
                idle_memory(args, sys_list, results)
            if not args.memory_only:
                throughput(args, sys_list, gen, sink_port, results)
                latency(args, sys_list, msg.data, results)
            if not args.no_memory:
                big_memory(args, sys_list, sink_port, results)
    finally:
        if dns is not None:
            dns.stop()
    results.machine["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results.machine["bench wall time"] = f"{time.monotonic() - started_at:.0f} s"
    text = report.render(results)
    (run_dir / "results.md").write_text(text)
    (run_dir / "results.json").write_text(json.dumps(asdict(results), indent=2))
    print(text)
    print(f"\nwritten to {run_dir}/results.md and results.json")
    leftover = postfix_daemon()
    if leftover:
        print(f"NOTE: a postfix master daemon runs (pid {leftover}); the bench did not start it")
    return 0


def postfix_daemon() -> str:
    """The PID of a running Postfix master, if any (the bench only uses smtp-source)."""
    pids = subprocess.run(["pgrep", "-x", "master"], capture_output=True, text=True).stdout
    return " ".join(pids.split())


def start_systems(
    args: argparse.Namespace,
    run_dir: Path,
    sink_port: int,
    dns: str,
    procs: list[Proc],
    results: Results,
) -> list[System]:
    """Start every system under test; the list starts with the direct run."""
    only = {k for k in args.only.split(",") if k}
    wanted: Callable[[str], bool] = lambda key: not only or key in only  # noqa: E731
    out = [System("direct", "direct to the sink (ceiling)", sink_port)]
    mailgates = [("mg-default-w1", "default", 1), ("mg-full-w1", "full", 1)]
    if systems.supports("workers"):
        mailgates += [("mg-default-w2", "default", 2), ("mg-full-w2", "full", 2)]
    else:
        results.notes.append("mailgate workers: 2 not measured: this build has no `workers` key")
    servers: dict[str, str] = {}
    if wanted("mg-content-w1"):
        if scanners.missing():
            results.notes.append(
                f"mg-content-w1 not measured: {', '.join(scanners.missing())} not installed"
            )
        else:
            servers = scanners.start(args.scratch, run_dir, procs)
            mailgates.append(("mg-content-w1", "content", 1))
    for key, template, workers in mailgates:
        if not wanted(key):
            continue
        port = free_port()
        policy = systems.compose_policy(
            template, run_dir / f"{key}.yaml", port=port, sink_port=sink_port, dns=dns,
            workers=workers, servers=servers,
        )  # fmt: skip
        proc = systems.start_mailgate(run_dir, key, policy.path, port)
        procs.append(proc)
        label = f"mailgate {template} policy, workers {workers}"
        system = System(key, label, port, proc, processes=workers, verifies=template == "full")
        system.notes.append("plugins: " + (", ".join(policy.plugins) or "none (relay control)"))
        for name, why in policy.dropped.items():
            system.notes.append(f"not run: {name} ({why})")
        out.append(system)
    if wanted("naive"):
        port = free_port()
        procs.append(systems.start_naive(run_dir, port, sink_port))
        out.append(System("naive", "naive relay (aiosmtpd + aiosmtplib)", port, procs[-1]))
    if wanted("haproxy-tcp"):
        if (binary := systems.haproxy_binary()) is None:
            results.notes.append("HAProxy TCP pass-through not measured: haproxy is not installed")
        else:
            port = free_port()
            procs.append(systems.start_haproxy(run_dir, binary, port, sink_port))
            label = "HAProxy TCP pass-through, 2 threads (C, no SMTP: the floor)"
            out.append(System("haproxy-tcp", label, port, procs[-1]))
    why_not = haraka.available()
    if args.no_haraka:
        results.notes.append("Haraka not measured (--no-haraka)")
    elif why_not:
        results.notes.append(f"Haraka not measured: {why_not}")
    else:
        home = haraka.install(args.scratch)
        variants = [(0, "", False), (0, "-headers", False), (2, "", False)]
        variants += [(0, "-full", True), (2, "-full", True)]
        for nodes, kind, full in variants:
            for nodelay in (False, True):
                key = f"hk-n{nodes}{kind}{'-nodelay' if nodelay else ''}"
                if not wanted(key):
                    continue
                port = free_port()
                folder = haraka.instance(
                    home, key, port, sink_port, nodes=nodes, headers=kind == "-headers", full=full
                )
                proc = haraka.start(
                    home, folder, run_dir / f"{key}.log", nodelay=nodelay, dns=dns if full else None
                )
                procs.append(proc)
                wait_banner(port, proc, timeout=60)
                what = {"": "", "-headers": " + headers", "-full": " + spf, headers, dkim"}[kind]
                label = (
                    f"Haraka {haraka.HARAKA_VERSION} nodes {nodes}{what}, "
                    f"{'TCP_NODELAY forced' if nodelay else 'Nagle as shipped'}"
                )
                out.append(System(key, label, port, proc, processes=max(nodes, 1), verifies=full))
    for system in out:
        results.systems[system.key] = {
            "label": system.label,
            "processes": system.processes,
            "notes": system.notes,
        }
    return out


def throughput(
    args: argparse.Namespace,
    sys_list: list[System],
    gen: LoadGenerator,
    sink_port: int,
    results: Results,
) -> None:
    """Warm every system up, then run the interleaved rounds."""
    for system in sys_list:
        warm = load_run(system, "1 rcpt", min(200, args.messages), gen, sink_port)
        if warm.error:
            system.notes.append(f"warm-up failed: {warm.error}")
            print(f"  {system.key}: warm-up INVALID: {warm.error}", flush=True)
    for rep in range(args.reps):
        order = sys_list[rep % len(sys_list) :] + sys_list[: rep % len(sys_list)]
        for workload in WORKLOADS:
            for system in order:
                run = load_run(system, workload, args.messages, gen, sink_port)
                results.runs.append(run)
                shown = f"{run.rate:8.0f} msg/s" if run.rate else f"INVALID ({run.error})"
                cpu = f"  cpu {run.cpu_ms:.2f} ms/msg" if run.cpu_ms is not None else ""
                print(f"  round {rep + 1} {workload} {system.key:24} {shown}{cpu}", flush=True)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency(
    args: argparse.Namespace, sys_list: list[System], data: bytes, results: Results
) -> None:
    """One sequential client, one session per message, taking the systems in turn.

    Message n goes to every system before message n+1 goes to any, so a burst of
    other work on the machine hits them all alike. Each system gets up to
    ``--latency-messages`` messages and 10 s of its own time (Haraka with Nagle
    takes ~45 ms a message); the whole measurement stops after 90 s.
    """
    systems_ = [s for s in sys_list if not (s.key.startswith("hk-n2") or s.key.endswith("-w2"))]
    times: dict[str, list[float]] = {s.key: [] for s in systems_}
    active = []
    for system in systems_:
        try:
            driver.send_many(system.port, 20, message.SENDER, data, "w")
            active.append(system)
        except (OSError, driver.SmtpError) as exc:
            results.notes.append(f"latency of {system.key} not measured: {exc}")
    deadline = time.monotonic() + 90
    for n in range(args.latency_messages):
        active = [s for s in active if sum(times[s.key]) < 10.0]
        if not active or time.monotonic() > deadline:
            break
        for system in list(active):
            start = time.perf_counter()
            try:
                driver.send_one(system.port, message.SENDER, driver.recipients(n, 1, "l"), data)
            except (OSError, driver.SmtpError) as exc:
                results.notes.append(f"latency of {system.key} stopped: {exc}")
                active.remove(system)
                continue
            times[system.key].append(time.perf_counter() - start)
    direct = [t * 1000 for t in times.get("direct", [])]
    for system in systems_:
        ms = [t * 1000 for t in times[system.key]]
        if not ms:
            continue
        results.latency[system.key] = {
            "messages": len(ms),
            "mean": statistics.fmean(ms),
            "p50": _percentile(ms, 0.5),
            "p99": _percentile(ms, 0.99),
        }
        if system.key != "direct" and direct:
            # Message n went to both one after the other: the p99 of the differences,
            # not the difference of two p99s, one of which may be a burst of other work.
            added = [a - b for a, b in zip(ms, direct, strict=False)]
            results.latency[system.key]["added_p99_paired"] = _percentile(added, 0.99)
        print(f"  latency {system.key:24} p50 {_percentile(ms, 0.5):.2f} ms", flush=True)


def _memory_systems(sys_list: list[System]) -> list[System]:
    """The systems whose memory is measured: one process, no peer variant twice."""
    return [
        s
        for s in sys_list
        if s.proc is not None
        and s.processes == 1
        and "headers" not in s.key
        and s.key != "haproxy-tcp"
        and not (s.key.startswith("hk") and "-full" in s.key)
        and not (s.key.startswith("hk") and not s.key.endswith("nodelay"))  # Nagle: same RSS
    ]


def _settled_rss(proc: Proc, limit: float = 15.0) -> int:
    """RSS once it stops moving (a fresh Node heap shrinks for seconds after startup)."""
    deadline = time.monotonic() + limit
    rss = proc.rss_kb()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        rss, previous = proc.rss_kb(), rss
        if abs(rss - previous) < 256:
            break
    return rss


def idle_memory(args: argparse.Namespace, sys_list: list[System], results: Results) -> None:
    """RSS added per idle connection, measured before any load (a fresh heap, no garbage)."""
    for system in _memory_systems(sys_list):
        assert system.proc is not None
        entry = results.memory.setdefault(system.key, {})
        gc = system.key.startswith("hk")  # Node: collect garbage first, or RSS wanders
        if gc:
            haraka.collect_garbage(system.proc)
        base = _settled_rss(system.proc)
        try:
            socks = driver.hold_idle(system.port, args.idle)
        except (OSError, driver.SmtpError) as exc:
            entry["idle_error"] = str(exc)
            continue
        if gc:
            haraka.collect_garbage(system.proc)
        with_idle = _settled_rss(system.proc)
        driver.close_all(socks)
        entry.update(
            baseline_kb=base, idle_kb=with_idle, per_idle_kb=(with_idle - base) / args.idle
        )
        print(f"  idle {system.key:24} {entry['per_idle_kb']:.1f} KiB/connection", flush=True)


def big_memory(
    args: argparse.Namespace, sys_list: list[System], sink_port: int, results: Results
) -> None:
    """Peak RSS while ``--big-count`` messages of ``--big-mb`` MB arrive at once.

    Bytes in flight are the messages' bytes together (count x size): the peak
    RSS over them is the figure the target (<= 1.3) is set for. The load is
    sent ``--big-rounds`` times (a second round shows what a process that has
    already freed big buffers does) and the highest peak counts.
    """
    big = message.big(args.big_mb * 1_000_000)
    in_flight = args.big_count * len(big)
    results.settings["big messages"] = (
        f"{args.big_count} x {len(big)} bytes at once, {args.big_rounds} round(s)"
    )
    for system in _memory_systems(sys_list):
        assert system.proc is not None
        entry = results.memory.setdefault(system.key, {})
        entry["big_before_kb"] = system.proc.rss_kb()
        peaks: list[int] = []
        problems: list[str] = []
        for round_ in range(args.big_rounds):
            driver.sink_command(sink_port, "XRESET")
            system.proc.reset_peak()
            tag = f"big{round_}"
            errors = driver.parallel_big(system.port, args.big_count, message.SENDER, big, tag)
            count = settled_count(sink_port, args.big_count)
            peaks.append(system.proc.peak_kb())
            problems += errors[:3] or [p for p in [count.check(args.big_count)] if p]
        entry["big_peaks_kb"] = peaks
        entry["big_peak_kb"] = peak = max(peaks)
        entry["big_in_flight_bytes"] = in_flight
        entry["big_ratio"] = peak * 1024 / in_flight
        entry["big_error"] = "; ".join(problems[:3]) or None
        rounds = ", ".join(f"{p * 1024 / in_flight:.2f}" for p in peaks)
        print(
            f"  big {system.key:24} peak {peak} KiB, {entry['big_ratio']:.2f}x bytes in flight"
            f" (rounds: {rounds})",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
