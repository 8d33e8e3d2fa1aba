"""Queue mode (``delivery: queue``): a durable spool, delivery by route, retries and DSNs.

- ``spool``: the on-disk format (fsync of file and folder before 250, locks);
- ``delivery``: ``QueueUpstream``, the session's upstream, and its delivery tasks;
- ``dsn``: RFC 3464 delivery status notifications;
- ``admin``: ``mailgate queue list | flush | delete ID``.
"""

from mailgate.queue.delivery import QueueUpstream, route_key
from mailgate.queue.spool import Entry, Spool

__all__ = ["Entry", "QueueUpstream", "Spool", "route_key"]
