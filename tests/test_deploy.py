"""The deployment files: the Dockerfile's steps run in a virtualenv, the systemd unit verified.

No Docker daemon is needed: the Dockerfile is read instruction by
instruction and carried out under a temporary root folder. Its COPY lines
fill the build context (so a file the image needs but does not copy shows
up), its install RUN line runs as written (``python -m venv`` and ``pip
install`` of the copied sources, with its dependencies from the package
index), then its CMD starts the gateway on the image's policy, from the
image's WORKDIR, and its HEALTHCHECK command must pass. The only change to
what the image does: the policy's two ports become free loopback ports.

The unit file goes through ``systemd-analyze verify`` (where installed) with
its program path pointed at this mailgate, and its check command runs.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import smtplib
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.ops_support import http_get, wait_until
from tests.redis_support import free_port
from tests.support import MESSAGE

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
UNIT = REPO / "deploy" / "mailgate.service"
CONTAINER_POLICY = REPO / "deploy" / "container.yaml"
DEFAULT_POLICY = REPO / "policies" / "default.yaml"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
    ))  # fmt: skip
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), " ".join(rest.split())))
    return out


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD (after any ``--option=value`` flags)."""
    start = args.index("[")
    value: list[str] = json.loads(args[start:])
    return value


def test_the_dockerfile_is_small_non_root_with_a_health_check():
    steps = instructions(DOCKERFILE)
    kinds = [kind for kind, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert kinds.count("FROM") == 1
    user = next(args for kind, args in steps if kind == "USER")
    assert user not in ("root", "0")
    assert kinds.index("USER") < kinds.index("CMD")
    # The unprivileged user's home is the WORKDIR, where the Maildir goes.
    useradd = next(args for kind, args in steps if kind == "RUN" and "useradd" in args)
    workdir = [args for kind, args in steps if kind == "WORKDIR"][-1]
    assert f"--home-dir {workdir}" in useradd and "--create-home" in useradd
    assert useradd.split()[-1] == user
    health = next(args for kind, args in steps if kind == "HEALTHCHECK")
    assert "/health" in health
    policy = yaml.safe_load(CONTAINER_POLICY.read_text())
    assert f":{policy['metrics'].rpartition(':')[2]}/health" in health
    assert ("COPY", f"deploy/container.yaml {exec_form(dict(steps)['CMD'])[-1]}") in steps


def test_the_container_policy_is_the_default_policy_listening_in_the_container():
    default = yaml.safe_load(DEFAULT_POLICY.read_text())
    container = yaml.safe_load(CONTAINER_POLICY.read_text())
    assert container.pop("listen") == [{"address": "0.0.0.0:2525"}]
    assert container.pop("metrics") == "0.0.0.0:9125"
    assert default.pop("listen") == [{"address": "127.0.0.1:2525"}]
    assert "metrics" not in default
    assert container == default


class Image:
    """The Dockerfile carried out under ``root``: paths like /opt/x become ROOT/opt/x."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": str(Path.home()),
        }
        self.workdir = root
        self.cmd: list[str] = []
        self.healthcheck: list[str] = []

    def path(self, text: str) -> str:
        """Every absolute path in ``text`` moved under the root."""
        return re.sub(r"(?<![\w.$/:-])/(?=[\w.-])", f"{self.root}/", text)

    def copy(self, args: str) -> None:
        *sources, dest = args.split()
        target = Path(self.path(dest))
        for source in sources:
            src = REPO / source
            to = target / src.name if dest.endswith("/") else target
            to.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, to, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, to)

    def set_env(self, args: str) -> None:
        for name, value in (item.split("=", 1) for item in shlex.split(args)):
            self.env[name] = self.path(value).replace("$PATH", self.env["PATH"])

    def run(self, command: str) -> None:
        result = subprocess.run(
            ["bash", "-euc", self.path(command)],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, f"RUN {command}\n{result.stdout}\n{result.stderr}"

    def build(self) -> None:
        for kind, args in instructions(DOCKERFILE):
            if kind == "COPY":
                self.copy(args)
            elif kind == "ENV":
                self.set_env(args)
            elif kind == "WORKDIR":
                self.workdir = Path(self.path(args))
                self.workdir.mkdir(parents=True, exist_ok=True)
            elif kind == "RUN" and "pip install" in args:
                self.run(args)
            elif kind == "CMD":
                self.cmd = [self.path(arg) for arg in exec_form(args)]
            elif kind == "HEALTHCHECK":
                self.healthcheck = exec_form(args)
            # FROM, USER, VOLUME, EXPOSE, STOPSIGNAL and the useradd RUN need a container.


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    built = Image(tmp_path_factory.mktemp("image"))
    built.build()
    yield built


@pytest.mark.timeout(600)  # the first one installs the image's dependencies
def test_the_dockerfile_installs_a_working_mailgate(image: Image):
    venv_python = image.root / "opt" / "mailgate" / "bin" / "python"
    where = subprocess.run(
        [venv_python, "-c", "import mailgate; print(mailgate.__file__)"],
        capture_output=True, text=True, timeout=60, check=True, cwd=image.workdir,
    ).stdout  # fmt: skip
    assert where.startswith(str(image.root / "opt" / "mailgate")), where
    assert not (image.root / "src").exists()  # the RUN line cleans up after itself
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    answer = subprocess.run(
        ["mailgate", "--version"], env=image.env, capture_output=True, text=True, timeout=60
    )
    assert answer.stdout == f"mailgate {version}\n", answer


@pytest.mark.timeout(600)  # the first one installs the image's dependencies
def test_the_dockerfile_cmd_serves_mail_and_passes_its_healthcheck(image: Image):
    policy = Path(image.cmd[-1])
    smtp, metrics = free_port(), free_port()
    text = policy.read_text()
    for old, new in (
        ("0.0.0.0:2525", f"127.0.0.1:{smtp}"),
        ("0.0.0.0:9125", f"127.0.0.1:{metrics}"),
    ):
        assert old in text
        text = text.replace(old, new)
    policy.write_text(text)
    health = [arg.replace(":9125/", f":{metrics}/") for arg in image.healthcheck]
    log = image.root / "gateway.log"
    with log.open("wb") as out:
        gateway = subprocess.Popen(
            image.cmd, cwd=image.workdir, env=image.env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        assert wait_until(
            lambda: "mailgate ready on" in log.read_text() or gateway.poll() is not None, 60
        ), log.read_text()
        assert gateway.poll() is None, log.read_text()
        check = subprocess.run(health, env=image.env, capture_output=True, timeout=30)
        assert check.returncode == 0, check
        with smtplib.SMTP("127.0.0.1", smtp, timeout=15) as client:
            client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
        assert len(list((image.workdir / "mail" / "new").iterdir())) == 1
        status, body = http_get(metrics, "/metrics")
        assert status == 200 and "mailgate_build_info{version=" in body
        gateway.send_signal(signal.SIGTERM)  # the image's STOPSIGNAL
        assert gateway.wait(30) == 0
        # Gone: the health check now fails, as Docker would see it.
        assert subprocess.run(health, env=image.env, capture_output=True, timeout=30).returncode
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait(10)


def unit_settings() -> list[tuple[str, str]]:
    """(key, value) of every setting in the unit file, in order."""
    out = []
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def test_the_systemd_unit_matches_what_the_gateway_does():
    settings = unit_settings()
    values = dict(settings)
    notifies = "NOTIFY_SOCKET" in "".join(p.read_text() for p in (REPO / "gateway").rglob("*.py"))
    assert values["Type"] == ("notify" if notifies else "simple")
    reloads = [v for k, v in settings if k == "ExecReload"]
    assert reloads[-1] == "/bin/kill -HUP $MAINPID"
    assert values["KillSignal"] == "SIGTERM"
    from mailgate.policy import Policy

    assert int(values["TimeoutStopSec"]) > Policy().shutdown_timeout
    assert values["User"] != "root"
    for sandboxing in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome"):
        assert sandboxing in values


def test_the_systemd_unit_commands_run(tmp_path: Path):
    mailgate = shutil.which("mailgate") or str(Path(sys.executable).parent / "mailgate")
    for key, value in unit_settings():
        if key in ("ExecStartPre", "ExecReload") and "mailgate check" in value:
            argv = shlex.split(value.replace("/etc/mailgate/policy.yaml", str(CONTAINER_POLICY)))
            result = subprocess.run(
                [mailgate, *argv[1:]], capture_output=True, text=True, timeout=60, cwd=tmp_path
            )
            assert result.returncode == 0, (value, result.stderr)


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit file is not verified here")
    mailgate = shutil.which("mailgate") or str(Path(sys.executable).parent / "mailgate")
    unit = tmp_path / "mailgate.service"
    unit.write_text(UNIT.read_text().replace("/opt/mailgate/bin/mailgate", mailgate))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on unknown keys and bad values too, but names the file in a warning.
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if "mailgate" in line
    ]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
