"""Scale-out, for real: HAProxy (PROXY v2, /health checks), two gateways, one Redis.

The HAProxy configuration is the one in ``docs/scale-out.md`` (the only page
that shows it; ``listeners.md`` and ``operations.md`` link to it), with only
its addresses moved to loopback ports and the check interval shortened. One
client, bound to 127.0.0.5 so that its address differs from HAProxy's
127.0.0.1, sends a bounded number of messages; the two gateways
share one rate limit in Redis. Then one gateway gets SIGTERM while it holds a
transaction: its /health turns 503, HAProxy's check takes it out, new mail
goes to the other, the held transaction still ends in 250, and once the
gateway is gone mail still flows.
"""

from __future__ import annotations

import csv
import io
import re
import signal
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.ops_support import GatewayProcess, need_binary, wait_until
from tests.redis_support import RedisServer, free_port
from tests.support import MESSAGE

DOCS = Path(__file__).resolve().parent.parent / "docs"
CLIENT_IP = "127.0.0.5"
SECOND_CLIENT_IP = "127.0.0.6"
LIMIT = 10
SENT = 30


def haproxy_snippet(page: str) -> str:
    """The one ```haproxy block of a docs page."""
    blocks = re.findall(r"^```haproxy\n(.*?)^```$", (DOCS / page).read_text(), re.M | re.S)
    assert len(blocks) == 1, f"{page}: expected one ```haproxy block, found {len(blocks)}"
    return blocks[0]


def test_the_haproxy_configuration_is_written_once():
    pages = sorted(
        str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if "```haproxy" in p.read_text()
    )
    assert pages == ["scale-out.md"]


def _replace_once(text: str, pattern: str, replacement: str) -> str:
    new, count = re.subn(pattern, replacement, text, flags=re.M)
    assert count == 1, f"docs/scale-out.md's HAProxy snippet has no single {pattern!r}"
    return new


def haproxy_config(front: int, gateways: list[tuple[int, int]], stats: Path) -> str:
    """The documented configuration on loopback: front port, (smtp, metrics) per gateway."""
    text = haproxy_snippet("scale-out.md")
    text = _replace_once(text, r"^(\s+bind) :25$", rf"\1 127.0.0.1:{front}")
    text = _replace_once(text, r"\binter 2s\b", "inter 300ms")
    for index, (smtp, metrics) in enumerate(gateways, 1):
        text = _replace_once(
            text,
            rf"^(\s+server gw{index}) \S+:2525 (send-proxy-v2 check) port 9125$",
            rf"\1 127.0.0.1:{smtp} \2 port {metrics}",
        )
    return f"global\n    stats socket {stats} level admin\n\n{text}"


class HAProxy:
    """A real ``haproxy -db`` (foreground) with an admin socket to read server states."""

    def __init__(self, binary: str, config: str, workdir: Path, stats: Path) -> None:
        self.stats = stats
        path = workdir / "haproxy.cfg"
        path.write_text(config)
        self.log_path = workdir / "haproxy.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, "-db", "-f", str(path)], stdout=log, stderr=subprocess.STDOUT
            )

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` of backend ``mailgate``: server name -> its CSV row."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(str(self.stats))
                sock.sendall(b"show stat\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(data.decode().removeprefix("# ")))
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == "mailgate" and row["svname"] not in ("BACKEND", "FRONTEND")
        }

    def state(self, server: str) -> tuple[str, str]:
        """(status, last check status) of ``server``: ("UP", "L7OK"), ("DOWN", "L4CON"), ..."""
        row = self.servers().get(server)
        return (row["status"], row["check_status"]) if row else ("", "")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def send(port: int, source: str) -> int:
    """One message through HAProxy from ``source``: the code of the reply that decided it."""
    with smtplib.SMTP("127.0.0.1", port, timeout=15, source_address=(source, 0)) as client:
        client.ehlo("client.example.net")
        code, _ = client.mail("alice@example.net")
        if code != 250:
            return code
        code, _ = client.rcpt("bob@example.com")
        if code != 250:
            return code
        return client.data(MESSAGE)[0]


def open_transaction(port: int, source: str) -> smtplib.SMTP:
    """A session through HAProxy left between RCPT and DATA (a transaction in flight)."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=15, source_address=(source, 0))
    client.ehlo("client.example.net")
    assert client.mail("alice@example.net")[0] == 250
    assert client.rcpt("bob@example.com")[0] == 250
    return client


def delivered(maildir: Path) -> int:
    return len(list((maildir / "new").glob("*"))) if (maildir / "new").is_dir() else 0


def decisions(gateway: GatewayProcess) -> list[str]:
    """The client address of each decision line the gateway logged."""
    return re.findall(r"mailgate\.decision: txn=\S+ client=(\S+)", gateway.log)


class Cluster:
    """redis-server, two gateways and HAProxy, all on loopback ports chosen now."""

    def __init__(self, tmp: Path, stack: list[object]) -> None:
        self.redis = RedisServer(need_binary("redis-server", "redis-server"), tmp)
        stack.append(self.redis)
        haproxy = need_binary("haproxy", "haproxy")
        self.gateways: list[GatewayProcess] = []
        self.maildirs: list[Path] = []
        ports = []
        for index in (1, 2):
            smtp, metrics = free_port(), free_port()
            maildir = tmp / f"mail{index}"
            policy = {
                "hostname": f"gw{index}.test",
                "listen": [
                    {
                        "address": f"127.0.0.1:{smtp}",
                        "proxy_protocol": True,
                        "trusted_proxies": ["127.0.0.1/32"],
                    }
                ],
                "metrics": f"127.0.0.1:{metrics}",
                "state": self.redis.url,
                "upstream": f"maildir:{maildir}",
                "domains": ["example.com"],
                "shutdown_timeout": "5s",
                "plugins": {"ratelimit": {"rules": [{"key": "client_ip", "rate": f"{LIMIT}/1h"}]}},
            }
            path = tmp / f"gw{index}.yaml"
            path.write_text(yaml.safe_dump(policy, sort_keys=False))
            gateway = GatewayProcess(path, tmp / f"gw{index}.log")
            stack.append(gateway)
            self.gateways.append(gateway)
            self.maildirs.append(maildir)
            ports.append((smtp, metrics))
        self.front = free_port()
        stats = tmp / "haproxy.sock"
        self.haproxy = HAProxy(haproxy, haproxy_config(self.front, ports, stats), tmp, stats)
        stack.append(self.haproxy)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    stack: list[object] = []
    try:
        yield Cluster(tmp_path, stack)
    finally:
        for item in reversed(stack):
            item.stop()  # type: ignore[attr-defined]


@pytest.mark.redis
@pytest.mark.timeout(90)
def test_haproxy_two_gateways_one_redis(cluster: Cluster):
    started = time.monotonic()
    proxy, (gw1, gw2) = cluster.haproxy, cluster.gateways
    # Both gateways pass HAProxy's HTTP check of /health on their metrics port.
    assert wait_until(lambda: all(proxy.state(s) == ("UP", "L7OK") for s in ("gw1", "gw2")), 15), (
        proxy.servers(),
        proxy.log_path.read_text(),
    )

    codes = [send(cluster.front, CLIENT_IP) for _ in range(SENT)]
    # One limit across both gateways: exactly LIMIT accepted, the rest told to come back.
    assert codes.count(250) == LIMIT, codes
    assert set(codes) == {250, 450}, codes
    assert sum(delivered(m) for m in cluster.maildirs) == LIMIT
    # Both gateways served (round robin) and saw the real client, never HAProxy.
    seen = [decisions(gw1), decisions(gw2)]
    assert all(seen), seen
    assert sorted(set(seen[0] + seen[1])) == [CLIENT_IP]
    assert len(seen[0]) + len(seen[1]) == SENT

    # Take gw1 down while it holds a transaction: from SIGTERM on its /health says 503, so
    # HAProxy's check takes it out (L7STS) while it drains; new mail goes to gw2.
    held = [open_transaction(cluster.front, SECOND_CLIENT_IP) for _ in range(2)]  # one each
    stopped = time.monotonic()
    gw1.signal(signal.SIGTERM)
    assert wait_until(lambda: proxy.state("gw1") == ("DOWN", "L7STS"), 10), proxy.servers()
    down_after = time.monotonic() - stopped
    assert gw1.proc.poll() is None, "gw1 should still be draining its transaction"
    during = [send(cluster.front, SECOND_CLIENT_IP) for _ in range(3)]
    # The held transactions finish on both gateways (gw1's drain lets its own end); then
    # gw1 is gone altogether (L4CON) and mail still flows.
    finished = [client.data(MESSAGE)[0] for client in held]
    for client in held:
        client.quit()
    assert gw1.proc.wait(10) == 0
    assert wait_until(lambda: proxy.state("gw1") == ("DOWN", "L4CON"), 10), proxy.servers()
    after = [send(cluster.front, SECOND_CLIENT_IP) for _ in range(2)]
    assert during + finished + after == [250] * 7
    assert decisions(gw1).count(SECOND_CLIENT_IP) == 1
    assert decisions(gw2).count(SECOND_CLIENT_IP) == 6
    assert sum(delivered(m) for m in cluster.maildirs) == LIMIT + 7
    assert proxy.state("gw2") == ("UP", "L7OK")
    print(
        f"\nscale-out: sent {SENT} from {CLIENT_IP}, accepted {codes.count(250)} "
        f"(gw1 {len(seen[0])} sessions, gw2 {len(seen[1])}); gw1 out of HAProxy "
        f"{down_after:.1f}s after SIGTERM; 7 more delivered; {time.monotonic() - started:.1f}s"
    )
