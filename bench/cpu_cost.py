"""CPU per message of ``mailgate run`` on a bench policy, in short runs (and a profile).

A small sibling of ``python -m bench`` for a busy machine: it starts the
loopback DNS server with the bench message's records, the sink and one
``mailgate run`` per policy named, warms each up, then sends ``--messages``
messages with smtp-source (20 clients, one session per message), ``--rounds``
times, policies interleaved, and prints the gateway's CPU milliseconds per
message (user + system from /proc, the whole process tree) and messages per
second. CPU per message hardly moves with other load on the machine, which
is why this exists. With ``--profile FILE`` the last round of the first
policy runs under ``py-spy record`` (needs py-spy: ``pip install -e
'.[bench]'``) and writes a speedscope or flamegraph file.

A policy is a name in ``bench/policies`` or a path to a YAML file (ending
in ``.yaml``) of the same form.

With ``--baseline DIR`` (another checkout of mailgate, such as ``git worktree
add /tmp/before main``, or a folder holding an importable ``mailgate``
package) each policy also runs on a second gateway made of
DIR's code (``POLICY@base``), started beside this tree's with the same load,
rounds interleaved and their order alternated, and the paired difference of
each round is printed: the way to compare two versions on a shared machine,
where CPU per message drifts with the other load by more than most changes.

Run: ``python -m bench.cpu_cost [--policies default,full] [--messages 2000] [--rounds 3]
[--rcpts "5 rcpt"] [--baseline DIR]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import driver, message, systems
from bench.procs import Proc, _stat_cpu, free_port, wait_banner
from bench.run import LoadGenerator, load_run
from bench.systems import System


def baseline_path(checkout: Path, scratch: Path) -> str:
    """A ``PYTHONPATH`` entry that imports ``mailgate`` from ``checkout``'s files.

    The package is laid out as setuptools installs it (``gateway/`` is
    ``mailgate``, ``plugins/`` is ``mailgate.plugins``), in symbolic links
    under ``scratch``; ``checkout`` itself is not touched. A folder that holds
    an importable ``mailgate/`` already (a copy of the package compiled with
    mypyc, say, with its shared library beside it) is used as it is.
    """
    if (checkout / "mailgate" / "__init__.py").is_file():
        package = checkout / "mailgate"
    else:
        package = scratch / "baseline" / "mailgate"
        package.mkdir(parents=True)
        for entry in (checkout / "gateway").iterdir():
            if entry.name not in ("__pycache__", "plugins"):
                (package / entry.name).symlink_to(entry.resolve())
        (package / "plugins").symlink_to((checkout / "plugins").resolve())
    probe = subprocess.run(
        [sys.executable, "-c", "import mailgate.plugins; print(mailgate.plugins.__file__)"],
        env={**os.environ, "PYTHONPATH": str(package.parent)}, capture_output=True, text=True,
        check=True, cwd=str(scratch),
    )  # fmt: skip
    if not probe.stdout.startswith(str(package)):  # the installed mailgate would win
        raise RuntimeError(f"the baseline imports from {probe.stdout.strip()}, not {package}")
    return str(package.parent)


def start_baseline(scratch: Path, key: str, policy: Path, port: int, path: str) -> Proc:
    """``mailgate run -c POLICY`` with ``mailgate`` imported from ``path`` (see baseline_path)."""
    env = {**os.environ, "PYTHONPATH": path}
    argv = [sys.executable, "-m", "mailgate", "run", "-c", str(policy)]
    proc = Proc(key, argv, scratch / f"{key}.log", env=env, cwd=str(scratch))
    wait_banner(port, proc)
    return proc


def main(argv: list[str] | None = None) -> int:
    """Print CPU ms per message and msgs/s for each policy."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policies", default="default,full")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rcpts", choices=("1 rcpt", "5 rcpt"), default="1 rcpt")
    p.add_argument("--profile", type=Path, default=None, help="py-spy output file")
    p.add_argument(
        "--baseline", type=Path, default=None, help="another checkout, or a mailgate package folder"
    )
    args = p.parse_args(argv)
    if args.baseline is not None and not any(
        (args.baseline / name / "__init__.py").is_file() for name in ("gateway", "mailgate")
    ):
        print(
            f"{args.baseline}: neither a mailgate checkout (gateway/__init__.py) nor a folder "
            "holding the mailgate package (mailgate/__init__.py)",
            file=sys.stderr,
        )
        return 2
    if not shutil.which("smtp-source"):
        print("smtp-source is needed (bench/install-postfix-tools)", file=sys.stderr)
        return 2
    from tests.dnsserver import LoopbackDnsServer

    procs: list[Proc] = []
    dns = LoopbackDnsServer()
    try:
        with tempfile.TemporaryDirectory(prefix="mailgate-cpu-") as tmp:
            folder = Path(tmp)
            msg = message.build(folder)
            for name, rtype, value in msg.dns_records:
                dns.add(name, rtype, value)
            gen = LoadGenerator("smtp-source", msg.write_lf_file(folder / "m.txt"), msg.data, 20)
            sink, sink_port = systems.start_sink(folder)
            procs.append(sink)
            targets = []
            base = None if args.baseline is None else baseline_path(args.baseline, folder)
            for template in args.policies.split(","):
                for suffix in ("", "@base") if base else ("",):
                    port, key = free_port(), Path(template).stem + suffix
                    policy = systems.compose_policy(
                        template, folder / f"{key}.yaml", port=port, sink_port=sink_port,
                        dns=dns.address, workers=args.workers,
                    )  # fmt: skip
                    if suffix:
                        assert base is not None
                        proc = start_baseline(folder, key, policy.path, port, base)
                    else:
                        proc = systems.start_mailgate(folder, key, policy.path, port)
                    procs.append(proc)
                    targets.append(System(key, key, port, proc))
            for system in targets:
                warm = load_run(system, "1 rcpt", 300, gen, sink_port)
                if warm.error:
                    print(f"{system.key}: warm-up INVALID: {warm.error}")
                    return 1
            cpu: dict[str, list[float]] = {s.key: [] for s in targets}
            rate: dict[str, list[float]] = {s.key: [] for s in targets}
            for rnd in range(args.rounds):
                for system in targets if rnd % 2 == 0 else targets[::-1]:
                    spy = None
                    if args.profile and rnd == args.rounds - 1 and system is targets[0]:
                        assert system.proc is not None
                        fmt = {".json": "speedscope", ".svg": "flamegraph"}
                        spy = subprocess.Popen(
                            ["py-spy", "record", "-r", "200", "-s", "-o", str(args.profile),
                             "-f", fmt.get(args.profile.suffix, "raw"),
                             "-p", str(system.proc.pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        )  # fmt: skip
                        time.sleep(1.0)
                    assert system.proc is not None
                    before = {pid: _stat_cpu(pid) for pid in system.proc.tree()}
                    run = load_run(system, args.rcpts, args.messages, gen, sink_port)
                    split = sorted(
                        (_stat_cpu(pid) - before.get(pid, 0.0)) * 1000 / args.messages
                        for pid in system.proc.tree()
                    )
                    if spy is not None:
                        spy.send_signal(2)
                        spy.wait(30)
                    if run.error or run.rate is None or run.cpu_ms is None:
                        print(f"{system.key}: INVALID: {run.error}")
                        return 1
                    cpu[system.key].append(run.cpu_ms)
                    rate[system.key].append(run.rate)
                    shares = " + ".join(f"{c:.3f}" for c in split if c >= 0.001)
                    print(f"  round {rnd + 1} {system.key:10} {run.rate:6.0f} msg/s "
                          f"{run.cpu_ms:.3f} ms/msg ({shares} by process)", flush=True)  # fmt: skip
            count = driver.sink_count(sink_port)
            print(f"\nsink: {count.messages} messages in the last run")
            print("| policy | CPU ms/msg (median) | runs | msg/s (median) |")
            print("|---|---|---|---|")
            for key in cpu:
                runs = " ".join(f"{c:.2f}" for c in cpu[key])
                print(f"| {key} | {statistics.median(cpu[key]):.2f} | {runs} | "
                      f"{statistics.median(rate[key]):.0f} |")  # fmt: skip
            for key in cpu:
                if key.endswith("@base") or f"{key}@base" not in cpu:
                    continue
                saved = [b - n for b, n in zip(cpu[f"{key}@base"], cpu[key], strict=True)]
                base_cpu = statistics.median(cpu[f"{key}@base"])
                new_cpu = statistics.median(cpu[key])
                print(f"{key}: baseline {base_cpu:.3f}, this tree {new_cpu:.3f} "
                      f"ms/msg; saved per round (paired) median {statistics.median(saved):.3f} "
                      f"({100 * statistics.median(saved) / base_cpu:.1f} %), rounds "
                      + " ".join(f"{d:+.3f}" for d in saved))  # fmt: skip
    finally:
        for proc in reversed(procs):
            proc.stop()
        dns.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
