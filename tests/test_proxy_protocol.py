"""PROXY protocol v1/v2 on a listener, over real sockets: the real client drives every decision."""

from __future__ import annotations

import ipaddress
import smtplib
import socket
import struct

from tests.support import MESSAGE

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(src: str, sport: int = 40000) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    dst = "::1" if family == "TCP6" else "127.0.0.1"
    return f"PROXY {family} {src} {dst} {sport} 25\r\n".encode()


def v2(src: str | None, sport: int = 40000) -> bytes:
    """A v2 header: PROXY over TCP from ``src``, or LOCAL (a health check) when ``src`` is None."""
    if src is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    ip = ipaddress.ip_address(src)
    dst = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    family = 0x21 if ip.version == 6 else 0x11
    body = ip.packed + dst.packed + struct.pack("!HH", sport, 25)
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


class ProxiedSMTP(smtplib.SMTP):
    """smtplib, connecting the way a load balancer does: the PROXY header first."""

    def __init__(self, port: int, header: bytes) -> None:
        self._header = header
        super().__init__("127.0.0.1", port, timeout=10)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((host, port), timeout)
        sock.sendall(self._header)
        return sock


def _proxy_listener(**extra: object) -> list[dict[str, object]]:
    return [
        {
            "address": "127.0.0.1:0",
            "proxy_protocol": True,
            "trusted_proxies": ["127.0.0.0/8"],
            **extra,
        }
    ]


def _raw_exchange(port: int, payload: bytes, wait: float = 10) -> bytes:
    """Send ``payload`` and read until the server closes; what it said."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        if payload:
            sock.sendall(payload)
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


def test_v1_header_gives_the_real_client_to_logs_and_headers(make_gateway, upstream, decisions):
    gw = make_gateway(listen=_proxy_listener())
    with ProxiedSMTP(gw.port, v1("198.51.100.7")) as client:
        client.ehlo("client.example.net")
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert b"from client.example.net ([198.51.100.7])" in upstream.messages[0].data
    assert "client=198.51.100.7" in decisions()[-1]


def test_the_real_client_not_the_proxy_decides_relaying(make_gateway, upstream):
    # The proxy (127.0.0.1) is a trusted network; the client behind it is not.
    gw = make_gateway(listen=_proxy_listener(), trusted_networks=["127.0.0.0/8"])
    with ProxiedSMTP(gw.port, v1("203.0.113.9")) as client:
        client.ehlo("client.example.net")
        client.mail("alice@example.net")
        code, text = client.rcpt("victim@elsewhere.org")
    assert code == 554 and text.startswith(b"5.7.1")
    gw2 = make_gateway(listen=_proxy_listener(), trusted_networks=["198.51.100.0/24"])
    with ProxiedSMTP(gw2.port, v2("198.51.100.7")) as client:
        client.ehlo("client.example.net")
        client.sendmail("alice@example.com", ["friend@elsewhere.org"], MESSAGE)
    assert upstream.messages[0].recipients == ["friend@elsewhere.org"]


def test_v2_header_with_an_ipv6_client(make_gateway, upstream, decisions):
    gw = make_gateway(listen=_proxy_listener())
    with ProxiedSMTP(gw.port, v2("2001:db8::7")) as client:
        client.ehlo("client.example.net")
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert b"([IPv6:2001:db8::7])" in upstream.messages[0].data
    assert "client=2001:db8::7" in decisions()[-1]


def test_v2_local_health_check_keeps_the_proxy_address(make_gateway, upstream, decisions):
    gw = make_gateway(listen=_proxy_listener())
    with ProxiedSMTP(gw.port, v2(None)) as client:
        client.ehlo("lb.example.net")
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert "client=127.0.0.1" in decisions()[-1]


def test_connection_from_an_untrusted_address_is_refused(make_gateway, upstream):
    gw = make_gateway(listen=_proxy_listener(trusted_proxies=["192.0.2.0/24"]))
    # Refused before anything is read: a plain client waiting for a banner gets a clear 554.
    said = _raw_exchange(gw.port, b"")
    assert said == b"554 5.7.1 Connection refused: not a trusted proxy\r\n"
    assert upstream.connections == 0


def test_bad_header_from_a_trusted_proxy_is_dropped_without_a_reply(make_gateway):
    gw = make_gateway(listen=_proxy_listener())
    assert _raw_exchange(gw.port, b"PROXY TCP9 nonsense\r\n") == b""
    assert _raw_exchange(gw.port, b"EHLO plain.client.example\r\n") == b""
    # The listener keeps serving proxied clients.
    with ProxiedSMTP(gw.port, v1("198.51.100.7")) as client:
        assert client.ehlo("client.example.net")[0] == 250


def test_missing_header_times_out_without_a_banner(make_gateway):
    gw = make_gateway(listen=_proxy_listener(proxy_timeout="1s"))
    # Closed by the gateway (recv() returns b""); our own 20 s timeout would raise instead.
    assert _raw_exchange(gw.port, b"", wait=20) == b""


def test_proxy_protocol_needs_trusted_proxies(tmp_path, capsys):
    from mailgate.cli import main as mailgate

    policy = tmp_path / "p.yaml"
    policy.write_text("listen:\n  - address: 127.0.0.1:2525\n    proxy_protocol: true\n")
    assert mailgate(["check", "-c", str(policy)]) == 2
    assert "p.yaml:2:5: listen.0: proxy_protocol needs trusted_proxies" in capsys.readouterr().err
