"""Several upstream servers: failover in order, health marking, recovery, all down = 4xx."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from tests.support import MESSAGE, LoopThread, RecordingUpstream


@pytest.fixture
def backup(loop_thread: LoopThread) -> Iterator[RecordingUpstream]:
    """A second recording upstream."""
    server = RecordingUpstream(loop_thread)
    yield server
    server.close()


def _deliver(gw, rcpt: str = "bob@example.com") -> None:
    with gw.client() as client:
        client.sendmail("alice@example.net", [rcpt], MESSAGE)


def test_primary_is_used_while_it_is_up(make_gateway, upstream, backup):
    gw = make_gateway(upstream=[upstream.url, backup.url])
    _deliver(gw)
    assert len(upstream.messages) == 1 and backup.messages == []


def test_primary_down_fails_over_and_is_marked_down(make_gateway, upstream, backup, caplog):
    gw = make_gateway(upstream={"url": upstream.url, "failover": [backup.url], "pool_size": 0})
    upstream.stop()
    _deliver(gw, "one@example.com")
    assert [m.recipients for m in backup.messages] == [["one@example.com"]]
    assert f"upstream marked down: server=127.0.0.1:{upstream.port} error=" in caplog.text
    health = gw.runtime.upstream.health()
    assert health == {f"127.0.0.1:{upstream.port}": False, f"127.0.0.1:{backup.port}": True}
    # While marked down the primary is not even tried: one warning, not one per message.
    _deliver(gw, "two@example.com")
    assert len(backup.messages) == 2
    assert caplog.text.count("marked down") == 1


def test_primary_is_used_again_after_down_for(make_gateway, upstream, backup, caplog):
    caplog.set_level(logging.INFO, logger="mailgate")
    gw = make_gateway(
        upstream={
            "url": upstream.url,
            "failover": [backup.url],
            "down_for": "1s",
            "pool_size": 0,
        }
    )
    upstream.stop()
    _deliver(gw, "during@example.com")
    upstream.start()
    deadline = time.monotonic() + 10
    while not all(gw.runtime.upstream.health().values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    _deliver(gw, "after@example.com")
    assert [m.recipients for m in upstream.messages] == [["after@example.com"]]
    assert [m.recipients for m in backup.messages] == [["during@example.com"]]
    assert "is up again" in caplog.text


def test_every_server_down_gives_4xx_and_they_are_all_retried(make_gateway, upstream, backup):
    gw = make_gateway(upstream=[upstream.url, backup.url])
    upstream.stop()
    backup.stop()
    with gw.client() as client:
        code, text = client.mail("alice@example.net")
        assert (code, text[:5]) == (451, b"4.4.1")
        client.rset()
        # Both are marked down now, but a marking alone never refuses mail.
        backup.start()
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert len(backup.messages) == 1


def test_greeting_refusal_counts_as_down(make_gateway, upstream, backup, loop_thread):
    """A server that answers 554 instead of 220 is skipped like one that is not there."""
    import asyncio

    async def refuse() -> asyncio.Server:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"554 5.3.2 Not accepting mail\r\n")
            await writer.drain()
            writer.close()

        return await asyncio.start_server(greet, "127.0.0.1", 0)

    server = loop_thread.run(refuse())
    port = server.sockets[0].getsockname()[1]
    try:
        gw = make_gateway(upstream=[f"smtp://127.0.0.1:{port}", backup.url])
        _deliver(gw)
        assert len(backup.messages) == 1
        assert gw.runtime.upstream.health()[f"127.0.0.1:{port}"] is False
    finally:
        loop_thread.loop.call_soon_threadsafe(server.close)  # asyncio.Server is not thread-safe


def test_failover_must_list_smtp_servers(tmp_path, capsys):
    from mailgate.cli import main as mailgate

    policy = tmp_path / "p.yaml"
    policy.write_text("upstream:\n  url: smtp://127.0.0.1:25\n  failover: [maildir:./x]\n")
    assert mailgate(["check", "-c", str(policy)]) == 2
    assert "p.yaml:1:1: upstream: failover lists further smtp://" in capsys.readouterr().err
