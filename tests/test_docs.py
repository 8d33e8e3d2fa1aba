"""The docs keep up with the code: every hook documented with its real signature."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from mailgate import hookspecs

DOCS = Path(__file__).parent.parent / "docs"


def documented_hooks() -> dict[str, str]:
    text = (DOCS / "hooks.md").read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r"^### (on_\w+)\((.*)\)$", text, re.M)}


def spec_hooks() -> dict[str, str]:
    return {
        name: ", ".join(inspect.signature(func).parameters)
        for name, func in vars(hookspecs).items()
        if name.startswith("on_") and callable(func)
    }


def test_every_hook_is_documented_with_its_signature():
    assert documented_hooks() == spec_hooks()


def test_every_hook_has_a_docstring():
    for name, func in vars(hookspecs).items():
        if name.startswith("on_"):
            assert func.__doc__ and func.__doc__.strip(), name


def test_every_builtin_plugin_has_a_docs_page_and_a_man_page():
    from mailgate.registry import builtin_plugins

    for cls in builtin_plugins().values():
        assert (DOCS / "plugins" / f"{cls.name}.md").is_file(), cls.name
        module = inspect.getmodule(cls)
        assert module is not None and module.__doc__ and "Rule ids" in module.__doc__, cls.name


def test_the_hook_reference_is_generated_from_the_hookspec_docstrings():
    from tests import hookdocs

    assert hookdocs.current() == hookdocs.render(), "run: python -m tests.hookdocs"


def documented_rule_ids(name: str) -> set[str]:
    """The rule ids in the first column of the table under a page's "## Rule ids" heading."""
    text = (DOCS / "plugins" / f"{name}.md").read_text()
    section = re.search(r"^## Rule ids.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, f"docs/plugins/{name}.md has no '## Rule ids' section"
    ids: set[str] = set()
    for row in re.findall(r"^\|(.*?)\|", section.group(1), re.M):
        ids.update(re.findall(r"`([a-z0-9_]+\.[a-z0-9_<>]+)`", row))
    return ids


def test_every_rule_table_matches_the_plugins_declared_rules():
    from mailgate.registry import builtin_plugins

    for name, cls in builtin_plugins().items():
        declared = cls.RULES  # type: ignore[attr-defined]
        documented = documented_rule_ids(name)
        missing = {rule.id for rule in declared} - documented
        assert not missing, f"docs/plugins/{name}.md does not list {sorted(missing)}"
        unknown = {
            i for i in documented if not any(rule.id == i or rule.matches(i) for rule in declared)
        }
        assert not unknown, f"docs/plugins/{name}.md lists undeclared {sorted(unknown)}"


def test_the_plugin_in_writing_plugins_is_the_example_package():
    source = (DOCS / "examples/invoice_guard/src/invoice_guard/__init__.py").read_text()
    first_block = (DOCS / "writing-plugins.md").read_text().split("```python\n")[1].split("```")[0]
    assert first_block.strip() == source[source.index("from pydantic import") :].strip()
