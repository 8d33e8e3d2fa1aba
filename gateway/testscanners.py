"""Scanner answers for policy test cases, served on loopback in each scanner's own protocol.

A cases file (``mailgate test --cases``) may declare what a content scanner
says, for the whole file and per case, as it declares DNS records::

    scanners:
      rspamd: {action: reject, score: 15, symbols: [GTUBE], smtp_message: Gtube pattern}
      spamassassin: {spam: true, score: 1000, threshold: 5, rules: [GTUBE]}
      clamav: {found: Eicar-Signature}     # or {found: null}: clean
      # any of them: down (nothing listens) or timeout (accepts, never answers)

For each declared scanner the case's dry run points that plugin's ``servers``
at a server on a free loopback port that speaks the real protocol (rspamd's
HTTP ``/checkv2`` JSON, spamd's SPAMC/1.5, clamd's ``zINSTREAM``) and gives
the declared answer, so the plugin's whole client path runs. A scanner the
case does not declare keeps the policy's servers.

rspamd keys: ``action`` [no action], ``score`` [0], ``required_score`` [15],
``symbols`` [none], ``smtp_message``, ``subject``, ``add_headers`` (name:
value). spamassassin: ``spam`` [false], ``score`` [0], ``threshold`` [5],
``rules`` [none]. clamav: ``found`` (a signature name; null for clean).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Mapping
from typing import Any

KINDS = ("rspamd", "spamassassin", "clamav")
SPECIAL = ("down", "timeout")
_KEYS = {
    "rspamd": {"action", "score", "required_score", "symbols", "smtp_message", "subject",
               "add_headers"},
    "spamassassin": {"spam", "score", "threshold", "rules"},
    "clamav": {"found"},
}  # fmt: skip
_READ_LIMIT = 64 * 1024**2


def check_answers(spec: Mapping[str, object]) -> None:
    """Raise ValueError naming the first scanner answer that is not understood."""
    for name, answer in spec.items():
        if name not in KINDS:
            raise ValueError(f"unknown scanner {name!r} (known: {', '.join(KINDS)})")
        if isinstance(answer, str):
            if answer not in SPECIAL:
                raise ValueError(f"{name}: expected a mapping, down or timeout, not {answer!r}")
            continue
        if not isinstance(answer, Mapping):
            raise ValueError(f"{name}: expected a mapping, down or timeout")
        unknown = sorted(set(answer) - _KEYS[name])
        if unknown:
            known = ", ".join(sorted(_KEYS[name]))
            raise ValueError(f"{name}: unknown key {', '.join(unknown)} (known: {known})")


def _rspamd_reply(answer: Mapping[str, Any]) -> bytes:
    symbols = answer.get("symbols") or []
    body: dict[str, Any] = {
        "action": answer.get("action", "no action"),
        "score": float(answer.get("score", 0)),
        "required_score": float(answer.get("required_score", 15)),
        "symbols": {str(s): {"name": str(s), "score": 0.0} for s in symbols},
        "messages": {"smtp_message": answer["smtp_message"]} if "smtp_message" in answer else {},
    }
    if "subject" in answer:
        body["subject"] = answer["subject"]
    if "add_headers" in answer:
        body["milter"] = {"add_headers": dict(answer["add_headers"])}
    data = json.dumps(body).encode()
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(data), data)
    )


def _spamd_reply(answer: Mapping[str, Any]) -> bytes:
    rules = ",".join(str(r) for r in answer.get("rules") or []).encode()
    spam = b"True" if answer.get("spam") else b"False"
    score, threshold = float(answer.get("score", 0)), float(answer.get("threshold", 5))
    return b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: %b ; %.1f / %.1f\r\n\r\n%b" % (
        len(rules),
        spam,
        score,
        threshold,
        rules,
    )


async def _read_request(kind: str, reader: asyncio.StreamReader) -> None:
    """Read one whole request in ``kind``'s protocol (its content does not matter here)."""
    if kind == "clamav":
        await reader.readexactly(len(b"zINSTREAM\0"))
        while size := int.from_bytes(await reader.readexactly(4), "big"):
            await reader.readexactly(size)
        return
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length > _READ_LIMIT:
        raise ValueError("request too large")
    await reader.readexactly(length)


class ScannerServer:
    """One declared scanner answer, served on a free loopback port."""

    def __init__(self, kind: str, answer: Mapping[str, Any] | str) -> None:
        self.kind = kind
        self.answer = answer
        self.address = ""
        self._server: asyncio.Server | None = None
        self._waiting: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Listen (or, for ``down``, find a port where nothing listens)."""
        if self.answer == "down":
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                self.address = f"127.0.0.1:{sock.getsockname()[1]}"
            return
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def _reply(self) -> bytes:
        answer = self.answer
        assert not isinstance(answer, str)
        if self.kind == "rspamd":
            return _rspamd_reply(answer)
        if self.kind == "spamassassin":
            return _spamd_reply(answer)
        found = answer.get("found")
        return f"stream: {found} FOUND\0".encode() if found else b"stream: OK\0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._waiting.add(task)
        try:
            async with asyncio.timeout(30):
                await _read_request(self.kind, reader)
                if self.answer == "timeout":
                    await asyncio.sleep(3600)
                writer.write(self._reply())
                await writer.drain()
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            if task is not None:
                self._waiting.discard(task)
            writer.close()

    async def close(self) -> None:
        """Stop listening and drop any connection still waiting."""
        for task in list(self._waiting):
            task.cancel()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()


async def start_servers(spec: Mapping[str, Any]) -> list[ScannerServer]:
    """A started :class:`ScannerServer` per declared scanner."""
    servers = [ScannerServer(kind, answer) for kind, answer in spec.items()]
    for server in servers:
        await server.start()
    return servers
