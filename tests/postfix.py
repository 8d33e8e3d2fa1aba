"""A private Postfix instance on a loopback port, for XCLIENT/XFORWARD tests against the real thing.

Needs Debian's ``postfix`` package (``.ci/run`` installs it with "No
configuration", so nothing listens on port 25) and root. The instance has its
own config, queue and log folders under /tmp, listens on 127.0.0.1:PORT only,
trusts 127.0.0.0/8 for XCLIENT and XFORWARD, accepts mail for ``example.com``
from anyone (access rules apply to the client XCLIENT names) and relays it to
``relay_port`` (a recording upstream), so a test can read the Received header
Postfix wrote. ``postfix start-fg`` keeps the master process a child of ours;
``postfix stop`` ends it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MASTER_CF = """\
{port} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = example.com
smtpd_authorized_xclient_hosts = 127.0.0.0/8
smtpd_authorized_xforward_hosts = 127.0.0.0/8
smtpd_client_restrictions = check_client_access cidr:{root}/conf/clients.cidr
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = [127.0.0.1]:{relay_port}
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_peername_lookup = no
alias_maps =
alias_database =
local_recipient_maps =
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
queue_run_delay = 1s
"""


def available() -> str | None:
    """Why a private Postfix cannot run here, or None if it can."""
    if shutil.which("postfix") is None:
        return "postfix is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostfixServer:
    """Postfix on 127.0.0.1:``port``, relaying to 127.0.0.1:``relay_port``."""

    def __init__(self, relay_port: int, refused_clients: tuple[str, ...] = ()) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mailgate-postfix-", dir="/tmp"))
        self.root.chmod(0o755)
        self.port = _free_port()
        conf = self.root / "conf"
        for sub in ("conf", "queue", "data"):
            (self.root / sub).mkdir()
        shutil.chown(self.root / "data", "postfix")
        (conf / "main.cf").write_text(MAIN_CF.format(root=self.root, relay_port=relay_port))
        (conf / "master.cf").write_text(MASTER_CF.format(port=f"127.0.0.1:{self.port}"))
        rules = "".join(f"{cidr} REJECT client refused by Postfix\n" for cidr in refused_clients)
        (conf / "clients.cidr").write_text(rules)
        self.conf = str(conf)
        self.process = subprocess.Popen(
            ["postfix", "-c", self.conf, "start-fg"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postfix exited ({self.process.returncode}):\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(100).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"postfix did not start listening:\n{self.log()}")

    @property
    def url(self) -> str:
        """The ``smtp://`` URL for the gateway's upstream."""
        return f"smtp://127.0.0.1:{self.port}"

    def log(self) -> str:
        """Postfix's own log so far."""
        try:
            return (self.root / "maillog").read_text()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Stop the instance and remove its folders."""
        subprocess.run(["postfix", "-c", self.conf, "stop"], capture_output=True, timeout=60)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
