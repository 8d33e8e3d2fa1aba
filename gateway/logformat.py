"""Log output: where it goes (stderr, syslog, a file) and how (``key=value`` text or JSON).

The policy's ``log:`` section (``mailgate.policy.Logging``) decides, for every
line the process writes (mailgate's and its libraries'):

- ``target: stderr`` (the default: systemd's journal, containers),
  ``syslog`` (facility ``mail`` by default, as Postfix logs; to ``/dev/log``
  or a ``HOST:PORT`` over UDP; each line tagged ``mailgate[PID]:``) or
  ``file`` (``file: PATH``, reopened when logrotate moves it away, so no
  ``copytruncate`` and no signal are needed);
- ``format: text``: ``TIME LEVEL LOGGER: MESSAGE`` (no time on syslog, which
  adds its own), every ``key=value`` field quoted one way
  (``mailgate.logfields``); ``format: json``: one JSON object per line with
  ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg`` and every field of the
  line as its own key (the decision line's ``txn``, ``client``, ``outcome``,
  ``verdicts`` ...; a queue line's ``id``, ``size`` ...), plus ``exc`` for a
  traceback;
- with ``workers: N``, a worker's text lines start with ``workerN[PID]``; its
  JSON lines have ``worker`` (N) and ``pid`` keys instead (:func:`label_worker`);
- ``level`` sets the level of mailgate's own loggers (``mailgate.*``);
  ``debug`` adds one line per verdict. Libraries keep their own levels, and
  aiosmtpd's per-command log (the recording upstream of ``mailgate.testing``)
  stays at warning.

Message bodies, header values and policy values never reach a log line: the
core logs only envelope data, rule ids, reasons and replies.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
import sys
import time

from mailgate.logfields import json_value, structure
from mailgate.policy import Logging, split_host_port

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SYSLOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
HANDLER_NAME = "mailgate"
SYSLOG_PORT = 514


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


class _SyslogHandler(logging.handlers.SysLogHandler):
    """Syslog, each message tagged ``mailgate[PID]:`` (the pid of the worker that wrote it)."""

    def format(self, record: logging.LogRecord) -> str:
        """The formatted line after the tag (the pid is read each time: workers fork)."""
        return f"mailgate[{os.getpid()}]: {super().format(record)}"


WORKER_ATTR = "mailgate_worker"
"""The LogRecord attribute holding (worker index, pid) in a worker process."""


def label_worker(index: int) -> None:
    """Mark every record this (forked worker) process creates as worker ``index``'s.

    A record factory rather than a handler filter, so that the label survives a
    reload that opens a new log target.
    """
    label = (index, os.getpid())
    make = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make(*args, **kwargs)
        setattr(record, WORKER_ATTR, label)
        return record

    logging.setLogRecordFactory(factory)


def _worker(record: logging.LogRecord) -> tuple[int, int] | None:
    label = getattr(record, WORKER_ATTR, None)
    return label if isinstance(label, tuple) else None


class TextFormatter(logging.Formatter):
    """``key=value`` text: the line's fields quoted by the one rule of ``mailgate.logfields``."""

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """As ``logging.Formatter``'s, the date and time part rendered once per second."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached, stamp = self._second
        if cached != second:
            stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (second, stamp)
        msec = self.default_msec_format
        return msec % (stamp, record.msecs) if msec else stamp

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` with its field values quoted."""
        message, _ = structure(record)
        if (worker := _worker(record)) is not None:
            message = f"worker{worker[0]}[{worker[1]}] {message}"
        saved = record.msg, record.args
        record.msg, record.args = message, None
        try:
            return super().format(record)
        finally:
            record.msg, record.args = saved


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the line's fields as top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line of JSON."""
        message, fields = structure(record)
        entry: dict[str, object] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
        }
        if (worker := _worker(record)) is not None:
            entry["worker"], entry["pid"] = worker
        for key, value in fields.items():
            entry.setdefault(key, json_value(value))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def _target(config: Logging) -> tuple[str, ...]:
    if config.target == "file":
        return ("file", os.path.abspath(config.file or ""))
    if config.target == "syslog":
        return ("syslog", config.syslog_address, config.syslog_facility)
    return ("stderr",)


def _open(config: Logging) -> logging.Handler:
    """A new handler for the policy's target; raises OSError when it cannot be opened."""
    if config.target == "file":
        assert config.file is not None  # the policy model requires it
        return logging.handlers.WatchedFileHandler(config.file, encoding="utf-8")
    if config.target == "syslog":
        facility = logging.handlers.SysLogHandler.facility_names[config.syslog_facility]
        address = config.syslog_address
        if address.startswith("/"):
            handler = _SyslogHandler(address, facility)
            sock = getattr(handler, "socket", None)
            if sock is None or sock.fileno() < 0:
                # The stdlib ignores this here, then fails on every line.
                handler.close()
                raise OSError(f"cannot reach syslog at {address} (is a syslog daemon running?)")
            return handler
        return _SyslogHandler(split_host_port(address, SYSLOG_PORT), facility)
    return _StderrHandler()


def configure_logging(config: Logging, install: bool = True) -> None:
    """Apply the policy's ``log`` section (at start and again on every reload).

    Installs mailgate's handler on the root logger the first time; later calls
    change its format and mailgate's level, and open the new target if it
    changed (the old one is closed). With ``install=False`` (a reload in a
    process whose logging someone else set up, such as a test run) no handler
    is added.

    :raises OSError: the target cannot be opened; the previous one stays.
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.name == HANDLER_NAME), None)
    if handler is None and not install:
        logging.getLogger("mailgate").setLevel(config.level.upper())
        return
    target = _target(config)
    if handler is None or getattr(handler, "mailgate_target", None) != target:
        new = _open(config)
        new.name = HANDLER_NAME
        new.mailgate_target = target  # type: ignore[attr-defined]
        root.addHandler(new)
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
        handler = new
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            TextFormatter(SYSLOG_FORMAT if config.target == "syslog" else TEXT_FORMAT)
        )
    logging.getLogger("mailgate").setLevel(config.level.upper())
    # aiosmtpd (plugins' test servers) logs every command line at INFO.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
