"""Log output: ``key=value`` text lines (the default) or one JSON object per line.

``log: {format: json}`` in the policy switches every line mailgate writes to
JSON: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg`` and, on the
decision line, every decision field as its own key (``txn``, ``client``,
``outcome``, ``verdicts`` ...). ``log.level`` sets the level of mailgate's own
loggers (``mailgate.*``); ``debug`` adds one line per verdict. Libraries keep
their own levels, and aiosmtpd's per-command log (the recording upstream of
``mailgate.testing``) stays at warning.

Message bodies, header values and policy values never reach a log line: the
core logs only envelope data, rule ids, reasons and replies.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

from mailgate.policy import Logging

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
HANDLER_NAME = "mailgate"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time, not the one at install time.

    Test runners and embedding programs swap ``sys.stderr``; a handler bound to
    the old stream would write to a closed file.
    """

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the decision fields as top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line of JSON."""
        entry: dict[str, object] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        decision = getattr(record, "decision", None)
        if isinstance(decision, dict):
            for key, value in decision.items():
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(config: Logging, install: bool = True) -> None:
    """Apply the policy's ``log`` section (at start and again on every reload).

    Installs mailgate's handler on the root logger (standard error) the first
    time; later calls only change its format and mailgate's level. With
    ``install=False`` (a reload in a process whose logging someone else set up,
    such as a test run) no handler is added.
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.name == HANDLER_NAME), None)
    if handler is None:
        if not install:
            logging.getLogger("mailgate").setLevel(config.level.upper())
            return
        handler = _StderrHandler()
        handler.name = HANDLER_NAME
        root.addHandler(handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
    handler.setFormatter(
        JsonFormatter() if config.format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.getLogger("mailgate").setLevel(config.level.upper())
    # aiosmtpd (plugins' test servers) logs every command line at INFO.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
