"""Helpers for the operator-tool tests: polling, scraping /metrics, a gateway subprocess."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent


def need_binary(name: str, package: str = "") -> str:
    """The path of the program ``name`` (on ``PATH``, or in /usr/sbin or /usr/bin), else skip
    the test; under CI (``$CI`` set, where ``.ci/run`` installs it) fail it instead."""
    found = shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/usr/bin") if os.path.exists(p := f"{d}/{name}")), None
    )
    if found is None:
        install = f"apt-get install {package}; " if package else ""
        reason = f"{name} is not installed ({install}.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def policy_file(tmp_path: Path, **keys: Any) -> Path:
    """``tmp_path/policy.yaml`` for a CLI command: ``hostname: mailgate.test``,
    ``domains: [example.com]`` and ``keys``."""
    data = {"hostname": "mailgate.test", "domains": ["example.com"], **keys}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def wait_until(predicate: Callable[[], Any], timeout: float = 30) -> bool:
    """Poll ``predicate`` every 50 ms until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def http_get(port: int, path: str, timeout: float = 10, host: str = "127.0.0.1") -> tuple[int, str]:
    """GET ``http://HOST:PORT/PATH``: the status and the body."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int, host: str = "127.0.0.1") -> Samples:
    """Every sample of ``/metrics``, keyed by (sample name, labels)."""
    status, text = http_get(port, "/metrics", host=host)
    assert status == 200, text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when it does not exist (a counter never incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def mailgate(*args: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mailgate ARGS`` in the repository and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "mailgate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


class GatewayProcess:
    """``mailgate run`` as a subprocess, its standard output and error written to a file.

    The file is appended to, so a gateway restarted on the same file keeps the
    earlier run's lines; :attr:`log` is this run's part. With ``ready=False``
    (a policy whose log goes to syslog or a file) the start is not waited for.
    """

    def __init__(self, policy: Path, log_path: Path, *extra: str, ready: bool = True) -> None:
        self.log_path = log_path
        self._offset = log_path.stat().st_size if log_path.exists() else 0
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailgate", "run", "-c", str(policy), *extra],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.port = 0
        if ready:
            started = wait_until(
                lambda: "mailgate ready on" in self.log or self.proc.poll() is not None, 60
            )
            found = re.search(r"mailgate ready on 127\.0\.0\.1:(\d+)", self.log)
            assert started and found, self.log
            self.port = int(found.group(1))

    @property
    def log(self) -> str:
        """Everything this run logged so far."""
        return self.log_path.read_bytes()[self._offset :].decode(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the gateway."""
        os.kill(self.proc.pid, sig)

    def wait_log(self, text: str, timeout: float = 30) -> bool:
        """Wait until ``text`` appears in the log."""
        return wait_until(lambda: text in self.log, timeout)

    def kill(self) -> None:
        """SIGKILL (no cleanup, no flush) and wait."""
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> int:
        """SIGTERM, wait (kill after 30 s), close the log; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode
