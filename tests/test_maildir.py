"""Maildir delivery, the embedded default upstream, and the newcomer's first run."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

from mailgate.testing import MESSAGE

ROOT = Path(__file__).parent.parent


def test_maildir_upstream_writes_each_message_once_with_the_envelope(make_gateway, tmp_path):
    maildir = tmp_path / "mail"
    gw = make_gateway(upstream=f"maildir:{maildir}")
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com", "carol@example.com"], MESSAGE)
        client.mail("alice@example.net")
        assert client.rcpt("x@elsewhere.org")[0] == 554
    [name] = os.listdir(maildir / "new")
    assert os.listdir(maildir / "tmp") == []
    data = (maildir / "new" / name).read_bytes()
    assert data.startswith(
        b"Return-Path: <alice@example.net>\r\n"
        b"Delivered-To: bob@example.com\r\n"
        b"Delivered-To: carol@example.com\r\n"
        b"Received: from client.example.net ([127.0.0.1])\r\n"
    )
    assert data.endswith(MESSAGE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_default_policy_runs_and_delivers_into_mail_folder(tmp_path):
    """What the README's first command does, on a free port instead of 2525."""
    port = _free_port()
    policy = (ROOT / "policies" / "default.yaml").read_text()
    policy = policy.replace("127.0.0.1:2525", f"127.0.0.1:{port}")
    assert f"127.0.0.1:{port}" in policy
    (tmp_path / "policy.yaml").write_text(policy)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailgate", "run", "-c", "policy.yaml"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client = smtplib.SMTP("127.0.0.1", port, timeout=10)
                break
            except ConnectionRefusedError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "gateway did not start"
                time.sleep(0.1)
        with client:
            client.sendmail("me@example.net", ["you@example.com"], MESSAGE)
            code, _ = client.mail("me@example.net")
            assert code == 250
            assert client.rcpt("someone@elsewhere.org")[0] == 554
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    [name] = os.listdir(tmp_path / "mail" / "new")
    data = (tmp_path / "mail" / "new" / name).read_bytes()
    assert b"\r\nReceived: from " in data
    assert b"\tby mailgate.localhost (mailgate) with ESMTP id " in data
    assert data.endswith(MESSAGE)
    assert "outcome=delivered" in output
