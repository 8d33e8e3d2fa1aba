"""``mailgate queue list | flush | delete ID``: look at and manage the spool.

These work on the spool folder of the policy given with ``-c``, whether or not
a gateway is running; they take each message's lock, so they never race a
delivery in progress (they wait up to 10 seconds for it).
"""

from __future__ import annotations

import argparse
import time

from mailgate.policy import Policy
from mailgate.queue.spool import ID_PATTERN, Spool

_LOCK_WAIT = 10.0


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "now"


def queue_list(spool: Spool) -> int:
    """Print one block per queued message; exit 0."""
    count = 0
    for queue_id in spool.ids():
        entry = spool.load(queue_id)
        if entry is None:
            continue
        count += 1
        print(
            f"{entry.id}  {entry.size:>9}  {_when(entry.created)}  <{entry.sender}>"
            f"  attempts={entry.attempts} next={_when(entry.next_attempt)}"
        )
        for rcpt in entry.recipients:
            print(f"    <{rcpt}>")
        if entry.last_error:
            print(f"    last error: {entry.last_error}")
    print(f"-- {count} message(s) in {spool.queue_dir}")
    return 0


def queue_flush(spool: Spool) -> int:
    """Make every message due now and tell running gateways; exit 0."""
    for queue_id in spool.ids():
        with spool.lock(queue_id, wait=_LOCK_WAIT) as locked:
            entry = spool.load(queue_id) if locked else None
            if entry is not None:
                entry.next_attempt = 0.0
                spool.save(entry)
    spool.request_flush()
    print("flush requested")
    return 0


def queue_delete(spool: Spool, queue_id: str) -> int:
    """Delete one message without a DSN; exit 1 if there is no such message or it is busy."""
    if not ID_PATTERN.match(queue_id):
        print(f"not a queue id: {queue_id!r}")
        return 1
    with spool.lock(queue_id, wait=_LOCK_WAIT) as locked:
        if not locked or spool.load(queue_id) is None:
            print(f"{queue_id}: no such message (or it is being delivered)")
            return 1
        spool.remove(queue_id)
    print(f"{queue_id}: deleted")
    return 0


def run(policy: Policy, args: argparse.Namespace) -> int:
    """Run the ``queue`` subcommand named in ``args.action``."""
    spool = Spool(policy.queue.directory)
    if args.action == "list":
        return queue_list(spool)
    if args.action == "flush":
        return queue_flush(spool)
    if not args.id:
        print("queue delete needs a queue id")
        return 1
    return queue_delete(spool, args.id)
