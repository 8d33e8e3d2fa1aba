"""STARTTLS to the upstream: off, opportunistic, required; CA file and verification."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import MESSAGE, LoopThread, RecordingUpstream
from tests.tlscerts import Certs
from tests.upstreams import TlsUpstream


@pytest.fixture
def tls_upstream(loop_thread: LoopThread, certs: Certs) -> Iterator[TlsUpstream]:
    """An upstream that requires STARTTLS, with the test CA's server certificate."""
    server = TlsUpstream(loop_thread, str(certs.server_cert), str(certs.server_key))
    yield server
    server.close()


def _send(gw) -> tuple[int, bytes]:
    with gw.client() as client:
        client.mail("alice@example.net")
        code, text = client.rcpt("bob@example.com")
        if code != 250:
            return code, text
        return client.data(MESSAGE)


def test_required_with_the_right_ca_delivers_over_tls(make_gateway, tls_upstream, certs):
    gw = make_gateway(
        upstream={"url": tls_upstream.url, "starttls": "required", "ca_file": str(certs.ca)}
    )
    assert _send(gw)[0] == 250
    assert len(tls_upstream.messages) == 1


def test_required_with_the_wrong_ca_never_delivers(make_gateway, tls_upstream, certs, caplog):
    gw = make_gateway(
        upstream={"url": tls_upstream.url, "starttls": "required", "ca_file": str(certs.other_ca)}
    )
    with gw.client() as client:
        code, text = client.mail("alice@example.net")
    assert code == 451 and text.startswith(b"4.4.1")
    assert tls_upstream.messages == []
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


def test_required_without_verification_takes_any_certificate(make_gateway, tls_upstream, certs):
    gw = make_gateway(
        upstream={
            "url": tls_upstream.url,
            "starttls": "required",
            "ca_file": str(certs.other_ca),
            "verify_certificate": False,
        }
    )
    assert _send(gw)[0] == 250
    assert len(tls_upstream.messages) == 1


def test_opportunistic_uses_tls_when_offered(make_gateway, tls_upstream):
    # No CA file at all: opportunistic TLS encrypts without authenticating.
    gw = make_gateway(upstream={"url": tls_upstream.url, "starttls": "opportunistic"})
    assert _send(gw)[0] == 250
    assert len(tls_upstream.messages) == 1


def test_opportunistic_falls_back_to_plaintext_when_not_offered(make_gateway, upstream):
    gw = make_gateway(upstream={"url": upstream.url, "starttls": "opportunistic"})
    assert _send(gw)[0] == 250
    assert len(upstream.messages) == 1


def test_required_against_an_upstream_without_starttls_gives_4xx(
    make_gateway, upstream: RecordingUpstream
):
    gw = make_gateway(upstream={"url": upstream.url, "starttls": "required"})
    with gw.client() as client:
        code, text = client.mail("alice@example.net")
    assert code == 451 and text.startswith(b"4.4.1")
    assert upstream.messages == []


def test_off_never_starts_tls(make_gateway, tls_upstream):
    # The upstream insists on TLS; with starttls off its refusal reaches the client.
    gw = make_gateway(upstream={"url": tls_upstream.url, "starttls": "off"})
    with gw.client() as client:
        code, _ = client.mail("alice@example.net")
    assert code == 530
    assert tls_upstream.messages == []


def test_tls_connections_are_reused(make_gateway, tls_upstream, certs):
    gw = make_gateway(
        upstream={"url": tls_upstream.url, "starttls": "required", "ca_file": str(certs.ca)}
    )
    with gw.client() as client:
        for i in range(3):
            client.sendmail("alice@example.net", [f"u{i}@example.com"], MESSAGE)
    assert len(tls_upstream.messages) == 3
    assert tls_upstream.connections == 1
