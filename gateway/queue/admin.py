"""``mailgate queue list | show | hold | release | delete | flush``: look at and manage the spool.

These work on the spool folder of the policy (``-c``, else ``$MAILGATE_CONFIG``,
else ``policies/default.yaml``), whether or not a gateway is running; they
take each message's lock, so they never race a delivery in progress (they
wait up to 10 seconds for it).

- ``list [--held]``: one block per message (``--held``: quarantined ones only),
  then damaged entries still in ``queue/`` and those set aside in ``corrupt/``;
- ``show ID [--raw]``: the envelope, verdicts, hold reason and the message's
  header section; ``--raw`` writes the whole message as stored;
- ``hold ID`` / ``release ID``: quarantine a queued message, or let a held one
  go (delivered at once by a running gateway, else at its next start);
- ``delete ID``: remove a message (queued, held or damaged) without a DSN;
- ``flush``: make every queued message due now and tell running gateways.
"""

from __future__ import annotations

import argparse
import sys
import time

from mailgate.policy import Policy
from mailgate.queue.spool import ID_PATTERN, Damaged, Entry, Spool

_LOCK_WAIT = 10.0


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "now"


def _print_entry(entry: Entry) -> None:
    state = "HELD " if entry.held else ""
    print(
        f"{entry.id}  {state}{entry.size:>9}  {_when(entry.created)}  <{entry.sender}>"
        f"  attempts={entry.attempts} next={_when(entry.next_attempt)}"
    )
    for rcpt in entry.recipients:
        print(f"    <{rcpt}>")
    if entry.held:
        print(f"    held since {_when(entry.held_since)}: {', '.join(entry.hold_rules)}")
        print(f"    reason: {entry.hold_reason}")
    if entry.last_error:
        print(f"    last error: {entry.last_error}")


def queue_list(spool: Spool, held_only: bool = False) -> int:
    """Print one block per message, then the damaged ones; exit 0."""
    count = 0
    damaged: list[tuple[str, str]] = []
    for queue_id in spool.ids():
        try:
            entry = spool.load(queue_id)
        except Damaged as exc:
            damaged.append((queue_id, str(exc)))
            continue
        if spool.stale(queue_id):
            damaged.append((queue_id, "envelope without its message (stale)"))
            continue
        if entry is None:
            continue
        if held_only and not entry.held:
            continue
        count += 1
        _print_entry(entry)
    what = "held message(s)" if held_only else "message(s)"
    print(f"-- {count} {what} in {spool.queue_dir}")
    for queue_id, why in damaged:
        print(f"{queue_id}  DAMAGED  {why} (a running gateway moves it to corrupt/)")
    corrupt = spool.corrupt()
    for queue_id, why in corrupt.items():
        print(f"{queue_id}  CORRUPT  {why or 'unknown damage'}")
    if damaged or corrupt:
        print(f"-- {len(damaged) + len(corrupt)} damaged in {spool.directory} (never delivered)")
    return 0


def queue_flush(spool: Spool) -> int:
    """Make every queued (not held) message due now and tell running gateways; exit 0."""
    for queue_id in spool.ids():
        with spool.lock(queue_id, wait=_LOCK_WAIT) as locked:
            try:
                entry = spool.load(queue_id) if locked else None
            except Damaged:
                continue
            if entry is not None and not entry.held:
                entry.next_attempt = 0.0
                spool.save(entry)
    spool.request_flush()
    print("flush requested")
    return 0


def _valid(queue_id: str) -> bool:
    if ID_PATTERN.match(queue_id):
        return True
    print(f"not a queue id: {queue_id!r}")
    return False


def queue_delete(spool: Spool, queue_id: str) -> int:
    """Delete one message (or damaged entry) without a DSN; exit 1 if none or busy."""
    if not _valid(queue_id):
        return 1
    if spool.delete_corrupt(queue_id):
        print(f"{queue_id}: deleted (from corrupt/)")
        return 0
    if spool.stale(queue_id):
        spool.remove(queue_id)
        print(f"{queue_id}: deleted (stale envelope)")
        return 0
    with spool.lock(queue_id, wait=_LOCK_WAIT) as locked:
        try:
            found = locked and spool.load(queue_id) is not None
        except Damaged:
            found = True
        if not found:
            print(f"{queue_id}: no such message (or it is being delivered)")
            return 1
        spool.remove(queue_id)
    print(f"{queue_id}: deleted")
    return 0


def _change(spool: Spool, queue_id: str, hold: bool) -> int:
    if not _valid(queue_id):
        return 1
    with spool.lock(queue_id, wait=_LOCK_WAIT) as locked:
        try:
            entry = spool.load(queue_id) if locked else None
        except Damaged as exc:
            print(f"{queue_id}: damaged, cannot be changed: {exc}")
            return 1
        if entry is None:
            print(f"{queue_id}: no such message (or it is being delivered)")
            return 1
        if entry.held == hold:
            print(f"{queue_id}: already {'held' if hold else 'not held'}")
            return 0
        entry.held = hold
        if hold:
            entry.held_since = time.time()
            entry.hold_reason = "held by the operator"
            entry.hold_rules = ["operator.hold"]
        else:
            entry.next_attempt = 0.0
        spool.save(entry)
    if hold:
        print(f"{queue_id}: held")
    else:
        spool.request_flush()
        print(f"{queue_id}: released (a running gateway delivers it now)")
    return 0


def queue_hold(spool: Spool, queue_id: str) -> int:
    """Quarantine a queued message; exit 1 if there is no such message."""
    return _change(spool, queue_id, hold=True)


def queue_release(spool: Spool, queue_id: str) -> int:
    """Let a held message go, as it is: delivered now by a running gateway."""
    return _change(spool, queue_id, hold=False)


def queue_show(spool: Spool, queue_id: str, raw: bool = False) -> int:
    """Print a message's envelope, verdicts and headers (``raw``: the whole message)."""
    if not _valid(queue_id):
        return 1
    try:
        entry = spool.load(queue_id)
    except Damaged as exc:
        print(f"{queue_id}: damaged: {exc}")
        return 1
    if entry is None:
        print(f"{queue_id}: no such message")
        return 1
    try:
        message = spool.message(queue_id)
    except OSError as exc:
        print(f"{queue_id}: the message cannot be read: {exc}")
        return 1
    if raw:
        sys.stdout.flush()
        sys.stdout.buffer.write(message)
        sys.stdout.buffer.flush()
        return 0
    client = entry.client or {}
    print(f"id: {entry.id}")
    print(f"state: {'held' if entry.held else 'queued'}")
    print(f"from: <{entry.sender}>")
    print(f"to: {', '.join(f'<{r}>' for r in entry.recipients)}")
    print(f"arrived: {_when(entry.created)}")
    print(f"client: {client.get('addr', '-')} helo={client.get('helo', '-')}")
    print(f"size: {entry.size} sha256: {entry.digest or '-'}")
    print(f"attempts: {entry.attempts} next: {_when(entry.next_attempt)}")
    if entry.last_error:
        print(f"last error: {entry.last_error}")
    print(f"dsn allowed: {'yes' if entry.verified else 'no (sender not verified)'}")
    if entry.held:
        print(f"held since: {_when(entry.held_since)}")
        print(f"hold rules: {', '.join(entry.hold_rules)}")
        print(f"hold reason: {entry.hold_reason}")
    print(f"verdicts: {' '.join(entry.verdicts) or '-'}")
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 2]
    print("headers:")
    for line in head.decode("utf-8", "replace").splitlines():
        print(f"  {line}")
    return 0


def run(policy: Policy, args: argparse.Namespace) -> int:
    """Run the ``queue`` subcommand named in ``args.action``."""
    spool = Spool(policy.queue.directory)
    action = args.action
    if action == "list":
        return queue_list(spool, held_only=args.held)
    if action == "flush":
        return queue_flush(spool)
    if action == "show":
        return queue_show(spool, args.id, raw=args.raw)
    handlers = {"delete": queue_delete, "hold": queue_hold, "release": queue_release}
    return handlers[action](spool, args.id)
