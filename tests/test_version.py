"""``mailgate --version``, ``mailgate`` alone, and the version in ``/metrics``."""

from __future__ import annotations

import importlib.metadata

from tests.ops_support import mailgate, sample, scrape


def test_version_comes_from_the_package_metadata():
    result = mailgate("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"mailgate {importlib.metadata.version('mailgate')}\n"


def test_no_arguments_prints_the_help_not_a_usage_error():
    result = mailgate()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: mailgate")
    for command in ("run", "check", "test", "reload", "queue", "--version"):
        assert command in result.stdout
    assert "error" not in result.stdout + result.stderr


def test_metrics_carry_the_version(make_gateway):
    gw = make_gateway(metrics="127.0.0.1:0")
    bound = gw.gateway.metrics_server.bound
    assert bound is not None
    version = importlib.metadata.version("mailgate")
    assert sample(scrape(bound[1]), "mailgate_build_info", version=version) == 1
