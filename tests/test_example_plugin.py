"""The plugin from docs/writing-plugins.md, installed as a package and loaded by entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mailgate.testing import MESSAGE, gateway_harness
from tests.ops_support import mailgate

EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "invoice_guard"
INVOICE = MESSAGE.replace(b"Subject: hello", b"Subject: Overdue invoice payment")


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the example package (no dependencies) into a private folder."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def test_example_plugin_loads_by_entry_point_name(installed_example, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(installed_example))
    policy = {"plugins": {"invoice_guard": {"threshold": 2, "known_senders": ["billing.test"]}}}
    with gateway_harness(policy, tmp_path) as h:
        with h.gateway.client() as client:
            client.sendmail("x@unknown.test", ["bob@example.com"], INVOICE)
            client.sendmail("ap@billing.test", ["bob@example.com"], INVOICE)
            client.sendmail("x@unknown.test", ["bob@example.com"], MESSAGE)
        first, known, plain = (m.data for m in h.upstream.messages)
    assert b"X-Invoice-Guard: hits=3" in first
    assert b"X-Invoice-Guard" not in known
    assert b"X-Invoice-Guard" not in plain


def check(policy: Path, example: Path) -> subprocess.CompletedProcess[str]:
    """``mailgate check -c POLICY`` with only the example package on ``PYTHONPATH``."""
    return mailgate(
        "check", "-c", str(policy), env={"PYTHONPATH": str(example), "PATH": "/usr/bin:/bin"}
    )


def test_example_plugin_loads_by_dotted_path_and_check_reports_it(installed_example, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "plugins:\n  guard:\n    module: 'invoice_guard:InvoiceGuard'\n    threshold: two\n"
    )
    result = check(policy, installed_example)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{policy}:4:5: plugins.guard.threshold: ")


def test_example_plugin_config_errors_and_rule_typos_are_positioned(installed_example, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "plugins:\n"
        "  invoice_guard:\n"
        "    keywords: [invoice, '']\n"
        "    rule_modes: {invoice_guard.suspicous: monitor}\n"
    )
    result = check(policy, installed_example)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{policy}:3:5: plugins.invoice_guard.keywords: "
        "a keyword may not be empty (it would match every Subject)",
        f"{policy}:4:18: plugins.invoice_guard.rule_modes.invoice_guard.suspicous: unknown rule "
        "id 'invoice_guard.suspicous' (did you mean 'invoice_guard.suspicious'?)",
    ]
    policy.write_text("plugins:\n  invoice_guard:\n    keywords: [invoice, '']\n")
    result = check(policy, installed_example)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"{policy}:3:5: plugins.invoice_guard.keywords: "
        "a keyword may not be empty (it would match every Subject)"
    )
