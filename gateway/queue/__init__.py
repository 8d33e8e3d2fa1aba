"""Queue mode (``delivery: queue``) and quarantine: lockstep handoff, a durable spool, delivery.

- ``handoff``: ``QueueTransaction``, the session's side: lockstep with the upstream
  while it answers, the spool otherwise; the refusal cache; the DSN rule;
- ``spool``: the on-disk format (fsync of file and folder before 250, locks,
  length and digest checks, ``corrupt/``);
- ``delivery``: ``QueueUpstream``, the session's upstream, and its delivery tasks;
- ``quarantine``: which verdicts hold a message;
- ``dsn``: RFC 3464 delivery status notifications;
- ``admin``: ``mailgate queue list | show | hold | release | delete | flush``.
"""

from mailgate.queue.delivery import QueueUpstream
from mailgate.queue.handoff import route_key
from mailgate.queue.spool import Entry, Spool

__all__ = ["Entry", "QueueUpstream", "Spool", "route_key"]
