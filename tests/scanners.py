"""Real rspamd, spamd and clamd on free loopback ports, started and stopped by the tests.

Each daemon runs as a private instance in a temporary folder of the test
session: its own config (written below), no network modules, DNS pointed at
a dead loopback port, logs in the folder. The fixtures are session-scoped
(rspamd's first start compiles tables into its DB folder for ~9 s; later
starts in the same session reuse it), install nothing, and stop what they
started. A missing binary is a skip outside CI and a failure under CI
(``.ci/run`` installs the Debian packages).

Daemons that drop privileges (rspamd refuses to run workers as root) get their
folders chowned to their Debian users when the tests run as root.

Also here: :class:`FakeScanner`, a tiny loopback socket server that answers
whatever bytes a test gives (or nothing, or closes mid-reply), for the failure
cases a real daemon will not produce on demand.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ops_support import need_binary
from tests.redis_support import free_port
from tests.tcpserver import LoopbackTcpServer

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
EICAR = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_SIGNATURE = "Local.EICAR.HDB"
START_TIMEOUT = 60.0

RSPAMD_DISABLED = [
    "rbl", "surbl", "fuzzy_check", "spf", "dkim", "dmarc", "arc", "asn", "emails", "mx_check",
    "phishing", "neural", "ratelimit", "greylist", "replies", "reputation", "url_redirector",
    "history_redis", "dcc", "bimi", "rspamd_update", "whitelist", "hfilter", "dkim_signing",
]  # fmt: skip

RSPAMD_ACTIONS = ("reject", "soft reject", "greylist", "add header", "rewrite subject")


def _settings(action: str) -> str:
    others = "; ".join(f'"{a}" = null' for a in RSPAMD_ACTIONS if a != action)
    slug = action.replace(" ", "_")
    actions = f'{others}; "{action}" = -100;'
    return f'mg_{slug} {{ id = "mg_{slug}"; apply {{ actions {{ {actions} }} }} }}\n'


# rspamd has no score threshold for "soft reject": a header asks for it.
_RSPAMD_LUA = """
rspamd_config:register_symbol({
  name = 'MG_SOFT_REJECT', type = 'prefilter', priority = 10,
  callback = function(task)
    if task:get_header('X-Test-Soft-Reject') then
      task:set_pre_result('soft reject', 'Test soft reject, try later', 'mailgate-tests')
    end
  end,
})
"""

# Settings-IDs that make every message get one action: mg_add_header, mg_greylist, ...
_RSPAMD_SETTINGS = "".join(_settings(a) for a in RSPAMD_ACTIONS)


def _chown(user: str, *paths: Path) -> None:
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    for path in paths:
        for root, dirs, files in os.walk(path):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.chown(name, entry.pw_uid, entry.pw_gid)


def _wait(
    check: Callable[[], bool], process: subprocess.Popen[bytes], what: str, log: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not check():
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process)
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{what} did not start:\n{tail}")
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes], pid: int | None = None) -> None:
    for target in {process.pid, pid or process.pid}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def _exchange(port: int, data: bytes, until: bytes, timeout: float = 1.0) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(data)
            got = b""
            while until not in got:
                more = sock.recv(4096)
                if not more:
                    break
                got += more
            return got
    except OSError:
        return b""


class Daemon:
    """A started daemon: its address and how to stop it."""

    def __init__(self, name: str, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.port = port
        self.process = process
        self.log = log
        self.pid: int | None = None
        self.socket: Path | None = None
        """The daemon's unix socket, when it listens on one too."""

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, as a plugin's ``servers`` takes it."""
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """SIGTERM and wait."""
        _stop(self.process, self.pid)


@dataclass(frozen=True)
class Setup:
    """A daemon ready to start: its command, port, readiness check and log file."""

    name: str
    argv: list[str]
    port: int
    ready: Callable[[], bool]
    log: Path


def rspamd_setup(root: Path, binary: str = "rspamd") -> Setup:
    """Write a private rspamd config under ``root``: one normal worker, a free port and a socket.

    The worker also listens on the unix socket ``root/run/normal.sock`` (a
    folder ``_rspamd`` owns, as rspamd removes and re-creates it).

    ``root/db`` keeps the tables rspamd compiles on its first start (~9 s); a
    later start with the same ``root`` takes under a second.
    """
    port, dead = free_port(), free_port()
    local, db, run, logs = (root / n for n in ("local.d", "db", "run", "log"))
    for folder in (local, db, run, logs):
        folder.mkdir(parents=True, exist_ok=True)
    (local / "options.inc").write_text(
        f'dns {{ nameserver = ["127.0.0.1:{dead}"]; timeout = 0.2s; retransmits = 1; }}\n'
        'control_socket = "$DBDIR/rspamd.sock mode=0600";\n'
    )
    (local / "settings.conf").write_text(_RSPAMD_SETTINGS)
    (root / "rspamd.local.lua").write_text(_RSPAMD_LUA)
    for module in RSPAMD_DISABLED:
        (local / f"{module}.conf").write_text("enabled = false;\n")
    conf = root / "rspamd.conf"
    conf.write_text(
        '.include "$CONFDIR/common.conf"\n'
        'options {\n  pidfile = "$RUNDIR/rspamd.pid";\n  .include "$CONFDIR/options.inc"\n'
        '  .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"\n}\n'
        'logging { type = "file"; filename = "$LOGDIR/rspamd.log"; level = "warning"; }\n'
        f'worker "normal" {{\n  bind_socket = "127.0.0.1:{port}";\n'
        f'  bind_socket = "{run}/normal.sock mode=0666";\n'
        '  .include "$CONFDIR/worker-normal.inc"\n  count = 1;\n}\n'
    )
    _chown("_rspamd", db, run, logs)
    argv = [binary, "-f", "-u", "_rspamd", "-g", "_rspamd", "-c", str(conf),
            f"--var=LOCAL_CONFDIR={root}", f"--var=DBDIR={db}", f"--var=RUNDIR={run}",
            f"--var=LOGDIR={logs}"]  # fmt: skip
    ping = b"GET /ping HTTP/1.0\r\n\r\n"
    sock = run / "normal.sock"
    ready = lambda: sock.is_socket() and b"pong" in _exchange(port, ping, b"pong")  # noqa: E731
    return Setup("rspamd", argv, port, ready, logs / "rspamd.log")


def clamd_setup(root: Path, binary: str = "clamd") -> Setup:
    """Write a private clamd config under ``root``: EICAR as ``Local.EICAR.HDB``, TCP and unix."""
    port = free_port()
    db, tmp = root / "db", root / "tmp"
    for folder in (db, tmp):
        folder.mkdir(parents=True, exist_ok=True)
    (db / "local.hdb").write_text(f"44d88612fea8a8f36de82e1278abb02f:68:{EICAR_SIGNATURE}\n")
    log = root / "clamd.log"
    conf = root / "clamd.conf"
    user = "User clamav\n" if os.geteuid() == 0 else ""
    conf.write_text(
        f"Foreground yes\nDatabaseDirectory {db}\nTCPSocket {port}\nTCPAddr 127.0.0.1\n"
        f"LocalSocket {root}/clamd.sock\n"
        f"PidFile {root}/clamd.pid\nLogFile {log}\nTemporaryDirectory {tmp}\n{user}"
        "MaxThreads 2\nStreamMaxLength 25M\nScanMail yes\n"
    )
    _chown("clamav", root)
    ready = lambda: _exchange(port, b"zPING\0", b"\0") == b"PONG\0"  # noqa: E731
    return Setup("clamd", [binary, "-c", str(conf)], port, ready, log)


def _start(make: Callable[[], Setup], attempts: int = 3) -> Daemon:
    """Start the daemon ``make`` sets up; try again on fresh ports if it does not come up.

    A port found free can be taken by another program before the daemon binds
    it (the machine is shared): that is the failure a retry cures.
    """
    for attempt in range(1, attempts + 1):
        setup = make()
        output = setup.log.parent / f"{setup.name}.output"
        with open(output, "ab") as sink:
            process = subprocess.Popen(
                setup.argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            _wait(setup.ready, process, setup.name, setup.log)
        except RuntimeError as exc:
            if attempt == attempts:
                said = output.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{exc}\n{setup.name} said:\n{said}") from None
            continue
        return Daemon(setup.name, setup.port, process, setup.log)
    raise AssertionError("unreachable")


def start_rspamd(root: Path) -> Daemon:
    """rspamd with one normal worker on a free port and ``root/run/normal.sock``.

    ``root/db`` keeps its compiled tables.
    """
    binary = need_binary("rspamd", "rspamd")
    daemon = _start(lambda: rspamd_setup(root, binary))
    daemon.socket = root / "run" / "normal.sock"
    return daemon


def spamd_setup(root: Path, binary: str = "spamd") -> Setup:
    """Write a private SpamAssassin site config under ``root``: no network tests, no Bayes.

    One spamd listens on a free port and on the unix socket ``root/spamd.sock``
    (``--listen`` may be given twice; ``root`` belongs to ``debian-spamd``).
    """
    port = free_port()
    site, home = root / "site", root / "home"
    for folder in (site, home):
        folder.mkdir(parents=True, exist_ok=True)
    for pre in Path("/etc/spamassassin").glob("*.pre"):
        shutil.copy(pre, site)
    (site / "local.cf").write_text(
        "use_bayes 0\nbayes_auto_learn 0\ndns_available no\nskip_rbl_checks 1\n"
        "use_razor2 0\nuse_pyzor 0\nreport_safe 0\nrequired_score 5.0\n"
    )
    user = ["-u", "debian-spamd"] if os.geteuid() == 0 else []
    _chown("debian-spamd", home, root)
    argv = [binary, f"--listen=127.0.0.1:{port}", f"--listen={root}/spamd.sock",
            "-C", "/usr/share/spamassassin", f"--siteconfigpath={site}", *user, "-x", "-L",
            "-H", str(home), "-r", str(root / "spamd.pid"), "-s", str(root / "spamd.log"),
            "--min-children=1", "--max-children=1", "--min-spare=1", "--max-spare=1"]  # fmt: skip
    ping = b"PING SPAMC/1.5\r\n\r\n"
    sock = root / "spamd.sock"
    ready = lambda: sock.is_socket() and b"PONG" in _exchange(port, ping, b"PONG")  # noqa: E731
    return Setup("spamd", argv, port, ready, root / "spamd.log")


def start_spamd(root: Path) -> Daemon:
    """spamd with one child on a free port and ``root/spamd.sock``; GTUBE built in."""
    binary = need_binary("spamd", "spamd")
    daemon = _start(lambda: spamd_setup(root, binary))
    daemon.socket = root / "spamd.sock"
    pidfile = root / "spamd.pid"
    if pidfile.exists():
        daemon.pid = int(pidfile.read_text().split()[0])
    return daemon


def start_clamd(root: Path) -> Daemon:
    """clamd with one hash signature: the 68-byte EICAR test string as ``Local.EICAR.HDB``."""
    binary = need_binary("clamd", "clamav-daemon")
    daemon = _start(lambda: clamd_setup(root, binary))
    daemon.socket = root / "clamd.sock"
    return daemon


@pytest.fixture(scope="session")
def scanner_root() -> Iterator[Path]:
    """One folder for every daemon of the test session (rspamd's DB folder lives here)."""
    root = Path(tempfile.mkdtemp(prefix="mailgate-scanners-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def rspamd(scanner_root: Path) -> Iterator[Daemon]:
    """A private rspamd (normal worker) on a free loopback port and a unix socket."""
    daemon = start_rspamd(scanner_root / "rspamd")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def spamd(scanner_root: Path) -> Iterator[Daemon]:
    """A private spamd on a free loopback port and a unix socket."""
    daemon = start_spamd(scanner_root / "spamd")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def clamd(scanner_root: Path) -> Iterator[Daemon]:
    """A private clamd on a free loopback port (and a unix socket) with the EICAR signature."""
    daemon = start_clamd(scanner_root / "clamd")
    yield daemon
    daemon.stop()


class FakeScanner(LoopbackTcpServer):
    """A loopback TCP server that reads a request and answers ``reply`` (or nothing).

    ``mode``: ``answer`` (send ``reply``, close), ``silent`` (read, never answer),
    ``cut`` (send ``reply`` then close: give it a truncated reply). It reads until
    ``request_end`` appears (or the client stops sending) before answering.
    """

    def __init__(self, reply: bytes = b"", mode: str = "answer", request_end: bytes = b"") -> None:
        self.reply = reply
        self.mode = mode
        self.request_end = request_end
        self.requests: list[bytes] = []
        super().__init__()

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def handle(self, conn: socket.socket) -> None:
        """Read the request, then answer as ``mode`` says."""
        conn.settimeout(0.5)
        got = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not self._stopping.is_set():
            if self.request_end and self.request_end in got:
                break
            try:
                more = conn.recv(65536)
            except TimeoutError:
                if got and not self.request_end:
                    break
                continue
            except OSError:
                return
            if not more:
                break
            got += more
        self.requests.append(got)
        if self.mode == "silent":
            self._stopping.wait(30)
        else:
            with contextlib.suppress(OSError):
                conn.sendall(self.reply)
        with contextlib.suppress(OSError):
            conn.close()


@pytest.fixture
def fake_scanner() -> Iterator[type[FakeScanner]]:
    """Make :class:`FakeScanner` servers; every one is stopped after the test."""
    made: list[FakeScanner] = []

    class Made(FakeScanner):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    yield Made
    for server in made:
        server.stop()
