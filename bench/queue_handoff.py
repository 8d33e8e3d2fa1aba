"""Queue mode's lockstep handoff: its latency cost, and what the client sees per upstream state.

Latency: the bench sink (``bench.sink``) and two ``mailgate run`` processes in
``delivery: queue`` on free loopback ports, one with the lockstep handoff
(``queue.handoff_timeout: 5s``, the default) and one spool-first
(``handoff_timeout: 0``, the behaviour before it). One client sends
``--messages`` messages one after another to each (alternating rounds) and the
median and 90th percentile of the time from MAIL to the DATA reply are
printed. The spool is in a temporary folder, so spool-first includes that
disk's fsyncs; the handoff includes the sink's reply.

Table: with ``--table``, one transaction per upstream state against a
recording upstream (``mailgate.testing``), printing the reply at each stage.

Run: ``python -m bench.queue_handoff [--messages 200] [--table]``
"""

from __future__ import annotations

import argparse
import shutil
import smtplib
import statistics
import tempfile
import time
from pathlib import Path

from bench.procs import start_gateway_process, start_sink_process

MESSAGE = (
    b"From: a@example.net\r\nTo: b@example.com\r\nSubject: t\r\n"
    b"Message-ID: <x@example.net>\r\n\r\n" + b"body line\r\n" * 40
)


def _timed(port: int, count: int) -> list[float]:
    """Milliseconds per message (MAIL to the DATA reply) over one connection."""
    out: list[float] = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("bench.example.net")
        for _ in range(count):
            started = time.perf_counter()
            client.sendmail("a@example.net", ["b@example.com"], MESSAGE)
            out.append((time.perf_counter() - started) * 1000)
    return out


def latency(messages: int) -> None:
    """Print median/p90 ms per message, lockstep handoff against spool-first."""
    workdir = Path(tempfile.mkdtemp(prefix="mailgate-handoff-"))
    sink, sink_port = start_sink_process()
    procs = [sink]
    try:
        ports = {}
        for name, budget in (("handoff", "5s"), ("spool-first", 0)):
            policy: dict[str, object] = {
                "hostname": "bench.test",
                "upstream": f"smtp://127.0.0.1:{sink_port}",
                "domains": ["example.com"],
                "log": {"level": "warning"},
                "delivery": "queue",
                "queue": {"directory": str(workdir / name), "handoff_timeout": budget},
            }
            proc, ports[name] = start_gateway_process(workdir, name, policy)
            procs.append(proc)
        times: dict[str, list[float]] = {name: [] for name in ports}
        for _ in range(4):  # alternate, so both see the same machine load
            for name, port in ports.items():
                times[name] += _timed(port, messages // 4)
        for name, values in times.items():
            p90 = statistics.quantiles(values, n=10)[-1]
            print(
                f"{name:12} n={len(values)} median={statistics.median(values):.2f} ms "
                f"p90={p90:.2f} ms"
            )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)


def table() -> None:
    """One transaction per upstream state; the replies the client gets at each stage."""
    from mailgate.testing import LoopThread, RecordingUpstream, RunningGateway, write_policy

    workdir = Path(tempfile.mkdtemp(prefix="mailgate-table-"))
    loop = LoopThread()
    up = RecordingUpstream(loop)
    policy = {
        "upstream": {"url": up.url, "pool_size": 0},
        "domains": ["example.com"],
        "log": {"level": "error"},
        "delivery": "queue",
        "queue": {"directory": str(workdir / "spool"), "handoff_timeout": "1s", "retry_min": "1h"},
    }
    gw = RunningGateway(loop, write_policy(workdir / "p.yaml", policy))
    b = up.behaviour
    refused = "550 5.1.1 No such user"
    states = [
        ("accepts", lambda: None),
        ("554 at MAIL", lambda: setattr(b, "mail_reply", "554 5.7.1 Sender refused")),
        ("554 after DATA", lambda: setattr(b, "data_reply", "554 5.6.0 Content refused")),
        ("451 at MAIL", lambda: setattr(b, "mail_reply", "451 4.3.0 Try later")),
        (
            "452 at RCPT (one of two)",
            lambda: b.rcpt_replies.update({"x@example.com": "452 4.2.2 Full"}),
        ),
        ("451 after DATA", lambda: setattr(b, "data_reply", "451 4.3.0 Try later")),
        ("slow (3s > 1s budget)", lambda: setattr(b, "data_delay", 3.0)),
        ("drops at DATA", lambda: setattr(b, "drop_at_data", True)),
        (
            "550 at RCPT for x@ (one of two)",
            lambda: b.rcpt_replies.update({"x@example.com": refused}),
        ),
        ("down (x@ refused just before)", up.stop),
    ]
    try:
        for label, arrange in states:
            b.mail_reply = b.data_reply = None
            b.data_delay, b.drop_at_data = 0.0, False
            b.rcpt_replies.clear()
            arrange()
            replies = []
            with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as client:
                client.ehlo("bench.example.net")
                code, text = client.mail("a@example.net")
                replies.append(f"{code}")
                if code == 250:
                    for rcpt in ("b@example.com", "x@example.com"):
                        code, text = client.rcpt(rcpt)
                        replies.append(f"{code}")
                    try:
                        code, text = client.data(MESSAGE)
                    except smtplib.SMTPDataError as exc:
                        code, text = exc.smtp_code, exc.smtp_error
                    replies.append(f"{code} {text.decode()}")
            print(f"| {label} | {' / '.join(replies)} |")
    finally:
        gw.stop()
        up.close()
        loop.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    """Parse the arguments and run the measurement (and the table with ``--table``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        table()
    latency(min(args.messages, 2000))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
