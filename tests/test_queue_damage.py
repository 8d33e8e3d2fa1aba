"""A spool that survives damage: cut, empty and altered messages, bad envelopes, full disks.

ENOSPC is injected (``os.write`` wrapped in-process to fail for files under
one folder), not produced by a small tmpfs: mounting one needs privileges the
test machines may not have.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailgate.cli import main as mailgate
from mailgate.queue.delivery import backoff
from mailgate.queue.spool import STATS, Entry, Spool, digest, new_id
from tests.ops_support import mailgate as run_mailgate
from tests.ops_support import wait_until
from tests.support import MESSAGE


@pytest.fixture
def queue_policy(queue_policy: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Spool first (so the tests place files before delivery)."""
    return functools.partial(queue_policy, handoff_timeout=0)


@pytest.fixture
def errors(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """The ERROR lines of the queue's logger so far."""
    caplog.set_level(logging.INFO, logger="mailgate")

    def lines() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "mailgate.queue" and r.levelno >= logging.ERROR
        ]

    return lines


def place(spool: Path, message: bytes, *, stored: bytes | None = None, **fields: Any) -> str:
    """Put an entry in the spool as a gateway would, then (``stored``) damage its message."""
    store = Spool(str(spool))
    store.prepare()
    entry = Entry(id=new_id(), sender="alice@example.net", recipients=["bob@example.com"])
    store.store(entry, message)
    if fields:
        for key, value in fields.items():
            setattr(entry, key, value)
        store.save(entry)
    if stored is not None:
        (spool / "queue" / f"{entry.id}.msg").write_bytes(stored)
    return entry.id


def corrupt(spool: Path) -> dict[str, str]:
    """The ids in ``corrupt/`` and why they are there."""
    return Spool(str(spool)).corrupt()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(MESSAGE[: len(MESSAGE) // 2], id="cut-in-half"),
        pytest.param(b"", id="empty"),
        pytest.param(MESSAGE.replace(b"Hello", b"Hallo"), id="same-length-altered"),
    ],
)
def test_a_damaged_message_is_never_delivered(
    make_gateway, upstream, queue_policy, spool, errors, damage
):
    moved_before = STATS.corrupt_moved
    bad = place(spool, MESSAGE, stored=damage)
    good = place(spool, MESSAGE)
    make_gateway(**queue_policy())
    assert wait_until(lambda: bad in corrupt(spool) and len(upstream.messages) == 1)
    assert upstream.messages[0].data == MESSAGE  # the good one; the damaged one never
    assert not (spool / "queue" / f"{bad}.env").exists()
    assert (spool / "corrupt" / f"{bad}.msg").read_bytes() == damage  # kept for a look
    assert wait_until(lambda: any(bad in e for e in errors()))  # logged once the move is done
    [line] = [e for e in errors() if bad in e]
    assert "damaged" in line and ("bytes" in line or "digest" in line)
    assert STATS.corrupt_moved == moved_before + 1
    assert wait_until(lambda: good not in os.listdir(spool / "queue"))


@pytest.mark.parametrize("content", [b"[]", b'"hello"', b"{not json", b'{"id": 5}', b"\xff\xfe"])
def test_a_bad_envelope_at_start_is_set_aside_once(
    make_gateway, upstream, queue_policy, spool, errors, content
):
    bad = place(spool, MESSAGE)
    (spool / "queue" / f"{bad}.env").write_bytes(content)
    gw = make_gateway(**queue_policy())  # starts: the bad file no longer stops it
    assert wait_until(lambda: any(bad in e for e in errors()))
    time.sleep(2.5)  # two more scans: nothing is logged again
    assert len([e for e in errors() if bad in e]) == 1
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    assert wait_until(lambda: len(upstream.messages) == 1)


def test_a_bad_envelope_appearing_later_does_not_kill_the_scanner(
    make_gateway, upstream, queue_policy, spool, errors
):
    gw = make_gateway(**queue_policy())
    upstream.stop()
    bad = place(spool, MESSAGE)
    (spool / "queue" / f"{bad}.env").write_text("[]")
    assert wait_until(lambda: bad in corrupt(spool))
    with gw.client() as client:  # spooled (the upstream is down) ...
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    upstream.start()  # ... and delivered by the rescan, which is still alive
    assert wait_until(lambda: len(upstream.messages) == 1)


def test_an_envelope_without_its_message_is_reported(
    make_gateway, upstream, queue_policy, spool, errors
):
    stale = place(spool, MESSAGE)
    (spool / "queue" / f"{stale}.msg").unlink()
    make_gateway(**queue_policy())
    assert wait_until(lambda: "envelope without its message" in corrupt(spool).get(stale, ""))
    assert wait_until(lambda: any(stale in e for e in errors()))
    assert len([e for e in errors() if stale in e]) == 1


def test_admin_commands_survive_damage_and_manage_corrupt_entries(
    make_gateway, upstream, queue_policy, spool, capsys
):
    gw = make_gateway(**queue_policy(retry_min="1h"))
    config = str(gw.policy_path)
    upstream.stop()
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    bad = place(spool, MESSAGE)
    (spool / "queue" / f"{bad}.env").write_text('"hello"')
    stale = place(spool, MESSAGE)
    (spool / "queue" / f"{stale}.msg").unlink()
    capsys.readouterr()
    # Listed before the gateway's next scan moves them, and after: never a traceback.
    assert mailgate(["queue", "-c", config, "list"]) == 0
    listing = capsys.readouterr().out
    assert "-- 1 message(s)" in listing
    assert f"{bad}  " in listing and f"{stale}  " in listing
    assert mailgate(["queue", "-c", config, "flush"]) == 0
    assert wait_until(lambda: all(corrupt(spool).get(i) for i in (bad, stale)))
    capsys.readouterr()
    assert mailgate(["queue", "-c", config, "list"]) == 0
    listing = capsys.readouterr().out
    assert f"{bad}  CORRUPT  envelope is a JSON str, not an object" in listing
    assert f"{stale}  CORRUPT  envelope without its message" in listing
    assert mailgate(["queue", "-c", config, "delete", bad]) == 0
    assert bad not in corrupt(spool)
    assert not any(p.name.startswith(bad) for p in (spool / "corrupt").iterdir())


# ------------------------------------------------------------------ full disk (injected)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], None]]:
    """``fill(folder)``: from now on ``os.write`` to a file under ``folder`` fails with ENOSPC."""
    real_write = os.write
    full: list[str] = []

    def write(fd: int, data: Any) -> int:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if any(path.startswith(folder) for folder in full):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    yield lambda folder: full.append(str(folder.resolve()))
    full.clear()


def test_enospc_on_store_gives_4xx_and_leaves_nothing(
    make_gateway, upstream, queue_policy, spool, full_disk
):
    gw = make_gateway(**queue_policy())
    before = STATS.write_errors
    full_disk(spool)
    with gw.client() as client:
        client.mail("alice@example.net")
        client.rcpt("bob@example.com")
        code, text = client.data(MESSAGE)
    assert (code, text[:5]) == (451, b"4.3.0")
    assert os.listdir(spool / "tmp") == [] and os.listdir(spool / "queue") == []
    assert STATS.write_errors == before + 1


def test_enospc_on_envelope_update_backs_off_and_counts(
    make_gateway, upstream, queue_policy, spool, full_disk, errors
):
    upstream.behaviour.mail_reply = "451 4.3.0 Try later"
    gw = make_gateway(**queue_policy(retry_min="1s", retry_max="1h"))
    with gw.client() as client:
        client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
    full_disk(spool / "tmp")  # the envelope rewrite after each attempt fails

    def counted() -> list[str]:
        return [e for e in errors() if "cannot update the envelope" in e]

    assert wait_until(lambda: len(counted()) >= 2, timeout=20)
    found = [
        re.search(r"attempt (\d+) counted in memory, next try in (\d+)s", e) for e in counted()
    ]
    (n1, wait1), (n2, wait2) = [(int(m.group(1)), int(m.group(2))) for m in found[:2] if m]
    assert n2 == n1 + 1  # the count moves although the envelope cannot be rewritten
    assert (wait1, wait2) == (backoff(n1, 1, 3600), backoff(n2, 1, 3600))  # backing off
    assert os.listdir(spool / "tmp") == []  # no leaked tmp/ID.env.* files
    assert not any("Traceback" in e for e in errors())


def test_enospc_in_maildir_delivery_leaves_no_partial_file(
    make_gateway, tmp_path, full_disk, caplog
):
    caplog.set_level(logging.ERROR, logger="mailgate.maildir")
    maildir = tmp_path / "mail"
    gw = make_gateway(upstream=f"maildir:{maildir}")
    full_disk(maildir)
    with gw.client() as client:
        client.mail("alice@example.net")
        client.rcpt("bob@example.com")
        code, text = client.data(MESSAGE)
    assert code == 451 and b"No space left on device" in text
    assert os.listdir(maildir / "tmp") == [] and os.listdir(maildir / "new") == []
    [line] = [r.getMessage() for r in caplog.records if r.name == "mailgate.maildir"]
    assert "maildir delivery" in line and "No space left on device" in line


# ------------------------------------------------------------------ the command line


def test_queue_list_into_a_closed_pipe_and_mailgate_config(tmp_path, spool):
    policy = tmp_path / "p.yaml"
    policy.write_text(json.dumps({"delivery": "queue", "queue": {"directory": str(spool)}}))
    first = place(spool, MESSAGE)
    envelope = json.loads((spool / "queue" / f"{first}.env").read_text())
    for _ in range(1000):  # ~150 kB of listing: more than a pipe holds
        queue_id = new_id()
        (spool / "queue" / f"{queue_id}.msg").write_bytes(MESSAGE)
        (spool / "queue" / f"{queue_id}.env").write_text(json.dumps({**envelope, "id": queue_id}))
    env = {**os.environ, "MAILGATE_CONFIG": str(policy)}
    done = subprocess.run(
        f"{sys.executable} -m mailgate queue list | head -1",
        shell=True,
        cwd=tmp_path,  # no policies/default.yaml here: only MAILGATE_CONFIG can find it
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stderr == "" and len(done.stdout.splitlines()) == 1
    assert f"{done.stdout.split()[0]}.env" in os.listdir(spool / "queue")
    helped = run_mailgate("queue", "--help")
    for word in ("hold", "release", "show", "MAILGATE_CONFIG"):
        assert word in helped.stdout


def test_digest_is_recorded_at_store(tmp_path):
    """Unit test: ``store`` records the length and SHA-256 that delivery checks."""
    store = Spool(str(tmp_path / "spool"))
    store.prepare()
    entry = Entry(id=new_id(), sender="a@example.net", recipients=["b@example.com"])
    store.store(entry, MESSAGE)
    loaded = store.load(entry.id)
    assert loaded is not None
    assert (loaded.size, loaded.digest) == (len(MESSAGE), digest(MESSAGE))
    assert store.checked_message(loaded) == MESSAGE
