"""Every plugin page's key tables match the plugin's config model, both ways.

Plugins and pages are found, not listed: every module of ``mailgate.plugins``
that defines a class whose ``name`` is the module's name is a plugin, and
every ``docs/plugins/NAME.md`` must belong to one. In a page, a key table is a
Markdown table whose first column is headed ``key``; each row names one key
or several (`` `ipv4_prefix` / `ipv6_prefix` ``), or a nested one as a path
(`` `sign.<domain>.selector` ``, where ``<...>`` stands for a mapping's key).

- The first key table is the plugin's ``Config``: every field is documented
  and every documented key exists (the keys every plugin has, ``mode``,
  ``timeout``, ``rule_modes`` and ``module``, may be listed too).
- A further key table documents one nested model (the rules of ``ratelimit``):
  its keys must be exactly that model's fields.
- A nested model's fields are documented by one of those, or named in the
  row of the key that holds it (``{action: tag, score: N}``).
- A plugin without ``Config`` has no key table of its own keys.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import mailgate.plugins
from mailgate.registry import PluginSettings

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins"
COMMON = set(PluginSettings.model_fields)


def plugin_classes() -> dict[str, type[Any]]:
    """Every plugin class of ``mailgate.plugins``, by name."""
    found = {}
    for info in pkgutil.iter_modules(mailgate.plugins.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"mailgate.plugins.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and getattr(cls, "name", None) == info.name:
                found[info.name] = cls
    return found


PLUGINS = plugin_classes()


class Row(typing.NamedTuple):
    paths: list[list[str]]
    text: str


def key_tables(page: Path) -> list[list[Row]]:
    """The page's key tables: for each row, the key paths it names and the row's text."""
    tables: list[list[Row]] = []
    current: list[Row] | None = None
    for line in page.read_text().splitlines():
        cells = (
            [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        )
        if not cells:
            current = None
        elif current is None:
            if cells[0] == "key":
                current = []
                tables.append(current)
        elif not set(cells[0]) <= set("-: "):
            names = re.findall(r"`([^`]+)`", cells[0])
            assert names, f"{page.name}: a key table row without a `key`: {line}"
            current.append(Row([name.split(".") for name in names], line))
    return tables


def fields(model: type[BaseModel]) -> dict[str, Any]:
    """The model's keys as a policy writes them (aliases where there are some)."""
    return {(f.alias or name): f.annotation for name, f in model.model_fields.items()}


def nested_models(annotation: Any) -> list[type[BaseModel]]:
    """The models inside a field's type: ``Rule``, ``list[Rule]``, ``dict[str, Key] | None``."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return nested_models(typing.get_args(annotation)[0])
    if origin is not None or isinstance(annotation, types.UnionType):
        for arg in typing.get_args(annotation):
            out += [m for m in nested_models(arg) if m not in out]
    return out


def resolve(model: type[BaseModel], path: list[str]) -> bool:
    """True when the documented ``path`` (``<...>`` steps skipped) names a field of ``model``."""
    steps = [step for step in path if not (step.startswith("<") and step.endswith(">"))]
    models = [model]
    for step in steps:
        types_ = [fields(m)[step] for m in models if step in fields(m)]
        if not types_:
            return False
        models = [n for t in types_ for n in nested_models(t)]
    return True


def all_nested(model: type[BaseModel]) -> dict[type[BaseModel], str]:
    """Every model nested in ``model`` (at any depth) -> the key that holds it."""
    out: dict[type[BaseModel], str] = {}
    for key, annotation in fields(model).items():
        for nested in nested_models(annotation):
            if nested not in out:
                out[nested] = key
                out.update({m: k for m, k in all_nested(nested).items() if m not in out})
    return out


def test_plugins_are_found_and_every_page_has_a_plugin():
    assert {"ratelimit", "headers", "dkim", "spf", "relay_access"} <= set(PLUGINS)
    pages = {page.stem for page in DOCS.glob("*.md")}
    assert pages - set(PLUGINS) == set(), "pages without a plugin"
    assert set(PLUGINS) - pages == set(), "plugins without a page"


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_the_key_tables_match_the_config_model(name: str):
    page = DOCS / f"{name}.md"
    tables = key_tables(page)
    config: type[BaseModel] | None = getattr(PLUGINS[name], "Config", None)
    if config is None:
        own = [p for t in tables for row in t for p in row.paths if p[0] not in COMMON]
        assert own == [], f"{page.name} documents keys but the plugin takes none: {own}"
        return
    assert tables, f"{page.name}: no key table (| key | default | meaning |) for its Config"
    first, *others = tables
    documented = {path[0] for row in first for path in row.paths}
    model_keys = set(fields(config))
    assert model_keys - documented == set(), f"{page.name}: keys not documented"
    assert documented - model_keys - COMMON == set(), f"{page.name}: documented, no such key"
    for row in first:
        for path in row.paths:
            if path[0] not in COMMON:
                assert resolve(config, path), f"{page.name}: no such key {'.'.join(path)}"
    nested = all_nested(config)
    tabled: set[type[BaseModel]] = set()
    for table in others:
        keys = {path[0] for row in table for path in row.paths}
        matches = [m for m in nested if keys <= set(fields(m))]
        assert matches, f"{page.name}: a key table matches no nested model: {sorted(keys)}"
        model = matches[0]
        want = set(fields(model))
        assert keys == want, (
            f"{page.name}: the table of {model.__name__} differs: "
            f"missing {sorted(want - keys)}, unknown {sorted(keys - want)}"
        )
        tabled.add(model)
    for model, holder in nested.items():
        if model in tabled:
            continue
        paths = {tuple(p) for row in first for p in row.paths}
        rows = " ".join(row.text for row in first if any(p[0] == holder for p in row.paths))
        for key in fields(model):
            by_path = any(p[-1] == key and p[0] == holder for p in paths)
            in_row = re.search(rf"\b{re.escape(key)}\b", rows.split("|", 2)[-1] if rows else "")
            assert by_path or in_row, f"{page.name}: {holder}'s {model.__name__}.{key} undocumented"


def test_the_checker_catches_a_missing_and_an_unknown_key(tmp_path: Path):
    """The test above can fail: a page with one key dropped and one invented."""
    page = (DOCS / "ratelimit.md").read_text()
    broken = tmp_path / "ratelimit.md"
    broken.write_text(page.replace("| `on_error` |", "| `on_eror` |", 1))
    keys = {p[0] for row in key_tables(broken)[0] for p in row.paths}
    assert "on_error" not in keys and "on_eror" in keys
    assert set(fields(PLUGINS["ratelimit"].Config)) - keys == {"on_error"}
    assert not resolve(PLUGINS["dkim"].Config, ["sign", "<domain>", "selectr"])
    assert resolve(PLUGINS["dkim"].Config, ["sign", "<domain>", "selector"])
